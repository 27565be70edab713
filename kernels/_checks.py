"""Argument checks shared by the reference and the Triton paths: shapes, dtypes, option names.

Only metadata is inspected, never values, so the checks cost no host sync.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
SHAPINGS = ("ppo", "rto", "rs-ppo", "ddpo")


def _require_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def check_logprob_inputs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    _require_float("logits", logits)
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [N]={logits.shape[0]}, got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprobs: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_logprobs: hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    check_logprob_inputs(hidden.new_empty(hidden.shape[0], 0), targets, temperature)


def check_gae_inputs(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, names: tuple[str, str] = ("rewards", "values")
) -> None:
    if rewards.ndim != 2:
        raise ValueError(f"{names[0]} must be [B, T], got shape {tuple(rewards.shape)}")
    for name, t in zip(names, (rewards, values)):
        _require_float(name, t)
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have shape {tuple(rewards.shape)}, got {tuple(t.shape)}")
    if mask.shape != rewards.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(rewards.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )


def check_advantage_inputs(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_estimator: str,
    shaping: str,
) -> None:
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if shaping not in SHAPINGS:
        raise ValueError(f"shaping must be one of {SHAPINGS}, got {shaping!r}")
    if shaping != "ppo" and dpo_logp is None:
        raise ValueError(f"shaping={shaping!r} needs dpo_logp (the DPO model's log-probs); only 'ppo' works without")
    check_gae_inputs(logp, ref_logp, mask, names=("logp", "ref_logp"))
    if dpo_logp is not None:
        _require_float("dpo_logp", dpo_logp)
        if dpo_logp.shape != logp.shape:
            raise ValueError(f"dpo_logp must have shape {tuple(logp.shape)}, got {tuple(dpo_logp.shape)}")
    _require_float("score", score)
    if score.shape != logp.shape[:1]:
        raise ValueError(f"score must be [B]={logp.shape[0]}, got shape {tuple(score.shape)}")
