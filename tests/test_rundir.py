"""Run folders: a fresh run into a used folder is refused unless run.overwrite, one live run at a time (a stale
lock is taken over), and a resume under another identity is refused naming the field."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from rto.checkpoint import checkpoint_dir, save_checkpoint
from rto.config import load_config
from rto.rundir import LOCK, RunDirError, _boot_id, _start_ticks, claim, identity_of
from tests.test_checkpoint import d, trainables  # noqa: F401 (d is a fixture)

SFT = {"command": "sft", "algo": None, "model.path": "/models/a", "optim.betas": [0.9, 0.95]}


def start(run_dir, identity=SFT, resume=None, overwrite=False):
    return claim(run_dir, identity, resume=resume, overwrite=overwrite, is_main=True)


def used_folder(tmp_path, d, identity=SFT):  # noqa: F811
    """A run folder that an earlier run (of `identity`) claimed, checkpointed at steps 2 and 4, and finished."""
    run = tmp_path / "run"
    with start(run, identity) as lock:
        for step in (2, 4):
            save_with_identity(run, step, d, lock.identity)
        (run / "hf").mkdir()
        rows = [{"step": s, "train/loss": 1.0} for s in range(1, 7)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "tr')
    return run


def save_with_identity(run, step, d, identity):  # noqa: F811
    save_checkpoint(checkpoint_dir(run, step), trainables(0), {"step": step}, d, 10, identity=identity)


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_starts_over(tmp_path, d):  # noqa: F811
    run = used_folder(tmp_path, d)
    with pytest.raises(
        RunDirError, match=r"holds checkpoints and a final model .*run\.resume=auto.*run\.overwrite=true"
    ):
        start(run)
    assert checkpoint_dir(run, 4).is_dir() and (run / "hf").is_dir() and not (run / LOCK).exists()
    with pytest.raises(RunDirError, match="cannot go with run.resume=auto"):
        start(run, resume="auto", overwrite=True)

    other = {**SFT, "model.path": "/models/b"}
    with start(run, other, overwrite=True) as lock:
        assert lock.checkpoint is None
        assert not any((run / name).exists() for name in ("checkpoints", "hf", "metrics.jsonl"))
        assert json.loads((run / "run.json").read_text()) == other


def test_a_fresh_start_after_an_attempt_that_saved_nothing_keeps_its_log_aside(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with start(run, resume="auto") as lock:  # nothing to resume: a fresh start
        assert lock.checkpoint is None
    assert not (run / "metrics.jsonl").exists() and (run / "metrics.jsonl.1").read_text() == '{"step": 1}\n'


def test_a_second_live_run_is_refused_until_the_first_ends(tmp_path):
    run = tmp_path / "run"
    first = start(run)
    holder = json.loads((run / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirError, match=f"{run} is in use by pid {os.getpid()} on {socket.gethostname()}"):
        start(run)
    first.close()
    assert not (run / LOCK).exists()
    start(run).close()


def _lock_of(pid: int, start_ticks) -> str:
    host = socket.gethostname()
    return json.dumps({"pid": pid, "host": host, "boot": _boot_id(), "start": start_ticks, "since": "earlier"})


@pytest.mark.parametrize("holder", ["dead pid", "reused pid", "live pid"])
def test_a_stale_lock_is_taken_over_and_a_live_holder_refused(tmp_path, caplog, holder):
    run = tmp_path / "run"
    run.mkdir()
    if holder == "dead pid":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (run / LOCK).write_text(_lock_of(gone.pid, None))
    elif holder == "reused pid":  # this process's pid, but not the process that wrote the lock
        (run / LOCK).write_text(_lock_of(os.getpid(), _start_ticks(os.getpid()) - 1))
    else:  # a live process named by the lock file (on a filesystem without kernel locks this is all there is)
        live = subprocess.Popen(["sleep", "30"])
        try:
            (run / LOCK).write_text(_lock_of(live.pid, _start_ticks(live.pid)))
            with pytest.raises(RunDirError, match=f"in use by pid {live.pid}"):
                start(run)
        finally:
            live.kill()
            live.wait()
        return
    with caplog.at_level(logging.WARNING, logger="rto.rundir"):
        lock = start(run)
    assert "taking over the stale lock" in caplog.text
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.close()


def test_a_resume_under_another_identity_is_refused_naming_the_field(tmp_path, d):  # noqa: F811
    run = used_folder(tmp_path, d)
    with pytest.raises(RunDirError, match=r"step_00000004/manifest\.json records algo=None, this run has algo='ppo'"):
        start(run, {**SFT, "algo": "ppo"}, resume="auto")
    # a checkpoint carries its identity wherever it is copied
    copied = tmp_path / "elsewhere" / "step_00000004"
    copied.parent.mkdir()
    os.rename(checkpoint_dir(run, 4), copied)
    other = {**SFT, "optim.betas": [0.9, 0.99]}
    with pytest.raises(RunDirError, match=r"manifest\.json records optim\.betas=\[0\.9, 0\.95\]"):
        start(tmp_path / "new", other, resume=str(copied))
    with start(tmp_path / "new", SFT, resume=str(copied)) as lock:
        assert lock.checkpoint == copied


def test_resume_drops_the_metrics_logged_after_the_checkpoint(tmp_path, d):  # noqa: F811
    run = used_folder(tmp_path, d)
    with start(run, resume="auto") as lock:
        assert lock.checkpoint == checkpoint_dir(run, 4)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 5, 6 and the torn row of step 7 are logged again


def test_identity_of_reads_dotted_settings_and_makes_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config("sft", None, ["model.path=model", "data.path=hub/dataset", "optim.lr=0.5"])
    got = identity_of("sft", cfg, ["model.path", "data.path", "optim.lr", "optim.betas", "algo"])
    paths = {"model.path": str(tmp_path / "model"), "data.path": "hub/dataset"}
    assert got == {"command": "sft", **paths, "optim.lr": 0.5, "optim.betas": [0.9, 0.95], "algo": None}
