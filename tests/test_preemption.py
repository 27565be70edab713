"""Preemption: SIGTERM or SIGINT during training finishes the step, checkpoints it, says so and exits non-zero;
resuming continues from that step, logs no step twice and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rto.checkpoint import latest_checkpoint
from tests.assets import make_assets, make_rl_assets, small_ppo_args
from tests.test_trainers import metrics, run_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n=96)


def signal_after_checkpoint(cmd: list[str], run_dir: Path, at_least: str, signum: int) -> subprocess.CompletedProcess:
    """Start `cmd`, wait for a checkpoint named >= at_least, send `signum`, return the finished process."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while latest_checkpoint(run_dir) is None or latest_checkpoint(run_dir).name < at_least:
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigterm_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(assets, tmp_path):
    def cmd(name, *extra):
        args = run_args(assets, tmp_path, "sft", name, "train.max_steps=24", "train.save_every=4", *extra)
        return [sys.executable, "-m", "rto", "sft", *args]

    subprocess.run(cmd("clean"), check=True, env=ENV, capture_output=True, timeout=600)
    run_dir = tmp_path / "stopped"
    proc = signal_after_checkpoint(cmd("stopped"), run_dir, "step_00000004", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    stopped_at = latest_checkpoint(run_dir)
    step = int(stopped_at.name.split("_")[1])
    assert step < 24 and not (run_dir / "hf").exists()
    line = f"rto sft: stopped by SIGTERM after step {step}, checkpoint {stopped_at}; continue with run.resume=auto"
    assert line in proc.stderr, proc.stderr[-2000:]
    logged = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert logged and logged[-1] == step  # the signalled step was finished and logged, then saved

    subprocess.run(cmd("stopped", "run.resume=auto"), check=True, env=ENV, capture_output=True, timeout=600)
    steps = [m["step"] for m in metrics(run_dir) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 24, steps  # no step logged twice
    a = load_file(tmp_path / "clean" / "hf" / "model.safetensors")
    b = load_file(run_dir / "hf" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after SIGTERM + resume")


def test_sigint_stops_a_ppo_run_with_a_checkpoint_and_resume_finishes(tmp_path):
    rl = make_rl_assets(tmp_path / "rl", n_prompts=32)
    settings = small_ppo_args(rl, tmp_path, "p", "train.steps=40", "train.save_every=20", "train.log_every=1")
    cmd = [sys.executable, "-m", "rto", "ppo", "--recipe", "toy", *settings]
    run_dir = tmp_path / "p"
    # no periodic checkpoint before step 20: the one written after step 1+ comes from the signal
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    saved = latest_checkpoint(run_dir)
    step = int(saved.name.split("_")[1])
    assert 1 <= step < 20 and "stopped by SIGINT after step" in err
    resumed = subprocess.run([*cmd, "run.resume=auto"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {saved} at step {step}" in resumed.stderr
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, 41)), steps
