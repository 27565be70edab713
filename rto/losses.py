"""Loss functions of the offline trainers: pure functions over tensors, shapes in the docstrings.

Sequence log-prob sums h(y) = sum_t [log pi(y_t) - log pi_ref(y_t)] over response tokens; formulas from
docs/algorithm.md (DPO, IPO, R-DPO, SimPO, TDPO2, Bradley-Terry, and the PPO losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rto.families import HeadSpec, head_logits


def sft_loss(logp: torch.Tensor, n_tokens: int | torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood summed over the response tokens of logp [B, T] (0 elsewhere), divided by the
    number of response tokens of the whole optimizer step (all micro-batches, all ranks)."""
    return -logp.sum() / n_tokens


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_w - r_l) [P]."""
    return -F.logsigmoid(r_chosen - r_rejected)


def preference_loss(
    loss: str,
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    len_chosen: torch.Tensor,
    len_rejected: torch.Tensor,
    *,
    beta: float,
    rdpo_alpha: float = 0.001,
    simpo_gamma_beta_ratio: float = 0.5,
    tdpo_alpha: float = 0.2,
    kl_chosen: torch.Tensor | None = None,
    kl_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of the DPO family and the implicit rewards used for accuracy and margins.

    logp_* [P]: summed policy log-probs of the responses; ref_* [P]: the reference's (None for SimPO);
    len_* [P]: response lengths in tokens; kl_* [P]: TDPO's summed per-position KL(ref || policy).
    Returns (loss [P], reward_chosen [P], reward_rejected [P]); rewards carry no gradient.
    """
    if loss == "simpo":
        r_w = beta * logp_chosen / len_chosen
        r_l = beta * logp_rejected / len_rejected
        losses = -F.logsigmoid(r_w - r_l - simpo_gamma_beta_ratio * beta)
        return losses, r_w.detach(), r_l.detach()
    h_w = logp_chosen - ref_chosen
    h_l = logp_rejected - ref_rejected
    if loss == "dpo":
        losses = -F.logsigmoid(beta * (h_w - h_l))
    elif loss == "ipo":
        losses = (h_w - h_l - 1 / (2 * beta)) ** 2
    elif loss == "rdpo":
        losses = -F.logsigmoid(beta * h_w - beta * h_l + rdpo_alpha * (len_chosen - len_rejected))
    elif loss == "tdpo":
        if kl_chosen is None or kl_rejected is None:
            raise ValueError("the tdpo loss needs kl_chosen and kl_rejected")
        losses = -F.logsigmoid(beta * (h_w - h_l + tdpo_alpha * (kl_chosen.detach() - kl_rejected)))
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    return losses, beta * h_w.detach(), beta * h_l.detach()


def _kl_chunk(h, w, b, h_ref, w_ref, b_ref, head, ref_head) -> torch.Tensor:
    # hidden chunks take their head's dtype (under mixed precision the gathered reference head stays fp32); the
    # biases come in as arguments so that checkpointing keeps their gradient
    logp = torch.log_softmax(head_logits(h, w, _with_bias(head, b)), dim=-1)  # [C, V]
    logp_ref = torch.log_softmax(head_logits(h_ref, w_ref, _with_bias(ref_head, b_ref)), dim=-1)  # [C, V]
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)  # [C]


def _with_bias(head: HeadSpec | None, bias: torch.Tensor | None) -> HeadSpec | None:
    return None if head is None else HeadSpec(bias, head.logit_scale, head.softcap)


def full_vocab_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    chunk: int = 256,
    *,
    head: HeadSpec | None = None,
    ref_head: HeadSpec | None = None,
) -> torch.Tensor:
    """KL(pi_ref(.|s_t) || pi(.|s_t)) over the full vocabulary at each of N positions -> [N] fp32.

    hidden [N, H] and weight [V, H] of the policy (differentiable, with its head's bias), ref_* of the frozen
    reference; `head` / `ref_head` are the two heads' transforms (`rto.families.HeadSpec`; None: plain).
    Positions go in chunks under activation checkpointing, so at most one chunk's pair of [chunk, V] logits is
    alive, in the forward and again in the backward.
    """
    bias = None if head is None else head.bias
    ref_bias = None if ref_head is None else ref_head.bias
    out = []
    for i in range(0, hidden.shape[0], chunk):
        sl = slice(i, i + chunk)
        args = (hidden[sl], weight, bias, ref_hidden[sl], ref_weight, ref_bias, head, ref_head)
        out.append(checkpoint(_kl_chunk, *args, use_reentrant=False))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def ppo_policy_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate summed over response tokens: sum -min(ratio A, clip(ratio, 1 +- eps) A).

    All inputs [B, T]; mask [B, T] bool. Returns (loss sum, statistics summed over tokens: clipped tokens and
    the k1/k3 KL of the new policy to the rollout policy)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(mask, logp - logp_old, zero)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -torch.where(mask, surrogate, zero).sum()
    with torch.no_grad():
        clipped = mask & ((ratio - 1).abs() > clip_eps)
        k3 = torch.where(mask, ratio - 1 - log_ratio, zero).sum()
        stats = {"clipped": clipped.sum().float(), "kl_old_k1": -log_ratio.sum(), "kl_old_k3": k3}
    return loss, stats


def value_loss(
    values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Clipped value loss summed over response tokens: 0.5 max((v_clip - R)^2, (v - R)^2),
    v_clip = v_old + clip(v - v_old, -clip, clip). Inputs [B, T]."""
    v_clip = values_old + torch.clamp(values - values_old, -clip, clip)
    per_token = 0.5 * torch.maximum((v_clip - returns) ** 2, (values - returns) ** 2)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
