"""Small tensor helpers with one definition each: padding ragged rows, and a row's last valid position (defined
with the kernels' reference, which the trainer's tensors must agree with, and re-exported here).

Every module that pads token rows (data collation, rollout batches, the engines' prompts, evaluation) or reads
"the last valid token" of a row (the reward model's score, forced EOS, rollout statistics) calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rto_kernels.reference import last_valid_index
from rto_kernels.reference import last_valid_mask as is_last_valid

__all__ = ["is_last_valid", "last_valid", "last_valid_index", "pad_rows"]


def pad_rows(
    rows: Sequence[Sequence],
    value,
    *,
    side: str = "right",
    width: int | None = None,
    dtype: torch.dtype = torch.long,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows -> (values [B, W], valid [B, W] bool), W = `width` or the longest row.

    `side="right"` puts each row at the start (training batches), `"left"` at the end (batched decoding, so every
    row's last prompt token sits in the same column). Padding holds `value`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    W = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), W), value, dtype=dtype)
    valid = torch.zeros((len(rows), W), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r)
        if n > W:
            raise ValueError(f"row {b} has {n} entries, more than the width {W}")
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(W - n, W)
        out[b, cols] = torch.as_tensor(r, dtype=dtype)
        valid[b, cols] = True
    return out.to(device), valid.to(device)


def last_valid(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values[b, last position where mask[b] is set] -> [B] (the reward model's score of a row)."""
    last = last_valid_index(mask)
    if (last < 0).any():  # host sync: an empty row here is a data bug, not a case to score
        raise ValueError("a row has no valid token to score")
    return values.gather(1, last[:, None]).squeeze(1)
