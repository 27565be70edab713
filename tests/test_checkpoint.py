"""Checkpoints: nothing read from one runs code, a damaged newest one is skipped, a poisoned state is not saved,
pruning keeps the newest saves, and a run resumes on another rank count (two ranks under torchrun, gloo)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from rto.checkpoint import (
    CheckpointError,
    _state,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rank_seed,
    read_metadata,
    save_checkpoint,
)
from rto.config import load_config
from rto.parallel import init_distributed
from rto.trainers import sft
from tests.assets import make_assets
from tests.test_trainers import metrics, run_args


@pytest.fixture(scope="module")
def d():
    return init_distributed()


def trainables(seed: int) -> dict:
    """A linear model and AdamW after one update (so the optimizer has state)."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return {"model": (model, optimizer)}


def save(run, step: int, tr: dict, d, keep_last: int = 10):
    path = checkpoint_dir(run, step)
    save_checkpoint(path, tr, {"step": step}, d, keep_last)
    return path


class Plant:
    """Runs a shell command when unpickled: it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def replace_file(ckpt, name: str, data: bytes) -> None:
    """Replace a file as an attacker would: its content and the manifest's record of its size."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = len(data)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_restores_weights_optimizer_and_rng(tmp_path, d):
    tr = trainables(0)
    path = save(tmp_path, 3, tr, d)
    weights = {k: v.clone() for k, v in tr["model"][0].state_dict().items()}
    moments = tr["model"][1].state_dict()["state"][0]["exp_avg"].clone()
    after_save = torch.rand(3), random.random()
    other = trainables(1)
    assert load_checkpoint(path, other, d) == {"step": 3}
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]
    for k, v in other["model"][0].state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    torch.testing.assert_close(other["model"][1].state_dict()["state"][0]["exp_avg"], moments, rtol=0, atol=0)


def test_a_checkpoint_of_the_first_format_still_loads(tmp_path, d):
    path = save(tmp_path, 2, trainables(0), d)
    (path / "manifest.json").unlink()
    (path / "rng_rank0.json").unlink()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, path / "rng_rank0.pt")
    expected = torch.rand(3)
    assert latest_checkpoint(tmp_path) == path
    load_checkpoint(path, trainables(1), d)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("place", ["rng_rank0.json", "rng_rank0.pt", ".metadata", "optimizer entry"])
