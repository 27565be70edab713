"""Fault injection: planted NaNs, SIGKILL mid-run, an interrupted save, a rank killed under torchrun."""

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
from rto.config import load_config
from rto.guard import NonFiniteError
from rto.models import PolicyModel
from rto.trainers import ppo, sft
from tests.assets import make_assets, make_rl_assets, small_ppo_args
from tests.test_trainers import metrics, run_args


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n=96)


def plant_nan(monkeypatch, bad_calls: set[int]):
    """PolicyModel.forward returns NaN log-probs on the given (1-based) training calls."""
    original = PolicyModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out["logp"] = out["logp"] * float("nan")
        return out

    monkeypatch.setattr(PolicyModel, "forward", forward)


def test_nan_losses_skip_updates_and_the_run_goes_on(assets, tmp_path, monkeypatch):
    # 16-item global batches of 8-item micro-batches: calls 3-4 are step 2, calls 5-6 step 3
    plant_nan(monkeypatch, {3, 5})
    args = run_args(assets, tmp_path, "sft", "nan", "train.max_steps=6", "train.log_every=1")
    sft.main(load_config("sft", None, args))
    rows = [m for m in metrics(tmp_path / "nan") if "train/loss" in m]
    assert [r["train/skipped_updates"] for r in rows] == [0, 1, 2, 2, 2, 2]
    final = load_file(tmp_path / "nan" / "hf" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_nan_every_step_stops_with_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
    plant_nan(monkeypatch, set(range(5, 100)))  # from step 3 on
    args = run_args(
        assets,
        tmp_path,
        "sft",
        "stop",
        "train.max_steps=20",
        "train.save_every=1",
        "run.keep_last=10",
        "train.max_nonfinite=3",
    )
    with pytest.raises(NonFiniteError, match=r"stopping at step 5: 3 updates in a row .* \(last: loss \(nll\)\)"):
        sft.main(load_config("sft", None, args))
    assert latest_checkpoint(tmp_path / "stop").name == "step_00000002"  # nothing saved after the first bad step


def test_nan_rewards_skip_a_ppo_update(tmp_path, monkeypatch):
    rl = make_rl_assets(tmp_path / "rl", n_prompts=32)
    original = ppo.score_rollout
    calls = {"n": 0}

    def score(*args, **kwargs):
        s = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            s.score[0] = float("nan")
        return s

    monkeypatch.setattr(ppo, "score_rollout", score)
    c = load_config("ppo", "toy", small_ppo_args(rl, tmp_path, "p", "train.steps=3", "train.log_every=1"))
    ppo.main(c)
    assert [r["train/skipped_updates"] for r in metrics(tmp_path / "p")] == [0, 1, 1]


def _sft_cmd(assets, out: Path, name: str, *extra: str) -> list[str]:
    args = run_args(assets, out, "sft", name, "train.max_steps=30", "train.save_every=2", "run.keep_last=3", *extra)
    return [sys.executable, "-m", "rto", "sft", *args]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_sft_cmd(assets, tmp_path, "clean"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        _sft_cmd(assets, tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while (
        latest_checkpoint(tmp_path / "killed") is None or latest_checkpoint(tmp_path / "killed").name < "step_00000006"
    ):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(tmp_path / "killed").name
    assert not (tmp_path / "killed" / "hf").exists() and killed_at < "step_00000030"
    (ckpt / "step_99999999.tmp").mkdir()  # what a crash during a save leaves behind: ignored
    subprocess.run(
        _sft_cmd(assets, tmp_path, "killed", "run.resume=auto"), check=True, env=env, capture_output=True, timeout=600
    )
    a = load_file(tmp_path / "clean" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "hf" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after kill + resume")


CRASHING_ENTRY = """
import os, sys
import rto.checkpoint as ck
import rto.trainers.offline as off
original = ck.save_checkpoint
def save_then_die(path, *args, **kwargs):
    original(path, *args, **kwargs)
    if path.name == "step_00000004" and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(1)  # rank 1 dies right after the step-4 checkpoint, on the first attempt only
off.save_checkpoint = save_then_die
from rto.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_rank_is_restarted_by_torchrun_and_resumes(assets, tmp_path):
    entry = tmp_path / "crashing_entry.py"
    entry.write_text(CRASHING_ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = run_args(
        assets,
        tmp_path,
        "sft",
        "elastic",
        "train.max_steps=8",
        "train.save_every=2",
        "run.resume=auto",
        "train.log_every=1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        str(entry),
        "sft",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    steps = [m["step"] for m in metrics(tmp_path / "elastic") if "train/loss" in m]
    assert steps[-1] == 8 and 5 in steps
    assert (tmp_path / "elastic" / "hf" / "model.safetensors").is_file()


HANGING_ENTRY = """
import os, sys, time
import torch
from rto.models import PolicyModel
original = PolicyModel.forward
calls = {"n": 0}
def forward(self, *args, **kwargs):
    if torch.is_grad_enabled():
        calls["n"] += 1
        if calls["n"] == 3 and os.environ["RANK"] == "1":
            time.sleep(3600)  # rank 1 hangs at the start of step 3 (two micro-batches per step)
    return original(self, *args, **kwargs)
PolicyModel.forward = forward
from rto.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_hung_rank_is_caught_by_the_timeout_with_the_phase_named(assets, tmp_path):
    entry = tmp_path / "hanging_entry.py"
    entry.write_text(HANGING_ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = run_args(assets, tmp_path, "sft", "hang", "train.max_steps=6", "parallel.timeout_s=5")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(entry), "sft", *args]
    start = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "rank 0: a collective timed out during step 3: forward/backward" in proc.stderr, proc.stderr[-3000:]
    assert time.time() - start < 280  # stopped by the 5 s timeout, not by the hung rank (asleep for an hour)


def test_sigkill_during_ppo_then_resume_matches_an_uninterrupted_run(tmp_path):
    rl = make_rl_assets(tmp_path / "rl", n_prompts=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(name, *extra):
        settings = small_ppo_args(rl, tmp_path, name, "train.steps=12", "train.save_every=1", "run.keep_last=3")
        return [sys.executable, "-m", "rto", "ppo", "--recipe", "toy", *settings, *extra]

    subprocess.run(cmd("clean"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (
        latest_checkpoint(tmp_path / "killed") is None or latest_checkpoint(tmp_path / "killed").name < "step_00000004"
    ):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.15)  # somewhere inside a later step: rollout, scoring, update or a save
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "hf").exists()
    subprocess.run(cmd("killed", "run.resume=auto"), check=True, env=env, capture_output=True, timeout=600)
    for part in ("actor", "critic"):
        a = load_file(tmp_path / "clean" / "hf" / part / "model.safetensors")
        b = load_file(tmp_path / "killed" / "hf" / part / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{part} {k} differs after kill + resume")
