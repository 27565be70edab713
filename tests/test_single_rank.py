"""One rank without FSDP2: `rto.parallel.shard` leaves the root whole there (plain tensors, no FSDP2 copies),
trains the first step as the one-rank FSDP2 path (`parallel.single_rank_fsdp=true`) does, and its checkpoints
resume on either path (two ranks from a one-rank save and back: tests/test_checkpoint.py)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from rto.checkpoint import checkpoint_dir, read_metadata
from rto.config import ConfigError, ParallelConfig, load_config
from rto.forward import policy_logp
from rto.models import PolicyModel, tiny_causal_lm
from rto.parallel import (
    OneRankModule,
    clip_grad_norm,
    compute_precision,
    full_state_dict,
    init_distributed,
    shard,
)
from rto.rollout.hf import gathered
from rto.trainers import ppo, sft
from tests.assets import make_assets, make_rl_assets, small_ppo_args
from tests.test_trainers import metrics, run_args

FSDP = "parallel.single_rank_fsdp=true"


@pytest.fixture(scope="module")
def d():
    return init_distributed()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n=96)


@pytest.fixture(scope="module")
def rl(tmp_path_factory):
    return make_rl_assets(tmp_path_factory.mktemp("rl"))


def policy(d, fsdp: bool = False, **parallel):
    lm = tiny_causal_lm(40, seed=3)
    return shard(PolicyModel(lm), lm, ParallelConfig(single_rank_fsdp=fsdp, **parallel), d.device), lm


def test_a_one_rank_root_is_the_plain_module_and_fsdp2_is_a_setting(d):
    root, lm = policy(d)
    assert isinstance(root, PolicyModel) and isinstance(root, OneRankModule) and root.lm is lm
    assert not any(isinstance(m, FSDPModule) for m in root.modules())
    assert not any(isinstance(p, DTensor) for p in root.parameters())
    assert root.compute_dtype is None  # CPU: no mixed precision by default
    root.set_requires_gradient_sync(False)  # what the loops call: nothing to synchronise
    sharded, _ = policy(d, fsdp=True)
    assert isinstance(sharded, FSDPModule) and all(isinstance(p, DTensor) for p in sharded.parameters())
    # the same names and values either way: checkpoints and exports do not see the difference
    plain_state, sharded_state = full_state_dict(root), full_state_dict(sharded)
    assert plain_state.keys() == sharded_state.keys()
    for k, v in plain_state.items():
        assert torch.equal(v, sharded_state[k]), k


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(cpu_offload=True), "parallel.cpu_offload=true needs FSDP2, which a one-rank run skips"),
        (dict(mixed_precision="bf16"), "parallel.mixed_precision=bf16 on CPU needs FSDP2 on one rank"),
    ],
)
def test_what_only_fsdp2_does_is_refused_on_one_rank_naming_the_way_out(d, setting, message):
    with pytest.raises(ConfigError, match=message) as refused:
        policy(d, **setting)
    assert "parallel.single_rank_fsdp=true" in str(refused.value) and "\n" not in str(refused.value)
    # bf16 parameters need no mixed precision: nothing to refuse
    lm = tiny_causal_lm(40).to(torch.bfloat16)
    root = shard(PolicyModel(lm), lm, ParallelConfig(mixed_precision="bf16"), d.device)
    assert root.compute_dtype is None


def test_one_step_by_hand_matches_the_fsdp2_path(d):
    """The same micro-batch, loss, clip and AdamW step on both paths: equal loss, norm and updated weights."""
    ids = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    results = []
    for fsdp in (False, True):
        root, _ = policy(d, fsdp=fsdp)
        optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
        root.set_requires_gradient_sync(True)
        loss = -root(ids, torch.ones_like(ids), loss_mask=mask)["logp"].sum() / mask.sum()
        loss.backward()
        norm = clip_grad_norm(list(root.parameters()), 0.5)
        optimizer.step()
        results.append((loss.item(), norm.item(), full_state_dict(root)))
    (loss, norm, plain), (fsdp_loss, fsdp_norm, sharded) = results
    assert loss == pytest.approx(fsdp_loss, rel=1e-6) and norm == pytest.approx(fsdp_norm, rel=1e-5)
    assert norm > 0.5  # the clip acted, so it acted alike
    for k, v in plain.items():
        torch.testing.assert_close(v, sharded[k], rtol=1e-5, atol=1e-6, msg=k)


def numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/")) and isinstance(v, float)}


def test_the_first_ppo_step_matches_the_fsdp2_path(rl, tmp_path):
    """End to end (generate, score, advantages, update, export): the same rollout, losses and new weights."""
    common = ["train.steps=1", "rollout.max_new_tokens=8", "actor_optim.lr=1e-3", "critic_optim.lr=1e-3"]
    common += ["actor_optim.warmup_ratio=0", "critic_optim.warmup_ratio=0", "train.log_every=1"]
    for name, extra in (("plain", []), ("fsdp", [FSDP])):
        ppo.main(load_config("ppo", "toy", small_ppo_args(rl, tmp_path, name, *common, *extra)))
    (plain,), (sharded,) = metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp")
    a, b = numbers(plain), numbers(sharded)
    assert a.keys() == b.keys() and {"train/pg_loss", "train/vf_loss", "train/actor_grad_norm"} <= a.keys()
    for k, v in a.items():
        assert math.isfinite(v) and v == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for model in ("actor", "critic"):
        after = load_file(tmp_path / "plain" / "hf" / model / "model.safetensors")
        other = load_file(tmp_path / "fsdp" / "hf" / model / "model.safetensors")
        assert after.keys() == other.keys()
        for k, v in after.items():
            torch.testing.assert_close(v, other[k], rtol=1e-4, atol=1e-6, msg=f"{model} {k}")
    before = load_file(rl["model"] / "model.safetensors")
    actor = load_file(tmp_path / "plain" / "hf" / "actor" / "model.safetensors")
    assert any(not torch.equal(actor[k], before[k]) for k in before)  # the step did move the actor


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def test_checkpoints_move_between_the_plain_and_the_fsdp2_layout(assets, tmp_path):
    """SFT (the offline loop) on one rank: plain and FSDP2 train alike, write checkpoints of the same entries,
    and each resumes the other's at the right step with the same losses."""
    common = ("train.max_steps=5", "train.save_every=2", "run.keep_last=5", "train.log_every=1", "optim.lr=1e-2")
    sft.main(load_config("sft", None, run_args(assets, tmp_path, "sft", "plain", *common)))
    sft.main(load_config("sft", None, run_args(assets, tmp_path, "sft", "fsdp", *common, FSDP)))
    reference = losses(tmp_path / "plain")
    assert sorted(reference) == [1, 2, 3, 4, 5]
    for step, loss in losses(tmp_path / "fsdp").items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    plain_ckpt, fsdp_ckpt = checkpoint_dir(tmp_path / "plain", 2), checkpoint_dir(tmp_path / "fsdp", 2)
    entries = read_metadata(plain_ckpt / ".metadata").state_dict_metadata
    assert entries.keys() == read_metadata(fsdp_ckpt / ".metadata").state_dict_metadata.keys()

    # the plain save resumed under FSDP2, then that run's FSDP2 save resumed plain
    shutil.copytree(plain_ckpt, checkpoint_dir(tmp_path / "to_fsdp", 2))
    sft.main(load_config("sft", None, run_args(assets, tmp_path, "sft", "to_fsdp", *common, FSDP, "run.resume=auto")))
    shutil.copytree(checkpoint_dir(tmp_path / "to_fsdp", 4), checkpoint_dir(tmp_path / "back", 4))
    sft.main(load_config("sft", None, run_args(assets, tmp_path, "sft", "back", *common, "run.resume=auto")))
    for run, steps in (("to_fsdp", [3, 4, 5]), ("back", [5])):
        got = losses(tmp_path / run)
        assert sorted(got) == steps, run
        for step, loss in got.items():
            assert loss == pytest.approx(reference[step], rel=1e-5), f"{run} step {step}"
    final = load_file(tmp_path / "plain" / "hf" / "model.safetensors")
    for run in ("back", "to_fsdp"):
        for k, v in load_file(tmp_path / run / "hf" / "model.safetensors").items():
            torch.testing.assert_close(v, final[k], rtol=1e-4, atol=1e-6, msg=f"{run} {k}")
    manifest = json.loads((checkpoint_dir(tmp_path / "plain", 4) / "manifest.json").read_text())
    assert manifest["world_size"] == 1


