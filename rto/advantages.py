"""Rewards, advantages and returns of a scored rollout: a thin layer over `rto_kernels.rto_advantages`.

- gae: token rewards and GAE in one fused pass, with the critic's values.
- reinforce++: the same pass with zero values and lambda = 1, which makes advantages = returns = the discounted
  reward-to-go; the critic is not used.
Advantages are then whitened with the masked mean and variance over all ranks; returns are not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

import rto_kernels
from rto.config import PPOConfig
from rto.scoring import Scored


def compute_advantages(
    s: Scored, mask: torch.Tensor, cfg: PPOConfig, op: Callable = rto_kernels.rto_advantages
) -> tuple[torch.Tensor, ...]:
    """Returns (rewards, advantages, returns), each [B, T] fp32, zero off the response tokens. `op` is the fused
    kernel; the step benchmark's peer-style variant passes the unfused PyTorch reference of the same signature."""
    r = cfg.rewards
    reinforce = cfg.estimator == "reinforce++"
    rewards, adv, returns = op(
        s.logp_old,
        s.logp_ref,
        s.logp_dpo if cfg.algo != "ppo" else None,
        s.score,
        torch.zeros_like(s.values) if reinforce else s.values,
        mask,
        kl_coef=r.kl_coef,
        dpo_scale=r.dpo_scale,
        dpo_clip=r.dpo_clip,
        score_clip=r.score_clip,
        kl_estimator=r.kl_estimator,
        shaping=cfg.algo,
        gamma=r.gamma,
        lam=1.0 if reinforce else r.lam,
    )
    if cfg.train.whiten_advantages:
        adv = whiten(adv, mask)
    return rewards, adv, returns


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of x over the masked entries of all ranks."""
    xm = torch.where(mask, x, torch.zeros_like(x))
    stats = torch.stack([xm.sum(), mask.sum().to(x.dtype), (xm * xm).sum()]).double()
    if dist.is_initialized():
        dist.all_reduce(stats)
    n = stats[1].clamp(min=1)
    mean = stats[0] / n
    return mean, (stats[2] / n - mean * mean).clamp(min=0)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean, var = masked_moments(x, mask)
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + eps)
    return torch.where(mask, out, torch.zeros_like(out))
