"""Distributed runs end cleanly: every `rto` command ends its process group itself, on every exit path.

A cheap stand-in command (one collective, no model) goes through `rto.cli.main` under torchrun, so the real
exit paths run: success, success after an elastic restart, an error, SIGTERM. An atexit hook on each rank
reports whether the group was still alive when the interpreter began to exit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ENTRY = """
import atexit, os, signal, sys
import torch
import torch.distributed as dist
import rto.cli as cli
from rto.parallel import init_distributed

mode, rank, restart = sys.argv[1], int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
atexit.register(lambda: print(f"rank {rank} round {restart}: group alive at exit: {dist.is_initialized()}",
                              flush=True))

def command(_args):
    d = init_distributed(60)
    if mode == "restart" and rank == 1 and restart == 0:
        os._exit(1)  # rank 1 dies on the first round; torchrun restarts both
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == d.world_size
    if mode == "error":
        raise RuntimeError("a project error after the last collective")
    if mode == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    return 0

cli.cmd_info = command
sys.exit(cli.main(["info"]))
"""


def torchrun(entry: Path, mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    restarts = "--max-restarts=1" if mode == "restart" else "--max-restarts=0"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", restarts]
    cmd = [*launcher, "--monitor-interval=0.1", str(entry), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def exits(proc: subprocess.CompletedProcess) -> dict[tuple[int, int], bool]:
    """(rank, round) -> was the group still alive at interpreter exit."""
    found = re.findall(r"rank (\d) round (\d): group alive at exit: (True|False)", proc.stdout)
    return {(int(r), int(k)): alive == "True" for r, k, alive in found}


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    path = tmp_path_factory.mktemp("teardown") / "entry.py"
    path.write_text(ENTRY)
    return path


def test_finished_runs_exit_zero_with_the_group_ended_repeatedly(entry, tmp_path):
    for attempt in range(2):  # the abort this guards against was rare: several rounds of both scenarios
        for mode in ("ok", "restart"):
            proc = torchrun(entry, mode, tmp_path)
            assert proc.returncode == 0, f"{mode} attempt {attempt}: rc {proc.returncode}\n{proc.stderr[-2000:]}"
            final_round = 1 if mode == "restart" else 0
            assert exits(proc).get((0, final_round)) is False and exits(proc).get((1, final_round)) is False, (
                proc.stdout
            )


@pytest.mark.parametrize("mode, code", [("error", 1), ("sigterm", 143)])
def test_failing_runs_end_the_group_too(entry, tmp_path, mode, code):
    proc = torchrun(entry, mode, tmp_path)
    assert proc.returncode != 0
    ended = exits(proc)
    assert ended.get((0, 0)) is False and ended.get((1, 0)) is False, proc.stdout + proc.stderr[-2000:]
    assert f"exitcode  : {code}" in proc.stderr or f"exitcode: {code}" in proc.stderr, proc.stderr[-2000:]
