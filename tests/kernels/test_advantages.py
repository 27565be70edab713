"""token_rewards, gae and the fused rto_advantages: Triton kernels against the float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import rto_kernels
from rto_kernels import reference
from tests.kernels._util import DEVICES, assert_close_to_truth

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5}  # the kernel computes in fp32 from the given inputs


def _batch(gen, B, T, device, dtype=torch.float32, *, hole_rate=0.3, plant_nan=True):
    """Random scored rollouts with holes in the mask, a row with no valid token (B > 1), a row whose valid
    tokens stop early, and NaN/inf planted at every masked position of every input."""
    mask = torch.rand(B, T, generator=gen) > hole_rate
    if B > 1:
        mask[1] = False
    if B > 2 and T > 3:
        mask[2, -3:] = False
    logp = -torch.rand(B, T, generator=gen) * 3
    ref_logp = logp + torch.randn(B, T, generator=gen) * 0.3
    dpo_logp = logp + torch.randn(B, T, generator=gen) * 0.5
    values = torch.randn(B, T, generator=gen)
    score = torch.randn(B, generator=gen) * 8  # some beyond the score clip
    tensors = [logp, ref_logp, dpo_logp, values]
    if plant_nan:
        for i, x in enumerate(tensors):
            x[~mask] = float("nan") if i % 2 == 0 else float("inf")
        score[~mask.any(1)] = float("nan")  # a row with no valid token: its score is never used
    logp, ref_logp, dpo_logp, values = (x.to(dtype).to(device) for x in tensors)
    return logp, ref_logp, dpo_logp, score.to(dtype).to(device), values, mask.to(device)


def _fp64(*xs):
    return [x.double() if x is not None and x.is_floating_point() else x for x in xs]


def _assert_masked_zero(mask, *outs):
    for out in outs:
        assert (out[~mask] == 0).all(), "a masked position has a non-zero output"
        assert torch.isfinite(out).all(), "non-finite output"


SHAPES = [(5, 37), (3, 1), (4, 100), (1, 16), (2, 33)]
SETTINGS = list(itertools.product(["ppo", "rto", "rs-ppo", "ddpo"], ["k1", "k2", "k3"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("shaping,kl_estimator", SETTINGS)
def test_rto_advantages_matches_fp64(gen, device, B, T, shaping, kl_estimator):
    logp, ref_logp, dpo_logp, score, values, mask = _batch(gen, B, T, device)
    clip = (B * T) % 2 == 0  # half the shapes with both clips, half with none
    kw = dict(
        kl_coef=0.05,
        dpo_scale=0.5,
        dpo_clip=0.2 if clip else None,
        score_clip=5.0 if clip else None,
        kl_estimator=kl_estimator,
        shaping=shaping,
        gamma=0.99,
        lam=0.95,
    )
    got = rto_kernels.rto_advantages(logp, ref_logp, dpo_logp, score, values, mask, **kw)
    truth = reference.rto_advantages(*_fp64(logp, ref_logp, dpo_logp, score, values), mask, **kw)
    for name, g, t in zip(["rewards", "advantages", "returns"], got, truth):
        assert g.dtype == torch.float32
        assert_close_to_truth(name, g, t, None, ATOL[torch.float32])
    _assert_masked_zero(mask, *got)
    # the separate ops agree with the fused one
    rewards = rto_kernels.token_rewards(
        logp, ref_logp, dpo_logp, score, mask, **{k: v for k, v in kw.items() if k not in ("gamma", "lam")}
    )
    torch.testing.assert_close(rewards, got[0], rtol=0, atol=1e-6)
    adv, ret = rto_kernels.gae(got[0], values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, got[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(ret, got[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (1.0, 0.95)])
def test_gae_extreme_discounts(gen, device, gamma, lam):
    _, _, _, _, values, mask = _batch(gen, 4, 45, device)
    rewards = torch.randn(4, 45, generator=gen).to(device)
    rewards[~mask] = float("nan")
    got = rto_kernels.gae(rewards, values, mask, gamma=gamma, lam=lam)
    truth = reference.gae(*_fp64(rewards, values), mask, gamma=gamma, lam=lam)
    for name, g, t in zip(["advantages", "returns"], got, truth):
        assert_close_to_truth(name, g, t, None, ATOL[torch.float32])
    _assert_masked_zero(mask, *got)


@pytest.mark.parametrize("device", DEVICES)
def test_gae_long_undiscounted_row(gen, device):
    # gamma * lam = 1 over hundreds of tokens: a closed form with powers would overflow, the scan does not
    T = 300
    mask = torch.ones(2, T, dtype=torch.bool)
    rewards = torch.full((2, T), 1.0)
    values = torch.zeros(2, T)
    adv, ret = rto_kernels.gae(rewards.to(device), values.to(device), mask.to(device), gamma=1.0, lam=1.0)
    expected = torch.arange(T, 0, -1, dtype=torch.float32).expand(2, T)  # reward-to-go
    torch.testing.assert_close(adv.cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(ret.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inputs(gen, device):
    logp, ref_logp, dpo_logp, score, values, mask = _batch(gen, 3, 40, device, dtype=torch.bfloat16)
    kw = dict(
        kl_coef=0.01,
        dpo_scale=0.05,
        dpo_clip=0.05,
        score_clip=10.0,
        kl_estimator="k3",
        shaping="rto",
        gamma=1.0,
        lam=0.95,
    )
    got = rto_kernels.rto_advantages(logp, ref_logp, dpo_logp, score, values, mask, **kw)
    truth = reference.rto_advantages(*_fp64(logp, ref_logp, dpo_logp, score, values), mask, **kw)
    for name, g, t in zip(["rewards", "advantages", "returns"], got, truth):
        assert_close_to_truth(name, g, t, None, ATOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_empty_and_zero_length(device):
    B, T = 3, 10
    z = torch.zeros(B, T, device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    nan = torch.full((B, T), float("nan"), device=device)
    r, a, ret = rto_kernels.rto_advantages(
        nan,
        nan,
        nan,
        torch.full((B,), float("nan"), device=device),
        nan,
        mask,
        kl_coef=0.1,
        dpo_scale=1.0,
        dpo_clip=None,
        score_clip=None,
        gamma=1.0,
        lam=1.0,
    )
    for out in (r, a, ret):
        torch.testing.assert_close(out, z, rtol=0, atol=0)
    empty = torch.zeros(2, 0, device=device)
    outs = rto_kernels.gae(empty, empty, torch.zeros(2, 0, dtype=torch.bool, device=device), gamma=1.0, lam=1.0)
    assert all(o.shape == (2, 0) for o in outs)


@pytest.mark.parametrize("device", DEVICES)
def test_public_ops_dispatch_to_triton(gen, device, monkeypatch):
    logp, ref_logp, dpo_logp, score, values, mask = _batch(gen, 2, 9, device)
    assert rto_kernels.use_triton(logp)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the Triton kernel should have")

    for name in ("token_rewards", "gae", "rto_advantages"):
        monkeypatch.setattr(reference, name, refuse)
    kw = dict(kl_coef=0.1, dpo_scale=1.0, dpo_clip=None, score_clip=None)
    gae_kw = dict(gamma=1.0, lam=0.9)
    rewards, adv, ret = rto_kernels.rto_advantages(logp, ref_logp, dpo_logp, score, values, mask, **kw, **gae_kw)
    torch.testing.assert_close(rto_kernels.token_rewards(logp, ref_logp, dpo_logp, score, mask, **kw), rewards)
    torch.testing.assert_close(rto_kernels.gae(rewards, values, mask, **gae_kw), (adv, ret))


def test_bad_arguments_raise_clear_errors(gen):
    logp, ref_logp, dpo_logp, score, values, mask = _batch(gen, 2, 5, "cpu")
    kw = dict(kl_coef=0.1, dpo_scale=1.0, dpo_clip=None, score_clip=None)
    with pytest.raises(ValueError, match="shaping='rto' needs dpo_logp"):
        rto_kernels.token_rewards(logp, ref_logp, None, score, mask, **kw)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        rto_kernels.token_rewards(logp, ref_logp, dpo_logp, score, mask, **kw, kl_estimator="k4")
    with pytest.raises(ValueError, match="shaping must be one of"):
        rto_kernels.token_rewards(logp, ref_logp, dpo_logp, score, mask, **kw, shaping="dpo")
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        rto_kernels.gae(logp, values, mask.float(), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="score must be \\[B\\]=2"):
        rto_kernels.token_rewards(logp, ref_logp, dpo_logp, score[:1], mask, **kw)
    with pytest.raises(ValueError, match="values must have shape"):
        rto_kernels.gae(logp, values[:, :3], mask, gamma=1.0, lam=1.0)


def test_dpo_token_reward_by_hand():
    # the one PyTorch definition of the clipped DPO token term, which the reference's token_rewards uses
    dpo = torch.tensor([[0.0, 1.0, -3.0], [0.5, 0.5, 0.5]])
    ref = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.3, 0.5]])
    clipped = rto_kernels.dpo_token_reward(dpo.bfloat16(), ref.bfloat16(), scale=0.5, clip=0.2)
    assert clipped.dtype == torch.float32
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.2, -0.2], [-0.2, 0.1, 0.0]]), rtol=0, atol=2e-3)
    free = rto_kernels.dpo_token_reward(dpo.double(), ref.double(), scale=0.5, clip=None)
    assert free.dtype == torch.float64
    torch.testing.assert_close(free, torch.tensor([[0.0, 0.5, -1.5], [-0.25, 0.1, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_advantage_ops(gen, device):
    logp, ref_logp, dpo_logp, score, values, mask = _batch(gen, 3, 20, device, plant_nan=False)
    torch.library.opcheck(
        torch.ops.rto.token_rewards.default,
        (logp, ref_logp, dpo_logp, score, mask, 0.1, 0.5, 0.2, 10.0, "k3", "rs-ppo"),
    )
    torch.library.opcheck(
        torch.ops.rto.token_rewards.default, (logp, ref_logp, None, score, mask, 0.1, 0.5, None, None, "k1", "ppo")
    )
    torch.library.opcheck(torch.ops.rto.gae.default, (logp, values, mask, 0.99, 0.95))
    torch.library.opcheck(
        torch.ops.rto.rto_advantages.default,
        (logp, ref_logp, dpo_logp, score, values, mask, 0.1, 0.5, 0.2, 10.0, "k2", "ddpo", 1.0, 0.95),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shaping", ["rto", "rs-ppo"])
def test_rto_advantages_realistic_gpu(gen, shaping):
    logp, ref_logp, dpo_logp, score, values, mask = _batch(gen, 512, 2048, "cuda")
    kw = dict(
        kl_coef=0.01,
        dpo_scale=0.05,
        dpo_clip=0.05,
        score_clip=10.0,
        kl_estimator="k1",
        shaping=shaping,
        gamma=1.0,
        lam=0.95,
    )
    got = rto_kernels.rto_advantages(logp, ref_logp, dpo_logp, score, values, mask, **kw)
    truth = reference.rto_advantages(*_fp64(logp, ref_logp, dpo_logp, score, values), mask, **kw)
    for name, g, t in zip(["rewards", "advantages", "returns"], got, truth):
        assert_close_to_truth(name, g, t, None, 1e-4)  # 2048-step sums in fp32
    _assert_masked_zero(mask, *got)
