"""rto_kernels: fused per-token math for RLHF (log-probs, token rewards + KL, GAE).

Each op runs its Triton kernel on CUDA tensors and, under `TRITON_INTERPRET=1`, on CPU tensors; anywhere
else it runs the PyTorch reference in `rto_kernels.reference`, which has the same signature. Contracts
and mask semantics: DESIGN.md ("Kernel contracts").
"""

from __future__ import annotations

import torch

from rto_kernels import advantages as _adv
from rto_kernels import logprobs as _lp
from rto_kernels import reference
from rto_kernels._runtime import interpreting, use_triton

__all__ = [
    "gae",
    "interpreting",
    "linear_logprobs",
    "logprobs_from_logits",
    "reference",
    "rto_advantages",
    "token_rewards",
    "use_triton",
]


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight.T / temperature)[i, targets[i]], without materialising [N, V].

    hidden [N, H] and weight [V, H] of one dtype (fp32, bf16 or fp16); targets [N] int64 in [0, V).
    Returns logp [N] fp32 (and entropy [N] fp32 if asked); differentiable w.r.t. hidden and weight.
    """
    if use_triton(hidden):
        return _lp.linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=return_entropy)
    return reference.linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=return_entropy)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / temperature)[i, targets[i]] for callers that already hold logits [N, V].

    Returns logp [N] fp32 (and entropy [N]); the backward writes grad_logits in the logits' dtype tile by
    tile, with no fp32 copy of the logits.
    """
    if use_triton(logits):
        return _lp.logprobs_from_logits(logits, targets, temperature=temperature, return_entropy=return_entropy)
    return reference.logprobs_from_logits(logits, targets, temperature=temperature, return_entropy=return_entropy)


def token_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    dpo_scale: float,
    dpo_clip: float | None,
    score_clip: float | None,
    kl_estimator: str = "k1",
    shaping: str = "rto",
) -> torch.Tensor:
    """Per-token rewards [B, T] fp32: -kl_coef * KL + the DPO token term (per `shaping`) + the score at the
    last valid token. logp, ref_logp, dpo_logp [B, T]; score [B]; mask [B, T] bool."""
    fn = _adv.token_rewards if use_triton(logp) else reference.token_rewards
    return fn(
        logp,
        ref_logp,
        dpo_logp,
        score,
        mask,
        kl_coef=kl_coef,
        dpo_scale=dpo_scale,
        dpo_clip=dpo_clip,
        score_clip=score_clip,
        kl_estimator=kl_estimator,
        shaping=shaping,
    )


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the valid positions of each row: (advantages, returns), each [B, T] fp32."""
    fn = _adv.gae if use_triton(rewards) else reference.gae
    return fn(rewards, values, mask, gamma=gamma, lam=lam)


def rto_advantages(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    dpo_scale: float,
    dpo_clip: float | None,
    score_clip: float | None,
    kl_estimator: str = "k1",
    shaping: str = "rto",
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_rewards and gae fused in one pass over each row: (rewards, advantages, returns), [B, T] fp32."""
    fn = _adv.rto_advantages if use_triton(logp) else reference.rto_advantages
    return fn(
        logp,
        ref_logp,
        dpo_logp,
        score,
        values,
        mask,
        kl_coef=kl_coef,
        dpo_scale=dpo_scale,
        dpo_clip=dpo_clip,
        score_clip=score_clip,
        kl_estimator=kl_estimator,
        shaping=shaping,
        gamma=gamma,
        lam=lam,
    )
