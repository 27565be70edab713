"""Scoring a rollout without gradients: policy, reference and DPO log-probs, critic values, reward-model scores.

Every log-prob comes from the fused head (`PolicyModel`); all per-token tensors are aligned to tokens as the
kernels expect: entry t of a row belongs to token t, and only response tokens are non-zero. The critic's
V(s_t) for action t is read from the hidden state of the position before t (REFERENCE.md). With `packing`
every forward runs padding-free (`Packed`) and its outputs come back in the [B, T] layout.
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


@dataclass
class Packed:
    """Right-padded rows [B, T] laid end to end in one row [1, N] (N = valid tokens), position ids restarting
    at 0 for each sequence: the padding-free layout. Attention keeps to each sequence: flash-attention reads
    the sequences from the position ids (varlen), SDPA / eager get a block-diagonal causal mask from them."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    response_mask: torch.Tensor  # [1, N] bool
    valid: torch.Tensor  # [B, T] bool: where the packed tokens came from

    @classmethod
    def of(cls, batch: RolloutBatch) -> Packed:
        valid = batch.attention_mask.bool()
        at = valid.nonzero(as_tuple=True)  # one host sync (the token count), shared by the three gathers
        positions = valid.long().cumsum(1) - 1  # right padding: each row's tokens are a prefix
        return cls(batch.input_ids[at][None], positions[at][None], batch.response_mask[at][None], valid)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[1, N] per-token values back to [B, T] (0 at padding); differentiable."""
        return torch.zeros(self.valid.shape, dtype=values.dtype, device=values.device).masked_scatter(
            self.valid, values[0]
        )


def policy_forward(model: nn.Module, batch: RolloutBatch, temperature: float, packed: Packed | None = None,
                   **kwargs) -> dict[str, torch.Tensor]:  # fmt: skip
    """`PolicyModel` outputs for the response tokens of `batch`, [B, T]; with `packed` (`Packed.of(batch)`) the
    forward runs padding-free. (A "hidden" output, [N, H] over the selected tokens, has the same row-major order
    either way.)"""
    if packed is None:
        return model(batch.input_ids, batch.attention_mask, loss_mask=batch.response_mask, temperature=temperature,
                     **kwargs)  # fmt: skip
    p = packed
    out = model(p.input_ids, None, p.position_ids, loss_mask=p.response_mask, temperature=temperature, **kwargs)
    return {k: v if k == "hidden" else p.unpack(v) for k, v in out.items()}


def policy_logp(model: nn.Module, batch: RolloutBatch, temperature: float,
                packed: Packed | None = None) -> torch.Tensor:  # fmt: skip
    return policy_forward(model, batch, temperature, packed)["logp"]


def token_values(model: nn.Module, batch: RolloutBatch, packed: Packed | None = None) -> torch.Tensor:
    """A `ScalarModel`'s output at every token [B, T] (0 at padding when packed)."""
    if packed is None:
        return model(batch.input_ids, batch.attention_mask)
    return packed.unpack(model(packed.input_ids, None, packed.position_ids))


def action_values(critic: nn.Module, batch: RolloutBatch, packed: Packed | None = None) -> torch.Tensor:
    """V(s_t) for the action at t: the critic's output at position t - 1, on response tokens only."""
    v = token_values(critic, batch, packed)  # [B, T]
    shifted = torch.zeros_like(v)
    shifted[:, 1:] = v[:, :-1]
    return torch.where(batch.response_mask, shifted, torch.zeros_like(shifted))


@torch.no_grad()
def score_rollout(batch: RolloutBatch, *, actor: nn.Module, ref: nn.Module, dpo: nn.Module | None,
                  critic: nn.Module | None, reward_model: nn.Module, rewards: RewardConfig, temperature: float,
                  micro_batch_size: int, packing: bool = False) -> Scored:  # fmt: skip
    parts = []
    for i in range(0, batch.input_ids.shape[0], micro_batch_size):
        mb = batch.select(slice(i, i + micro_batch_size))
        packed = Packed.of(mb) if packing else None  # one layout for all five forwards
        raw = last_valid(token_values(reward_model, mb, packed), mb.attention_mask)  # [b]
        parts.append(dict(
            logp_old=policy_logp(actor, mb, temperature, packed),
            logp_ref=policy_logp(ref, mb, temperature, packed),
            logp_dpo=policy_logp(dpo, mb, temperature, packed) if dpo is not None else None,
            values=action_values(critic, mb, packed) if critic is not None else torch.zeros_like(mb.rollout_logp),
            raw_score=raw,
        ))  # fmt: skip
    cat = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
    score = cat["raw_score"]
    if rewards.score_mean is not None:
        score = (score - rewards.score_mean) / rewards.score_std
    return Scored(score=score, **cat)
