"""Helpers of the kernel tests: the devices they run on and the error rule against a float64 truth."""

from __future__ import annotations

import math

import pytest
import torch

from rto_kernels import interpreting

# CPU through the interpreter when it is on; CUDA always listed but marked, so `-m gpu` selects it.
DEVICES = (["cpu"] if interpreting() else []) + [
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    )
]


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_truth(
    name: str, out: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor | None, atol: float, factor: float = 2.0
) -> None:
    """The kernel's error against the float64 truth stays within `atol`, or within `factor` times the error
    of eager PyTorch in the same dtype (the rule of the best kernel suites), or, for an output stored in bf16 or
    fp16, within 2 units in the last place at the truth's largest magnitude (storing the output alone costs half
    a unit, and a gradient is rounded twice, once as dlogits and once as the product: no implementation in that
    dtype does better, and eager's error, one sample of the same rounding, can happen to fall under half of it)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, truth)
    eager_err = max_err(eager, truth) if eager is not None else 0.0
    bound = max(atol, factor * eager_err, 2 * ulp(truth, out.dtype))
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (eager error {eager_err:.3g}, atol {atol:g})"


def ulp(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of `dtype` at the largest magnitude of `truth` (0 for fp32 and fp64 outputs)."""
    if dtype not in (torch.bfloat16, torch.float16) or not truth.numel():
        return 0.0
    top = truth.abs().max().item()
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
