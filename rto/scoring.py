"""Scoring a rollout without gradients: old, reference and DPO log-probs, critic values, reward-model scores.

Every log-prob comes from the fused head (`PolicyModel`) through the forwards in `rto.forward`; with `packing`
every forward runs padding-free and its outputs come back in the [B, T] layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rto.forward import Packed, action_values, policy_logp, token_values
from rto.rollout.engine import RolloutBatch
from rto.tensors import last_valid


@dataclass
class Scored:
    logp_old: torch.Tensor  # [B, T] actor log-probs at rollout time
    logp_ref: torch.Tensor  # [B, T]
    logp_dpo: torch.Tensor | None  # [B, T] (None for algo=ppo)
    values: torch.Tensor  # [B, T] V(s_t) for each response token t (zeros without a critic)
    score: torch.Tensor  # [B] reward-model score, normalised if configured (clipped later, in the reward op)
    raw_score: torch.Tensor  # [B] reward-model score as the model gives it


@torch.no_grad()
def score_rollout(
    batch: RolloutBatch,
    *,
    actor: nn.Module,
    ref: nn.Module,
    dpo: nn.Module | None,
    critic: nn.Module | None,
    reward_model: nn.Module,
    score_norm: tuple[float, float] | None,
    temperature: float,
    micro_batch_size: int,
    packing: bool = False,
    dpo_support: float | None = None,
) -> Scored:
    parts = []
    for i in range(0, batch.input_ids.shape[0], micro_batch_size):
        mb = batch.select(slice(i, i + micro_batch_size))
        packed = Packed.of(mb) if packing else None  # one layout for all five forwards
        raw = last_valid(token_values(reward_model, mb, packed), mb.attention_mask)  # [b]
        parts.append(
            dict(
                logp_old=policy_logp(actor, mb, temperature, packed),
                logp_ref=policy_logp(ref, mb, temperature, packed),
                logp_dpo=policy_logp(dpo, mb, temperature, packed) if dpo is not None else None,
                values=action_values(critic, mb, packed) if critic is not None else torch.zeros_like(mb.rollout_logp),
                raw_score=raw,
            )
        )
    cat = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
    if dpo_support is not None and cat["logp_dpo"] is not None:
        cat["logp_dpo"] = on_support(cat["logp_dpo"], cat["logp_ref"], dpo_support)
    score = cat["raw_score"]
    if score_norm is not None:  # (mean, std): rewards.score_mean/score_std, or what the reward model states
        score = (score - score_norm[0]) / score_norm[1]
    return Scored(score=score, **cat)


def on_support(logp_dpo: torch.Tensor, logp_ref: torch.Tensor, support: float) -> torch.Tensor:
    """The DPO log-probs with the log-ratio taken as 0 (logp_dpo := logp_ref) wherever the reference gives the
    token a probability below `support`: no DPO credit for tokens the reference would hardly produce, which is
    where a DPO model trained on few responses puts its largest, least informed log-ratios."""
    return torch.where(off_support(logp_ref, support), logp_ref, logp_dpo)


def off_support(logp_ref: torch.Tensor, support: float) -> torch.Tensor:
    """Where the reference gives the token a probability below `support` (the tokens on_support gives no DPO
    credit)."""
    return logp_ref < math.log(support)