def test_a_planted_pickle_runs_nothing_and_is_refused_by_name(tmp_path, d, place):
    marker = tmp_path / "planted-command-ran"
    tr = trainables(0)
    if place == "optimizer entry":  # a non-tensor entry of the DCP shards (optimizer hyper-parameters)
        tr["model"][1].param_groups[0]["lr"] = Plant(marker)
    path = save(tmp_path, 2, tr, d)
    if place == "rng_rank0.json":
        data = pickle.dumps(Plant(marker))
        replace_file(path, place, data)
        control = lambda: pickle.loads(data)  # noqa: E731
    elif place == "rng_rank0.pt":  # the first format (no manifest): a torch.save file
        (path / "manifest.json").unlink()
        (path / "rng_rank0.json").unlink()
        buffer = io.BytesIO()
        torch.save({"torch": torch.get_rng_state(), "python": Plant(marker)}, buffer)
        (path / place).write_bytes(buffer.getvalue())
        control = lambda: torch.load(path / place, weights_only=False)  # noqa: E731
    elif place == ".metadata":  # real metadata carrying the command
        metadata = read_metadata(path / ".metadata")
        metadata.planner_data = Plant(marker)
        data = pickle.dumps(metadata)
        replace_file(path, place, data)
        control = lambda: pickle.loads(data)  # noqa: E731
    else:
        control = lambda: dcp.load(_state(trainables(1)), checkpoint_id=str(path))  # noqa: E731
    control()  # the unrestricted loader runs the command: the file is a real attack
    assert marker.exists()
    marker.unlink()

    named = "model_optim.param_groups.0.lr" if place == "optimizer entry" else str(path / place)
    with pytest.raises(CheckpointError, match=re.escape(named)) as refused:
        load_checkpoint(path, trainables(1), d)
    assert not marker.exists()
    assert "file an issue" not in str(refused.value)  # what the file asked for, not torch's advice
    if place == "rng_rank0.pt":
        assert "(Trying to load unsupported GLOBAL " in str(refused.value)  # the planted call, by name
    if place != "optimizer entry":  # that one is only seen when the shards are read
        assert latest_checkpoint(tmp_path) is None
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated shard", "missing rng state", "garbage metadata", "no manifest"])
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_says_why(tmp_path, d, damage, caplog):
    tr = trainables(0)
    good, bad = save(tmp_path, 2, tr, d), save(tmp_path, 4, tr, d)
    files = {"truncated shard": "__0_0.distcp", "missing rng state": "rng_rank0.json"}
    named = {**files, "garbage metadata": ".metadata", "no manifest": "manifest.json"}[damage]
    if damage == "truncated shard":
        shard = bad / named
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage metadata":
        replace_file(bad, named, b"\x80\x04not a pickle")
    else:
        (bad / named).unlink()
    with caplog.at_level(logging.WARNING, logger="rto.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    assert f"skipping checkpoint {bad}" in caplog.text and str(bad / named) in caplog.text


@pytest.mark.parametrize("where", ["weight", "optimizer"])
def test_a_non_finite_state_is_refused_naming_the_tensor(tmp_path, d, where):
    tr = trainables(0)
    model, optimizer = tr["model"]
    good = save(tmp_path, 1, tr, d)
    with torch.no_grad():
        if where == "weight":
            model.bias[1] = float("nan")
            named = "model weight bias"
        else:
            optimizer.state[model.weight]["exp_avg_sq"][0, 0] = float("inf")
            named = "model optimizer exp_avg_sq of weight"
    with pytest.raises(CheckpointError, match=f"refusing to save .*step_00000002: {named} holds NaN or inf"):
        save(tmp_path, 2, tr, d)
    assert list_checkpoints(tmp_path) == [good] and not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_pruning_keeps_the_newest_saves_so_a_resumed_lineage_is_never_deleted(tmp_path, d):
    tr = trainables(0)
    for step in (2, 4, 6):
        save(tmp_path, step, tr, d, keep_last=3)
    # resumed from step 2 (steps 4 and 6 were an abandoned attempt's): its new saves are kept and resumed
    save(tmp_path, 3, tr, d, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    save(tmp_path, 5, tr, d, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000005"]


def test_a_rank_the_save_did_not_have_gets_a_seeded_rng_and_says_so(tmp_path, d, caplog):
    path = save(tmp_path, 4, trainables(0), d)
    with caplog.at_level(logging.WARNING, logger="rto.checkpoint"):
        load_checkpoint(path, trainables(1), dataclasses.replace(d, rank=1, world_size=2), seed=7)
    got = torch.rand(4)
    torch.manual_seed(rank_seed(7, 1, 4))
    assert torch.equal(got, torch.rand(4))
    assert "rank 1:" in caplog.text and "no RNG state for this rank" in caplog.text
    assert len({rank_seed(7, 1, 4), rank_seed(7, 0, 4), rank_seed(7, 1, 5), rank_seed(8, 1, 4)}) == 4


# --- end to end: the SFT trainer, resumed on 2 ranks from a 1-rank save and back -------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n=96)


def losses(run_dir) -> dict[int, float]:
    rows = [m for m in metrics(run_dir) if "train/loss" in m]
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice in {run_dir}: {steps}"
    return {m["step"]: m["train/loss"] for m in rows}


def test_resume_on_two_ranks_from_one_and_back_continues_at_the_right_step(assets, tmp_path):
    common = ("train.max_steps=5", "train.save_every=2", "run.keep_last=5", "train.log_every=1", "optim.lr=1e-2")
    sft.main(load_config("sft", None, run_args(assets, tmp_path, "sft", "one", *common)))
    reference = losses(tmp_path / "one")
    assert sorted(reference) == [1, 2, 3, 4, 5]

    # a 1-rank checkpoint resumed on 2 ranks: rank 1's RNG is seeded, model and optimizer are resharded
    shutil.copytree(checkpoint_dir(tmp_path / "one", 2), checkpoint_dir(tmp_path / "two", 2))
    args = run_args(assets, tmp_path, "sft", "two", *common, "run.resume=auto")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rto", "sft"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1:" in proc.stderr and "no RNG state for this rank" in proc.stderr
    two = losses(tmp_path / "two")
    assert sorted(two) == [3, 4, 5]
    for step, loss in two.items():  # the same batches from the same state: equal up to reduction order
        assert loss == pytest.approx(reference[step], rel=1e-4), f"step {step}"
    saved = json.loads((checkpoint_dir(tmp_path / "two", 4) / "manifest.json").read_text())
    assert saved["world_size"] == 2

    # a 2-rank checkpoint resumed on 1 rank
    shutil.copytree(checkpoint_dir(tmp_path / "two", 4), checkpoint_dir(tmp_path / "back", 4))
    sft.main(load_config("sft", None, run_args(assets, tmp_path, "sft", "back", *common, "run.resume=auto")))
    back = losses(tmp_path / "back")
    assert sorted(back) == [5]
    for step, loss in back.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), f"step {step}"

    # a planted .metadata in the checkpoint named by run.resume: refused by name, nothing runs
    planted, marker = tmp_path / "planted" / "step_00000002", tmp_path / "planted-command-ran"
    shutil.copytree(checkpoint_dir(tmp_path / "one", 2), planted)
    metadata = read_metadata(planted / ".metadata")
    metadata.planner_data = Plant(marker)
    replace_file(planted, ".metadata", pickle.dumps(metadata))
    args = run_args(assets, tmp_path, "sft", "victim", *common, f"run.resume={planted}")
    with pytest.raises(CheckpointError, match=re.escape(str(planted / ".metadata"))):
        sft.main(load_config("sft", None, args))
    assert not marker.exists()
