"""rto_kernels: fused per-token math for RLHF (log-probs, token rewards + KL, GAE).

Each op runs its Triton kernel on CUDA tensors and, under `TRITON_INTERPRET=1`, on CPU tensors; anywhere
else it runs the PyTorch reference in `rto_kernels.reference`, which has the same signature, except
`linear_logprobs`, which runs `rto_kernels.chunked` there (row chunks with recompute, so that the CPU trainer
never holds [N, V] logits either; the reference stays the oracle). Contracts and mask semantics:
docs/kernels.md; the reward formulas and their sources: docs/algorithm.md.

One module per op: `linear_logprobs_op`, `logprobs_from_logits_op` and `rto_advantages_op` (token_rewards, gae
and their fusion share one kernel) register the `rto::` ops; the functions here check arguments and dispatch.
"""

from __future__ import annotations

import torch

from rto_kernels import chunked, reference
from rto_kernels import linear_logprobs_op as _linear_logprobs_op  # noqa: F401  (registers the rto:: ops)
from rto_kernels import logprobs_from_logits_op as _logprobs_from_logits_op  # noqa: F401
from rto_kernels import rto_advantages_op as _rto_advantages_op  # noqa: F401
from rto_kernels._checks import (
    KL_ESTIMATORS,
    SHAPINGS,
    check_advantage_inputs,
    check_gae_inputs,
    check_linear_inputs,
    check_logprob_inputs,
)
from rto_kernels._runtime import interpreting, use_triton
from rto_kernels.reference import dpo_token_reward, head_logits

__all__ = [
    "KL_ESTIMATORS",
    "SHAPINGS",
    "chunked",
    "dpo_token_reward",
    "gae",
    "head_logits",
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
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(l)[i, targets[i]] for the head's logits l, without materialising [N, V].

    z = (hidden @ weight.T + bias) * logit_scale; z = softcap * tanh(z / softcap) if a softcap is given; l = z /
    temperature (the order the model families apply them: docs/kernels.md). hidden [N, H] and weight [V, H] of one
    dtype (fp32, bf16 or fp16), bias [V] of that dtype or None; targets [N] int64 in [0, V). Returns logp [N] fp32
    (and the entropy of softmax(l) [N] fp32 if asked); differentiable w.r.t. hidden, weight and bias.
    Targets are not range-checked (that would cost a host sync): one outside [0, V) gives -inf on the Triton
    path and an index error on the reference.
    """
    head = dict(bias=bias, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    if not use_triton(hidden):
        return chunked.linear_logprobs(hidden, weight, targets, **head, return_entropy=return_entropy)
    check_linear_inputs(hidden, weight, targets, temperature, bias, logit_scale, softcap)
    args = (bias, float(logit_scale), _opt_float(softcap), float(temperature), bool(return_entropy))
    logp, entropy, _ = torch.ops.rto.linear_logprobs(hidden, weight, targets, *args)
    return (logp, entropy) if return_entropy else logp


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(l)[i, targets[i]] for callers that already hold raw logits [N, V], l as in `linear_logprobs`
    (`head_logits`: times logit_scale, softcapped, over the temperature).

    Returns logp [N] fp32 (and entropy [N]); the backward writes grad_logits in the logits' dtype tile by
    tile, with no fp32 copy of the logits.
    """
    head = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    if not use_triton(logits):
        return reference.logprobs_from_logits(logits, targets, **head, return_entropy=return_entropy)
    check_logprob_inputs(logits, targets, temperature, logit_scale, softcap)
    args = (float(logit_scale), _opt_float(softcap), float(temperature), bool(return_entropy))
    logp, entropy, _ = torch.ops.rto.logprobs_from_logits(logits, targets, *args)
    return (logp, entropy) if return_entropy else logp


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
    reward_kw = dict(kl_coef=kl_coef, dpo_scale=dpo_scale, dpo_clip=dpo_clip, score_clip=score_clip)
    reward_kw.update(kl_estimator=kl_estimator, shaping=shaping)
    if not use_triton(logp):
        return reference.token_rewards(logp, ref_logp, dpo_logp, score, mask, **reward_kw)
    check_advantage_inputs(logp, ref_logp, dpo_logp, score, mask, kl_estimator=kl_estimator, shaping=shaping)
    return torch.ops.rto.token_rewards(logp, ref_logp, dpo_logp, score, mask, *_reward_args(**reward_kw))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the valid positions of each row: (advantages, returns), each [B, T] fp32."""
    if not use_triton(rewards):
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    check_gae_inputs(rewards, values, mask)
    return torch.ops.rto.gae(rewards, values, mask, float(gamma), float(lam))


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
    reward_kw = dict(kl_coef=kl_coef, dpo_scale=dpo_scale, dpo_clip=dpo_clip, score_clip=score_clip)
    reward_kw.update(kl_estimator=kl_estimator, shaping=shaping)
    if not use_triton(logp):
        return reference.rto_advantages(
            logp, ref_logp, dpo_logp, score, values, mask, **reward_kw, gamma=gamma, lam=lam
        )
    check_advantage_inputs(logp, ref_logp, dpo_logp, score, mask, kl_estimator=kl_estimator, shaping=shaping)
    check_gae_inputs(logp, values, mask, names=("logp", "values"))
    return torch.ops.rto.rto_advantages(
        logp, ref_logp, dpo_logp, score, values, mask, *_reward_args(**reward_kw), float(gamma), float(lam)
    )


def _opt_float(x: float | None) -> float | None:
    return None if x is None else float(x)


def _reward_args(*, kl_coef, dpo_scale, dpo_clip, score_clip, kl_estimator, shaping) -> tuple:
    """The reward settings as the rto:: ops take them: positional, with plain floats."""
    return float(kl_coef), float(dpo_scale), _opt_float(dpo_clip), _opt_float(score_clip), kl_estimator, shaping
