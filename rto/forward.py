"""The forwards of a rollout batch that both scoring (no gradients) and the PPO update (with gradients) run.

- `Packed`: the padding-free layout of a right-padded batch (one layout per micro-batch, shared by its forwards);
- `policy_forward`: a `PolicyModel`'s per-token outputs (log-probs of the taken tokens, optionally entropy);
- `token_values` / `action_values`: a `ScalarModel`'s output per token, and the critic's V(s_t) for action t.
Per-token tensors are aligned to tokens as the kernels expect: entry t of a row belongs to token t, and only
response tokens are non-zero. The critic's V(s_t) for action t is read from the hidden state of the position
before t (docs/algorithm.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rto.rollout.engine import RolloutBatch


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


def policy_forward(
    model: nn.Module, batch: RolloutBatch, temperature: float, packed: Packed | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """`PolicyModel` outputs for the response tokens of `batch`, [B, T]; with `packed` (`Packed.of(batch)`) the
    forward runs padding-free. (A "hidden" output, [N, H] over the selected tokens, has the same row-major order
    either way.)"""
    if packed is None:
        return model(
            batch.input_ids, batch.attention_mask, loss_mask=batch.response_mask, temperature=temperature, **kwargs
        )
    p = packed
    out = model(p.input_ids, None, p.position_ids, loss_mask=p.response_mask, temperature=temperature, **kwargs)
    return {k: v if k == "hidden" else p.unpack(v) for k, v in out.items()}


def policy_logp(
    model: nn.Module, batch: RolloutBatch, temperature: float, packed: Packed | None = None
) -> torch.Tensor:
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
