"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under Triton's interpreter.

Triton decides interpreter or compiler when a kernel is decorated, so `TRITON_INTERPRET=1` must be set
before `rto_kernels` is imported; the tests and the Makefile do that in a process of their own.
"""

from __future__ import annotations

import torch

try:
    import triton

    HAS_TRITON = True
except ImportError:  # macOS and other platforms without Triton wheels: the reference path only
    triton = None
    HAS_TRITON = False


# Read once, at import: the kernels are decorated (interpreted or compiled) at that moment too, and a
# constant keeps torch.compile from tracing an environment lookup.
_INTERPRETING = HAS_TRITON and bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor: on CUDA, or on CPU under the interpreter."""
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpreting()))


def row_major(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its last dimension is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
