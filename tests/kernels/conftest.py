"""Kernel tests run the Triton kernels themselves: on CPU through Triton's interpreter, on CUDA compiled.

The interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET=1 must be set before pytest
starts (`make test` runs this folder in a process of its own). Without it and without CUDA the kernels
cannot run at all, and collection stops with that message rather than skipping everything.
"""

from __future__ import annotations

import os

import pytest
import torch

from rto_kernels import _autotune, interpreting

if not interpreting() and not torch.cuda.is_available():
    raise pytest.UsageError(
        "tests/kernels runs the Triton kernels: set TRITON_INTERPRET=1 on a CPU machine "
        "(`make test` does), or run on a CUDA machine"
    )


@pytest.fixture(autouse=True)
def _default_tiles(monkeypatch):
    """Compiled (on a GPU), the kernel tests launch each kernel's default config, untimed (RTO_AUTOTUNE=0): the
    autotuner would compile and time every config at each of their many shapes and flag sets. Set RTO_AUTOTUNE in
    the environment to choose (RTO_AUTOTUNE=1: every test through the autotuner); a test that wants the tuned
    path sets it itself. The interpreter never autotunes (rto_kernels._autotune)."""
    if _autotune.ENV not in os.environ:
        monkeypatch.setenv(_autotune.ENV, "0")
