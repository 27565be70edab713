"""Streaming the actor's weights out of FSDP2 in fixed-size buckets.

Each parameter is gathered whole (`full_tensor()`, a collective every rank joins; a one-rank run's plain
tensors are whole already), packed into a bucket of about `bucket_bytes`, and handed to `load` as a list of
(HF name, tensor) when the bucket is full. Peak extra memory is one bucket plus one parameter, instead of a whole
unsharded copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from rto.parallel import full_tensor


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket, size = [], 0
    for name, t in named:
        full = full_tensor(t.detach())
        bucket.append((name, full))
        size += full.numel() * full.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def stream_weights(lm: nn.Module, load: Callable[[list[tuple[str, torch.Tensor]]], None], bucket_bytes: int) -> int:
    """Send every parameter and buffer of the HF model `lm` to `load`, bucket by bucket; returns the bucket count."""
    n = 0
    for bucket in buckets(lm.state_dict().items(), bucket_bytes):
        load(bucket)
        n += 1
    return n
