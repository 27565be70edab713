"""Scoring a rollout without gradients: policy, reference and DPO log-probs, critic values, reward-model scores.

Every log-prob comes from the fused head (`PolicyModel`); all per-token tensors are aligned to tokens as the
kernels expect: entry t of a row belongs to token t, and only response tokens are non-zero. The critic's
V(s_t) for action t is read from the hidden state of the position before t (REFERENCE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rto.config import RewardConfig
from rto.models import last_valid
from rto.rollout.engine import RolloutBatch


@dataclass
class Scored:
    logp_old: torch.Tensor  # [B, T] actor log-probs at rollout time
    logp_ref: torch.Tensor  # [B, T]
    logp_dpo: torch.Tensor | None  # [B, T] (None for algo=ppo)
    values: torch.Tensor  # [B, T] V(s_t) for each response token t (zeros without a critic)
    score: torch.Tensor  # [B] reward-model score, normalised if configured (clipped later, in the reward op)
    raw_score: torch.Tensor  # [B] reward-model score as the model gives it


def policy_logp(model: nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    return model(batch.input_ids, batch.attention_mask, loss_mask=batch.response_mask, temperature=temperature)["logp"]


def action_values(critic: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """V(s_t) for the action at t: the critic's output at position t - 1, on response tokens only."""
    v = critic(batch.input_ids, batch.attention_mask)  # [B, T]
    shifted = torch.zeros_like(v)
    shifted[:, 1:] = v[:, :-1]
    return torch.where(batch.response_mask, shifted, torch.zeros_like(shifted))


@torch.no_grad()
def score_rollout(batch: RolloutBatch, *, actor: nn.Module, ref: nn.Module, dpo: nn.Module | None,
                  critic: nn.Module | None, reward_model: nn.Module, rewards: RewardConfig, temperature: float,
                  micro_batch_size: int) -> Scored:  # fmt: skip
    parts = []
    for i in range(0, batch.input_ids.shape[0], micro_batch_size):
        mb = batch.select(slice(i, i + micro_batch_size))
        raw = last_valid(reward_model(mb.input_ids, mb.attention_mask), mb.attention_mask)  # [b]
        parts.append(dict(
            logp_old=policy_logp(actor, mb, temperature),
            logp_ref=policy_logp(ref, mb, temperature),
            logp_dpo=policy_logp(dpo, mb, temperature) if dpo is not None else None,
            values=action_values(critic, mb) if critic is not None else torch.zeros_like(mb.rollout_logp),
            raw_score=raw,
        ))  # fmt: skip
    cat = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
    score = cat["raw_score"]
    if rewards.score_mean is not None:
        score = (score - rewards.score_mean) / rewards.score_std
    return Scored(score=score, **cat)
