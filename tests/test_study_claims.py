"""The horizon study's workers share one run folder tree: each run, and a world still being built, is claimed by
one live worker; a claim whose process is gone is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from benchmarks.study_horizon import CLAIM, claim, release, state, take, world_dir

RUN = {"L": 12, "seed": 0, "arm": "rto", "variant": {"lr": 1e-4, "dpo": 0.05}}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_claim_excludes_a_stale_one_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    assert claim(folder) and not claim(folder)  # this process holds it: a second claim fails
    release(folder)
    assert not (folder / CLAIM).exists() and claim(folder)
    release(folder)
    (folder / CLAIM).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    assert claim(folder)  # stale: its worker is gone
    assert json.loads((folder / CLAIM).read_text())["pid"] == os.getpid()
    (folder / CLAIM).write_text(json.dumps({"host": "another-machine", "pid": 1}))
    assert not claim(folder)  # another machine's claim cannot be checked, so it is respected
    release(folder)  # not ours: left in place
    assert (folder / CLAIM).exists()


def test_a_world_being_built_is_claimed_with_the_run(tmp_path):
    other = {**RUN, "arm": "ppo", "variant": {"lr": 1e-4}}
    world = world_dir(tmp_path, RUN["L"], RUN["seed"])
    taken = take(tmp_path, RUN)
    assert world in taken and len(taken) == 2  # the world is not built yet
    # a second worker (here: a claim held by another live process) must not start another arm of that world
    (world / CLAIM).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    assert take(tmp_path, other) == []
    assert state(tmp_path, RUN) == "running"
    (world / "results.json").write_text("{}")  # built: arms of the world run side by side
    assert len(take(tmp_path, other)) == 1
