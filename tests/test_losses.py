"""Loss functions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rto.losses import bradley_terry_loss, full_vocab_kl, preference_loss, sft_loss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sft_and_bradley_terry():
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]])
    assert sft_loss(logp, 3).item() == pytest.approx(3.5 / 3)
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([-logsig(1.0), -logsig(-1.0)]))


# One pair: policy sums, reference sums and lengths.
LW, LL, RW, RL, NW, NL = -10.0, -14.0, -11.0, -12.0, 5.0, 8.0
HW, HL = LW - RW, LL - RL  # 1, -2


def _pref(loss, **kw):
    t = lambda x: torch.tensor([x])  # noqa: E731
    return preference_loss(loss, t(LW), t(LL), t(RW), t(RL), t(NW), t(NL), **kw)


@pytest.mark.parametrize(
    "loss,kw,expected",
    [
        ("dpo", dict(beta=0.1), -logsig(0.1 * (HW - HL))),
        ("ipo", dict(beta=0.1), (HW - HL - 1 / 0.2) ** 2),
        ("rdpo", dict(beta=0.1, rdpo_alpha=0.01), -logsig(0.1 * HW - 0.1 * HL + 0.01 * (NW - NL))),
        ("simpo", dict(beta=2.5, simpo_gamma_beta_ratio=0.5), -logsig(2.5 * LW / NW - 2.5 * LL / NL - 1.25)),
    ],
)
def test_preference_losses_by_hand(loss, kw, expected):
    losses, r_w, r_l = _pref(loss, **kw)
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    if loss == "simpo":
        assert (r_w.item(), r_l.item()) == pytest.approx((2.5 * LW / NW, 2.5 * LL / NL))
    else:
        assert (r_w.item(), r_l.item()) == pytest.approx((kw["beta"] * HW, kw["beta"] * HL))


def test_tdpo_by_hand_with_stop_gradient_on_the_chosen_kl():
    kl_w = torch.tensor([0.3], requires_grad=True)
    kl_l = torch.tensor([0.7], requires_grad=True)
    losses, _, _ = _pref("tdpo", beta=0.1, tdpo_alpha=0.2, kl_chosen=kl_w, kl_rejected=kl_l)
    expected = -logsig(0.1 * (HW - HL + 0.2 * (0.3 - 0.7)))
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    losses.sum().backward()
    assert kl_w.grad is None or kl_w.grad.abs().item() == 0  # sg(D(y_w))
    assert kl_l.grad.item() != 0
    with pytest.raises(ValueError, match="needs kl_chosen"):
        _pref("tdpo", beta=0.1)


def test_full_vocab_kl_matches_direct_computation_and_gradient():
    g = torch.Generator().manual_seed(0)
    N, H, V = 7, 5, 11
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    h_ref, w_ref = (
        torch.randn(N, H, generator=g, dtype=torch.float64),
        torch.randn(V, H, generator=g, dtype=torch.float64),
    )
    kl = full_vocab_kl(h, w, h_ref, w_ref, chunk=3)  # 3 chunks, the last short
    p_ref = torch.softmax(h_ref @ w_ref.T, -1)
    direct = (p_ref * (torch.log(p_ref) - torch.log_softmax(h @ w.T, -1))).sum(-1)
    torch.testing.assert_close(kl.double(), direct, rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-6).all()
    kl.sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    direct.sum().backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)
    assert full_vocab_kl(h[:0], w, h_ref[:0], w_ref).shape == (0,)
