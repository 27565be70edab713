"""Kernel tests run the Triton kernels themselves: on CPU through Triton's interpreter, on CUDA compiled.

The interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET=1 must be set before pytest
starts (`make test` runs this folder in a process of its own). Without it and without CUDA the kernels
cannot run at all, and collection stops with that message rather than skipping everything.
"""

from __future__ import annotations

import pytest
import torch

from rto_kernels import interpreting

if not interpreting() and not torch.cuda.is_available():
    raise pytest.UsageError(
        "tests/kernels runs the Triton kernels: set TRITON_INTERPRET=1 on a CPU machine "
        "(`make test` does), or run on a CUDA machine"
    )
