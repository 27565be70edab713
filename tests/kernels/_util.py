"""Helpers of the kernel tests: the devices they run on, the error rule against a float64 truth, and the log-prob
cases shared by the plain and the head-transform tests."""

from __future__ import annotations

import math

import pytest
import torch

from rto_kernels import interpreting, reference

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


# ---- log-prob cases: inputs, and one op against eager and the float64 reference ----

# Absolute floors per dtype; the bound is max(floor, 2 x eager's error in the same dtype, 2 ulps of a low-precision
# output).
LOGPROB_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def linear_case(gen, N, H, V, dtype, device, offset=0.0, spread=None):
    """hidden [N, H], weight [V, H], targets [N]. With `offset`/`spread`, the last hidden column is 1 and
    the last weight column adds a per-vocabulary logit offset (all logits near `offset`, or spread)."""
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    if offset or spread:
        hidden[:, -1] = 1.0
        bias = torch.full((V,), offset, dtype=torch.float64)
        if spread:
            bias += (torch.rand(V, generator=gen, dtype=torch.float64) - 0.5) * spread
        weight[:, -1] = bias
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


def run_with_grads(fn, inputs, g_logp, g_ent, **kw):
    """Forward with entropy, backward of sum(g_logp * logp + g_ent * entropy); returns [logp, entropy] and the
    gradient of each input (None for integer inputs)."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    logp, ent = fn(*leaves, **kw, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return [logp.detach(), ent.detach()] + [x.grad for x in leaves]


def eager_logits(logits, targets, *, logit_scale=1.0, softcap=None, temperature=1.0, return_entropy):
    """Peer-style log-probs in the input dtype: the head transform and log_softmax of the full logits, then gather."""
    z = reference.head_logits(logits, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def eager_linear(hidden, weight, targets, bias=None, **kw):
    """Peer-style head: materialised logits in the input dtype, then as above."""
    logits = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    return eager_logits(logits, targets, **kw)


def check_against_truth(op_fn, eager_fn, ref_fn, inputs, gen, atol, names, **kw):
    """op_fn's logp, entropy and input gradients (`names`, None for integer inputs) against ref_fn in float64,
    within `atol` or twice eager_fn's error in the inputs' dtype; gradients keep each input's dtype."""
    N = inputs[0].shape[0]
    device = inputs[0].device
    g_logp = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    g_ent = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    got = run_with_grads(op_fn, inputs, g_logp.float(), g_ent.float(), **kw)
    low = inputs[0].dtype
    eager = run_with_grads(eager_fn, inputs, g_logp.to(low), g_ent.to(low), **kw)
    inputs64 = [x.double() if x.is_floating_point() else x for x in inputs]
    truth = run_with_grads(ref_fn, inputs64, g_logp, g_ent, **kw)
    for name, out, e, t in zip(["logp", "entropy"] + names, got, eager, truth):
        if t is None:
            continue
        assert_close_to_truth(name, out, t, e, atol)
    for x, g in zip(inputs, got[2:]):
        if g is not None:
            assert g.dtype == x.dtype, f"gradient dtype {g.dtype} != input dtype {x.dtype}"
    return got
