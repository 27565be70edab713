"""The logged numbers of one PPO/RTO step: per-rank sums over the rollout and the update, then the means.

`rollout_stats` sums over this rank's rollout; the caller reduces the sums over ranks, and `summarise` turns the
global sums into the metrics that are logged (names with units: `_s` seconds, `_per_token`, `_per_sequence`).
"""

from __future__ import annotations

import torch

import rto_kernels
from rto.config import PPOConfig
from rto.rollout.engine import RolloutBatch
from rto.scoring import Scored, off_support
from rto.tensors import is_last_valid


def rollout_stats(
    batch: RolloutBatch, s: Scored, rewards: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig
) -> dict[str, torch.Tensor]:
    """Sums over this rank's rollout (reduced over ranks by the caller)."""
    mask = batch.response_mask
    zero = torch.zeros((), device=mask.device)
    z = torch.zeros_like(rewards)
    if s.logp_dpo is not None:
        r = cfg.rewards
        z = rto_kernels.dpo_token_reward(s.logp_dpo, s.logp_ref, scale=r.dpo_scale, clip=r.dpo_clip)
    # the engine's log-prob of a forced EOS is that of the token it replaced: leave those tokens out
    compare = mask & ~(is_last_valid(mask) & batch.truncated[:, None])
    stats = {
        "sequences": torch.tensor(float(mask.shape[0]), device=mask.device),
        "response_tokens": mask.sum().float(),
        "score": s.raw_score.sum(),
        "truncated": batch.truncated.float().sum(),
        "reward_total": torch.where(mask, rewards, zero).sum(),
        "dpo_reward_total": torch.where(mask, z, zero).sum(),
        "kl_ref": torch.where(mask, s.logp_old - s.logp_ref, zero).sum(),
        "mismatch_abs": torch.where(compare, (batch.rollout_logp - s.logp_old).abs(), zero).sum(),
        "mismatch_tokens": compare.sum().float(),
    }
    if cfg.estimator == "gae":
        err = torch.where(mask, returns - s.values, zero)
        stats["ret_sum"], stats["ret_sq"] = (
            torch.where(mask, returns, zero).sum(),
            (torch.where(mask, returns, zero) ** 2).sum(),
        )
        stats["err_sum"], stats["err_sq"] = err.sum(), (err**2).sum()
    if s.logp_dpo is not None and cfg.rewards.dpo_support is not None:  # tokens given no DPO credit
        stats["dpo_unsupported"] = (mask & off_support(s.logp_ref, cfg.rewards.dpo_support)).sum().float()
    return stats


def summarise(r: dict[str, float], u: dict[str, float], seconds: dict[str, float], cfg: PPOConfig) -> dict[str, float]:
    n, tok = max(r["sequences"], 1), max(r["response_tokens"], 1)
    updates = max(u.get("actor_updates", 1), 1)
    m = {
        "rollout/score": r["score"] / n,
        "rollout/response_length": r["response_tokens"] / n,
        "rollout/max_response_length": r["max_length"],
        "rollout/truncated_fraction": r["truncated"] / n,
        "rollout/reward_per_sequence": r["reward_total"] / n,
        "rollout/dpo_reward_per_sequence": r["dpo_reward_total"] / n,
        "rollout/kl_ref_per_token": r["kl_ref"] / tok,
        "rollout/kl_ref_per_sequence": r["kl_ref"] / n,
        "rollout/logp_mismatch": r["mismatch_abs"] / max(r["mismatch_tokens"], 1),
        "train/pg_loss": u["pg_loss"] / max(u["tokens"], 1),
        "train/clip_fraction": u["clipped"] / max(u["tokens"], 1),
        "train/kl_old_k1": u["kl_old_k1"] / max(u["tokens"], 1),
        "train/kl_old_k3": u["kl_old_k3"] / max(u["tokens"], 1),
        "train/actor_grad_norm": u["actor_grad_norm"] / updates,
    }
    if "dpo_unsupported" in r:
        m["rollout/dpo_unsupported_fraction"] = r["dpo_unsupported"] / tok
    if "entropy" in u:
        m["train/entropy"] = u["entropy"] / max(u["tokens"], 1)
    if "vf_loss" in u:
        m["train/vf_loss"] = u["vf_loss"] / max(u["tokens"], 1)
        m["train/critic_grad_norm"] = u["critic_grad_norm"] / updates
        var_ret = r["ret_sq"] / tok - (r["ret_sum"] / tok) ** 2
        var_err = r["err_sq"] / tok - (r["err_sum"] / tok) ** 2
        m["train/value_explained_variance"] = 1 - var_err / var_ret if var_ret > 0 else 0.0
    for phase, sec in seconds.items():
        m[f"time/{phase}_s"] = sec
    m["time/step_s"] = sum(seconds.values())
    m["throughput/generate_tokens_per_s"] = r["response_tokens"] / max(seconds.get("generate", 0), 1e-9)
    return m
