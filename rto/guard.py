"""The non-finite guard: a NaN or inf in a loss, reward, advantage or gradient norm skips that update.

Each skip is logged with the step and the tensor's name and counted (`train/skipped_updates`); after
`max_in_a_row` skips in a row the run stops with NonFiniteError, leaving its last checkpoint as it was (no
checkpoint is written after the first bad update).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many updates in a row met a non-finite value."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, where: str):
        self.max_in_a_row, self.where = max_in_a_row, where
        self.in_a_row = 0
        self.total = 0

    def first_bad(self, named: dict[str, torch.Tensor]) -> str | None:
        """The name of the first tensor with a NaN or inf on any rank, or None. One host sync for all of them."""
        flags = torch.stack([torch.isfinite(t.detach()).all() for t in named.values()]).int()
        if dist.is_initialized():  # every rank must take the same branch (FSDP2 collectives follow)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return next((name for name, ok in zip(named, flags.tolist()) if not ok), None)  # host sync

    def check(self, step: int, named: dict[str, torch.Tensor]) -> bool:
        """True when every tensor is finite; otherwise counts a skipped update (and stops at the limit)."""
        bad = self.first_bad(named)
        if bad is None:
            self.in_a_row = 0
            return True
        self.skip(step, bad)
        return False

    def skip(self, step: int, name: str) -> None:
        self.in_a_row += 1
        self.total += 1
        log.warning(
            "step %d: non-finite %s; update skipped (%d in a row, %d in total)", step, name, self.in_a_row, self.total
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"stopping at step {step}: {self.in_a_row} updates in a row met a non-finite value (last: {name}); "
                f"the last checkpoint in {self.where} is the last good state (train.max_nonfinite="
                f"{self.max_in_a_row})"
            )
