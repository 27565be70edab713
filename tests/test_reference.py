"""The PyTorch reference ops (the CPU path and the kernels' oracle) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

import rto_kernels
from rto_kernels import reference

T_, F_ = True, False


def test_cpu_tensors_use_the_reference_without_the_interpreter():
    assert not rto_kernels.interpreting()
    assert not rto_kernels.use_triton(torch.zeros(1))


def test_gae_by_hand_with_a_hole():
    # valid positions 0, 2, 3 (1 is a hole, 4 is padding); gamma 0.9, lambda 0.5
    r = torch.tensor([[1.0, 99.0, 2.0, 3.0, 99.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 99.0, 1.0, 2.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[T_, F_, T_, T_, F_]])
    g, lam = 0.9, 0.5
    d3 = 3.0 + g * 0.0 - 2.0  # last valid: next value 0
    d2 = 2.0 + g * 2.0 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5  # the hole is skipped: next value is position 2's
    a3 = d3
    a2 = d2 + g * lam * a3
    a0 = d0 + g * lam * a2
    adv, ret = reference.gae(r, v, mask, gamma=g, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2, a3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 1.0, a3 + 2.0, 0.0]], dtype=torch.float64))
    assert adv.dtype == torch.float64


def _rewards_case():
    logp = torch.tensor([[-1.0, -2.0, float("nan"), -0.5]])
    ref = torch.tensor([[-1.5, -1.0, float("nan"), -0.5]])
    dpo = torch.tensor([[-0.5, -3.0, float("nan"), 0.5]])
    mask = torch.tensor([[T_, T_, F_, T_]])
    return logp, ref, dpo, torch.tensor([25.0]), mask


@pytest.mark.parametrize("shaping", ["ppo", "rto", "rs-ppo", "ddpo"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_token_rewards_by_hand(shaping, kl_estimator):
    logp, ref, dpo, score, mask = _rewards_case()
    k, s, c = 0.1, 0.5, 0.4
    d = [0.5, -1.0, None, 0.0]
    kl = {
        "k1": lambda x: x,
        "k2": lambda x: 0.5 * x * x,
        "k3": lambda x: math.exp(-x) - 1 + x,
    }[kl_estimator]
    z = [max(-c, min(c, s * (a - b))) for a, b in ((-0.5, -1.5), (-3.0, -1.0), (0.0, 0.0), (0.5, -0.5))]
    assert z == [0.4, -0.4, 0.0, 0.4]  # the first and the last are clipped
    base = [-k * kl(d[0]), -k * kl(d[1]), 0.0, -k * kl(d[3])]
    z_sum = z[0] + z[1] + z[3]
    expected = list(base)
    if shaping in ("rto", "rs-ppo"):
        expected = [b + zi if i != 2 else 0.0 for i, (b, zi) in enumerate(zip(base, z))]
    if shaping == "rs-ppo":
        expected[3] -= z_sum
    if shaping == "ddpo":
        expected[3] += z_sum
    expected[3] += 10.0  # score 25 clipped to 10 at the last valid position
    got = reference.token_rewards(
        logp,
        ref,
        dpo if shaping != "ppo" else None,
        score,
        mask,
        kl_coef=k,
        dpo_scale=s,
        dpo_clip=c,
        score_clip=10.0,
        kl_estimator=kl_estimator,
        shaping=shaping,
    )
    torch.testing.assert_close(got, torch.tensor([expected]), rtol=0, atol=1e-6)
    if shaping == "rs-ppo":  # pure shaping: the row's total equals the KL part plus the score
        torch.testing.assert_close(got.sum(), torch.tensor(sum(base) + 10.0), rtol=0, atol=1e-6)


def test_empty_row_and_no_clip():
    logp, ref, dpo, _, _ = _rewards_case()
    mask = torch.zeros(1, 4, dtype=torch.bool)
    got = reference.rto_advantages(
        logp,
        ref,
        dpo,
        torch.tensor([float("nan")]),
        logp,
        mask,
        kl_coef=0.1,
        dpo_scale=1.0,
        dpo_clip=None,
        score_clip=None,
        gamma=1.0,
        lam=1.0,
    )
    for out in got:
        torch.testing.assert_close(out, torch.zeros(1, 4), rtol=0, atol=0)
    one = torch.tensor([[T_, F_, F_, F_]])
    r = reference.token_rewards(
        logp, ref, dpo, torch.tensor([25.0]), one, kl_coef=0.0, dpo_scale=1.0, dpo_clip=None, score_clip=None
    )
    torch.testing.assert_close(r, torch.tensor([[1.0 + 25.0, 0.0, 0.0, 0.0]]))  # no clips: 1.0 + 25


def test_logprobs_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    targets = torch.tensor([1, 0])
    logp, ent = reference.logprobs_from_logits(logits, targets, return_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75), math.log(0.5)]))
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(ent, torch.tensor([h0, math.log(2.0)]))
    # temperature 2 halves the logits; linear head with identity weight = the same logits
    logp_t = reference.linear_logprobs(logits, torch.eye(2), targets, temperature=2.0)
    torch.testing.assert_close(logp_t, torch.tensor([math.log(3**0.5 / (1 + 3**0.5)), math.log(0.5)]))


def test_public_ops_equal_reference_on_cpu():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 8, generator=gen), torch.randn(20, 8, generator=gen)
    tgt = torch.randint(0, 20, (6,), generator=gen)
    torch.testing.assert_close(rto_kernels.linear_logprobs(h, w, tgt), reference.linear_logprobs(h, w, tgt))
    logp, ref, dpo, score, mask = _rewards_case()
    kw = dict(kl_coef=0.1, dpo_scale=0.5, dpo_clip=0.4, score_clip=10.0)
    torch.testing.assert_close(
        rto_kernels.token_rewards(logp, ref, dpo, score, mask, **kw),
        reference.token_rewards(logp, ref, dpo, score, mask, **kw),
    )


def test_reference_refuses_bad_arguments():
    logp, ref, dpo, score, mask = _rewards_case()
    with pytest.raises(ValueError, match="needs dpo_logp"):
        reference.token_rewards(
            logp, ref, None, score, mask, kl_coef=0.1, dpo_scale=1.0, dpo_clip=None, score_clip=None, shaping="ddpo"
        )
    with pytest.raises(TypeError, match="targets must be int64"):
        reference.logprobs_from_logits(logp, torch.zeros(1, dtype=torch.int32))
