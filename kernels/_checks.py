"""Argument checks shared by the reference and the Triton paths: shapes, dtypes, option names.

Only metadata is inspected, never values, so the checks cost no host sync.
"""

from __future__ import annotations

import math

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
SHAPINGS = ("ppo", "rto", "rs-ppo", "ddpo")


def _require_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def check_head_options(op: str, logit_scale: float, softcap: float | None, temperature: float) -> None:
    """The head transform's settings (docs/kernels.md): finite numbers > 0 (softcap None: no softcap)."""
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap), ("temperature", temperature)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")


def check_logprob_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    op: str = "logprobs_from_logits",
) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{op}: logits must be [N, V], got shape {tuple(logits.shape)}")
    _require_float("logits", logits)
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"{op}: targets must be [N]={logits.shape[0]}, got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
    check_head_options(op, logit_scale, softcap, temperature)


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> None:
    op = "linear_logprobs"
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    check_logprob_inputs(hidden.new_empty(hidden.shape[0], 0), targets, temperature, logit_scale, softcap, op)
    V = weight.shape[0]
    if bias is not None and (bias.shape != (V,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"{op}: bias must be [V]={V} of the weight's dtype {weight.dtype}, got {bias.dtype} {tuple(bias.shape)}"
        )


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
