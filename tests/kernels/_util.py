"""Helpers of the kernel tests: the devices they run on and the error rule against a float64 truth."""

from __future__ import annotations

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
    of eager PyTorch in the same dtype (the rule of the best kernel suites)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, truth)
    eager_err = max_err(eager, truth) if eager is not None else 0.0
    bound = max(atol, factor * eager_err)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (eager error {eager_err:.3g}, atol {atol:g})"
