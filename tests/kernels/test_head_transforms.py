"""The head transforms inside the log-prob ops (bias, logit multiplier, softcap, with the temperature): Triton
kernels and the chunked CPU path against the float64 reference, forward, entropy and gradients."""

from __future__ import annotations

import pytest
import torch

import rto_kernels
from rto_kernels import chunked, reference
from tests.kernels._util import DEVICES, LOGPROB_ATOL, check_against_truth, eager_linear, eager_logits, linear_case

# Each transform alone and all together. The softcaps sit within the logits' range (|z| ~ 1 to 4 here), so tanh
# bends and the 1 - tanh^2 factor of the gradient is far from 1.
TRANSFORMS = {
    "bias": dict(bias=True),
    "scale": dict(logit_scale=0.37),
    "softcap": dict(softcap=1.5),
    "all": dict(bias=True, logit_scale=2.5, softcap=3.0),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every transform in every dtype; the temperature alternates so that each transform and each dtype meets both
CASES = [(t, d, (1.0, 0.7)[(i + j) % 2]) for i, t in enumerate(TRANSFORMS) for j, d in enumerate(DTYPES)]


def _linear(hidden, weight, targets, bias, **kw):
    return rto_kernels.linear_logprobs(hidden, weight, targets, bias=bias, **kw)


def _reference(hidden, weight, targets, bias, **kw):
    return reference.linear_logprobs(hidden, weight, targets, bias=bias, **kw)


def _check_linear(gen, device, N, H, V, dtype, transform, temperature):
    spec = dict(TRANSFORMS[transform])
    hidden, weight, targets = linear_case(gen, N, H, V, dtype, device)
    inputs = [hidden, weight, targets]
    ops = (rto_kernels.linear_logprobs, eager_linear, reference.linear_logprobs)
    names = ["grad_hidden", "grad_weight", None]
    if spec.pop("bias", False):
        inputs.append(torch.randn(V, generator=gen, dtype=torch.float64).to(dtype).to(device))
        ops = (_linear, eager_linear, _reference)
        names.append("grad_bias")
    got = check_against_truth(*ops, inputs, gen, LOGPROB_ATOL[dtype], names, **spec, temperature=temperature)
    plain = rto_kernels.linear_logprobs(hidden, weight, targets, temperature=temperature)
    assert (got[0] - plain).abs().max() > 1e-2, f"{transform}: the transform changed nothing"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform,dtype,temperature", CASES)
def test_linear_logprobs_transforms_match_fp64(gen, device, transform, dtype, temperature):
    _check_linear(gen, device, 37, 40, 301, dtype, transform, temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_linear_logprobs_transforms_below_one_tile(gen, device, dtype, temperature):
    _check_linear(gen, device, 5, 24, 7, dtype, "all", temperature)  # V = 7: one partial vocabulary tile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "transform,dtype,temperature",
    [("scale", torch.float32, 0.7), ("softcap", torch.bfloat16, 1.0), ("all", torch.float16, 0.7)],
)
def test_logprobs_from_logits_transforms_match_fp64(gen, device, transform, dtype, temperature):
    spec = {k: v for k, v in TRANSFORMS[transform].items() if k != "bias"}  # the caller's logits hold any bias
    logits = (torch.randn(23, 301, generator=gen) * 2).to(dtype).to(device)
    targets = torch.randint(0, 301, (23,), generator=gen).to(device)
    ops = (rto_kernels.logprobs_from_logits, eager_logits, reference.logprobs_from_logits)
    kw = dict(spec, temperature=temperature)
    got = check_against_truth(*ops, [logits, targets], gen, LOGPROB_ATOL[dtype], ["grad_logits", None], **kw)
    plain = rto_kernels.logprobs_from_logits(logits, targets, temperature=temperature)
    assert (got[0] - plain).abs().max() > 1e-2, f"{transform}: the transform changed nothing"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias_grad", [True, False])
def test_chunked_path_transforms_match_the_reference(gen, monkeypatch, dtype, bias_grad):
    # The trainer's CPU path (no Triton): several row chunks, a ragged last one; fp64 inputs give fp64 outputs.
    N, H, V = 29, 12, 53
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 6 * V * 8)
    head = dict(logit_scale=2.5, softcap=3.0, temperature=0.7)
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=gen)
    g1, g2 = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    results = []
    for fn, inputs in (
        (chunked.linear_logprobs, [h.to(dtype), w.to(dtype), b.to(dtype)]),
        (reference.linear_logprobs, [h, w, b]),
    ):
        leaves = [x.clone().requires_grad_(i < 2 or bias_grad) for i, x in enumerate(inputs)]
        logp, ent = fn(leaves[0], leaves[1], y, bias=leaves[2], **head, return_entropy=True)
        ((logp.double() * g1).sum() + (ent.double() * g2).sum()).backward()
        results.append([logp, ent] + [x.grad for x in leaves])
    got, truth = results
    assert got[0].dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, t in zip(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"], got, truth):
        if not bias_grad and name == "grad_bias":
            assert a is None and t is None
            continue
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), t, rtol=0, atol=tol * max(1.0, t.abs().max().item()), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_transformed_ops(gen, device):
    hidden, weight, targets = linear_case(gen, 6, 16, 40, torch.float32, device)
    bias = torch.randn(40, generator=gen).to(device)
    h, w, b = hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    head = (2.5, 3.0, 0.7)  # logit_scale, softcap, temperature
    torch.library.opcheck(torch.ops.rto.linear_logprobs.default, (h, w, targets, b, *head, True))
    torch.library.opcheck(torch.ops.rto.linear_logprobs.default, (h, w, targets, None, 0.5, None, 1.0, False))
    torch.library.opcheck(torch.ops.rto.logprobs_from_logits.default, (h, targets, *head, True))
    h, w, b = hidden.detach(), weight.detach(), bias.detach()
    logp, ent, stats = torch.ops.rto.linear_logprobs(h, w, targets, b, *head, True)
    g = torch.randn(6, generator=gen).to(device)
    backward = torch.ops.rto.linear_logprobs_backward.default
    torch.library.opcheck(backward, (g, g, h, w, targets, b, stats, ent, *head))
    _, ent, stats = torch.ops.rto.logprobs_from_logits(h, targets, *head, True)
    torch.library.opcheck(torch.ops.rto.logprobs_from_logits_backward.default, (g, g, h, targets, stats, ent, *head))