def test_generation_under_mixed_precision_holds_bf16_parameters_then_gives_back_fp32(d):
    """The decode loop of a one-rank bf16 actor runs on bf16 copies (as FSDP2's gathered bf16 units would) and
    the fp32 values come back whole; set by hand here, since CPU refuses bf16 on one rank."""
    root, lm = policy(d)
    before = {k: v.clone() for k, v in root.state_dict().items()}
    root.compute_dtype = torch.bfloat16
    with gathered(root):
        assert {p.dtype for p in root.parameters()} == {torch.bfloat16}
        assert torch.equal(lm.lm_head.weight, before["lm.lm_head.weight"].bfloat16())
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())
    assert {p.dtype for p in root.parameters()} == {torch.float32}
    with compute_precision(root):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_one_rank_follows_fsdp2_mixed_precision(d):
    """On CUDA, mixed precision is on by default: one rank autocasts (fused head in bf16, fp32 gradients) where
    FSDP2 casts its parameters; both give the same log-probs and gradients up to bf16 rounding."""
    from rto.rollout.engine import RolloutBatch

    ids = torch.randint(1, 40, (4, 24), device=d.device, generator=torch.Generator(d.device).manual_seed(0))
    ones = torch.ones_like(ids)
    batch = RolloutBatch(ids, ones, ones.bool(), torch.zeros(ids.shape, device=d.device), ones[:, 0].bool())
    out = []
    for fsdp in (False, True):
        root, lm = policy(d, fsdp=fsdp)
        assert (root.compute_dtype == torch.bfloat16) if not fsdp else isinstance(root, FSDPModule)
        logp = policy_logp(root, batch, 1.0)
        logp.sum().backward()
        grad = lm.lm_head.weight.grad
        out.append((logp.detach().float(), (grad.full_tensor() if isinstance(grad, DTensor) else grad).float()))
        assert grad.dtype == torch.float32
    (logp, grad), (fsdp_logp, fsdp_grad) = out
    torch.testing.assert_close(logp, fsdp_logp, rtol=0.05, atol=0.05)
    assert float((grad - fsdp_grad).norm() / fsdp_grad.norm()) < 0.03  # bf16 rounding, not a different gradient
