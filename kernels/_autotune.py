"""Autotuning of the log-prob kernels: the switch, the tuning key's row bucket, and the launch of one kernel.

On a GPU each of the four log-prob kernels (`linear_logprobs` forward and dz, `logprobs_from_logits` forward and
backward) is launched through `triton.autotune` over a short list of configurations (tile sizes, warps, stages),
the tuned tile of each list first. The tuning key is the kernel's compile-time flags, the exact H and V (one model
has one of each), the tensors' dtypes (Triton adds those itself) and `N_BUCKET`, the row count rounded up to a
power of two in [N_BUCKET_MIN, N_BUCKET_MAX]: a new batch size or sequence count does not retune, at most eight
row buckets ever do, and the compiled binaries are shared by all buckets (N_BUCKET is an argument, not a
constexpr). Configuration lists may differ by operand width (`width`): they are kept per width and the
autotuner is given the list of the launch's width (an early prune), so it only ever times that list.

No autotuning under the interpreter (it would run every configuration of every launch): the small fixed tiles
stay. With `RTO_AUTOTUNE=0` (or false/off/no) the GPU launches use the first configuration of each list, the
tuned tile, with no timing: reproducible launches, bit for bit from run to run. Every configuration of every list
passes benchmarks/compile_check.py (sm_80 and sm_90, no spills, shared memory within the limit).
"""

from __future__ import annotations

import os

import torch

from rto_kernels._runtime import HAS_TRITON, interpreting

ENV = "RTO_AUTOTUNE"
N_BUCKET_MIN, N_BUCKET_MAX = 512, 65536
_OFF = ("0", "false", "off", "no")


def enabled() -> bool:
    """Autotune compiled launches: not under the interpreter, and not with RTO_AUTOTUNE=0 (read at each launch)."""
    return not interpreting() and os.environ.get(ENV, "1").strip().lower() not in _OFF


def n_bucket(n: int) -> int:
    """The row count's tuning bucket: the next power of two, clamped to [N_BUCKET_MIN, N_BUCKET_MAX]."""
    return min(max(1 << max(0, n - 1).bit_length(), N_BUCKET_MIN), N_BUCKET_MAX)


def width(dtype: torch.dtype) -> str:
    """Which configuration list a launch takes: 4-byte operands or 2-byte ones."""
    return "fp32" if dtype == torch.float32 else "16-bit"


if HAS_TRITON:
    import triton

    def config(num_warps: int, num_stages: int, **tiles: int) -> triton.Config:
        return triton.Config(tiles, num_warps=num_warps, num_stages=num_stages)

    def autotuner(kernel, lists: dict[str, list], key: list[str], width_arg: str):
        """`triton.autotune` of `kernel` over every list, pruned at each launch to the list of the width of the
        tensor argument `width_arg`. Keep it a module attribute of the op (benchmarks/compile_check.py finds the
        autotuners there and compiles every configuration of every launch)."""

        def prune(configs, named_args, **kwargs):
            return lists[width(named_args[width_arg].dtype)]

        union = list(dict.fromkeys(c for configs in lists.values() for c in configs))
        return triton.autotune(configs=union, key=key, prune_configs_by=dict(early_config_prune=prune))(kernel)

    def fixed(lists: dict[str, list], dtype: torch.dtype, interpreter: dict) -> dict:
        """The tiles of an untuned launch: the interpreter's, else the first configuration of the width's list."""
        if interpreting():
            return dict(interpreter)
        first = lists[width(dtype)][0]
        return dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)

    def largest(lists: dict[str, list], dtype: torch.dtype, interpreter: dict, name: str) -> int:
        """The largest value of the tile size `name` that a launch can take (the host code sizes work in
        multiples of it, so that every configuration tiles it evenly)."""
        if interpreting():
            return interpreter[name]
        return max(c.kwargs[name] for c in lists[width(dtype)])
