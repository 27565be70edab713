"""linear_logprobs and logprobs_from_logits: Triton kernels against a float64 truth, forward and gradients."""

from __future__ import annotations

import pytest
import torch

import rto_kernels
from rto_kernels import linear_logprobs_op as lp_mod
from rto_kernels import reference
from tests.kernels._util import (
    DEVICES,
    assert_close_to_truth,
    check_against_truth,
    eager_linear,
    eager_logits,
    linear_case,
)
from tests.kernels._util import LOGPROB_ATOL as ATOL


def _check_linear(inputs, gen, temperature, atol):
    names = ["grad_hidden", "grad_weight", None]
    ops = (rto_kernels.linear_logprobs, eager_linear, reference.linear_logprobs)
    check_against_truth(*ops, inputs, gen, atol, names, temperature=temperature)


def _check_logits(inputs, gen, temperature, atol):
    names = ["grad_logits", None]
    ops = (rto_kernels.logprobs_from_logits, eager_logits, reference.logprobs_from_logits)
    check_against_truth(*ops, inputs, gen, atol, names, temperature=temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "N,H,V,temperature,dtype",
    [
        (41, 31, 1271, 1.0, torch.float32),
        (41, 31, 1271, 1.0, torch.bfloat16),
        (1, 16, 7, 0.7, torch.float32),  # V smaller than one tile, one row
        (1, 16, 7, 0.7, torch.bfloat16),
        (64, 48, 100, 1.3, torch.float16),
        (33, 17, 257, 0.5, torch.float32),
    ],
)
def test_linear_logprobs_matches_fp64(gen, device, N, H, V, temperature, dtype):
    inputs = linear_case(gen, N, H, V, dtype, device)
    _check_linear(inputs, gen, temperature, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["around_-1e4", "spread_1e4"])
def test_linear_logprobs_extreme_logits(gen, device, kind):
    offset, spread = (-1e4, None) if kind == "around_-1e4" else (0.0, 1e4)
    inputs = linear_case(gen, 19, 24, 300, torch.float32, device, offset=offset, spread=spread)
    # at |logit| ~ 1e4 one fp32 ulp is ~1e-3: the floor scales with the magnitude
    _check_linear(inputs, gen, 1.0, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_without_entropy_chunked_backward(gen, device, monkeypatch):
    # A tiny chunk budget forces the backward through several vocabulary chunks.
    monkeypatch.setattr(lp_mod, "DZ_CHUNK_BYTES", 64 * 4 * 23)
    hidden, weight, targets = linear_case(gen, 23, 20, 500, torch.float32, device)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    g = torch.randn(23, generator=gen).to(device)
    logp = rto_kernels.linear_logprobs(h1, w1, targets)
    (logp * g).sum().backward()
    truth = reference.linear_logprobs(h2, w2, targets)
    (truth * g.double()).sum().backward()
    assert_close_to_truth("logp", logp.detach(), truth.detach(), None, ATOL[torch.float32])
    assert_close_to_truth("grad_hidden", h1.grad, h2.grad, None, ATOL[torch.float32])
    assert_close_to_truth("grad_weight", w1.grad, w2.grad, None, ATOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_strided_hidden(gen, device):
    # hidden as a column slice of a wider buffer (row stride != H), as when trimming a padded activation
    wide, weight, targets = linear_case(gen, 17, 40, 90, torch.float32, device)
    hidden = wide[:, :29]
    weight = weight[:, :29].contiguous()
    got = rto_kernels.linear_logprobs(hidden, weight, targets)
    truth = reference.linear_logprobs(hidden.double(), weight.double(), targets)
    assert hidden.stride(0) == 40
    assert_close_to_truth("logp", got, truth, None, ATOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "N,V,temperature,dtype",
    [
        (41, 1271, 1.0, torch.float32),
        (41, 1271, 0.7, torch.bfloat16),
        (3, 7, 1.0, torch.float16),  # V smaller than one tile
        (2, 4097, 1.0, torch.float32),  # V one past a power of two
        (1, 5, 2.0, torch.bfloat16),
    ],
)
def test_logprobs_from_logits_matches_fp64(gen, device, N, V, temperature, dtype):
    logits = (torch.randn(N, V, generator=gen) * 3).to(dtype).to(device)
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    _check_logits([logits, targets], gen, temperature, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["around_-1e4", "spread_1e4"])
def test_logprobs_from_logits_extreme(gen, device, kind):
    base = torch.randn(9, 333, generator=gen, dtype=torch.float64)
    logits = base - 1e4 if kind == "around_-1e4" else (torch.rand(9, 333, generator=gen) - 0.5).double() * 1e4
    targets = torch.randint(0, 333, (9,), generator=gen)
    _check_logits([logits.float().to(device), targets.to(device)], gen, 1.0, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_public_ops_dispatch_to_triton(gen, device, monkeypatch):
    hidden, weight, targets = linear_case(gen, 5, 16, 40, torch.float32, device)
    assert rto_kernels.use_triton(hidden)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the Triton kernel should have")

    monkeypatch.setattr(reference, "linear_logprobs", refuse)
    monkeypatch.setattr(reference, "logprobs_from_logits", refuse)
    logp = rto_kernels.linear_logprobs(hidden, weight, targets)
    raw, _, _ = torch.ops.rto.linear_logprobs(hidden, weight, targets, None, 1.0, None, 1.0, False)
    torch.testing.assert_close(logp, raw, rtol=0, atol=0)
    rto_kernels.logprobs_from_logits(hidden, targets)


def test_bad_inputs_raise_clear_errors(gen):
    hidden, weight, targets = linear_case(gen, 4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight \\[V, H\\]"):
        rto_kernels.linear_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(TypeError, match="share a dtype"):
        rto_kernels.linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(TypeError, match="targets must be int64"):
        rto_kernels.linear_logprobs(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        rto_kernels.logprobs_from_logits(hidden, targets, temperature=0.0)
    with pytest.raises(ValueError, match="linear_logprobs: softcap must be a finite number > 0"):
        rto_kernels.linear_logprobs(hidden, weight, targets, softcap=-30.0)
    with pytest.raises(ValueError, match="logprobs_from_logits: logit_scale must be a finite number > 0"):
        rto_kernels.logprobs_from_logits(hidden, targets, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="bias must be \\[V\\]=10 of the weight's dtype"):
        rto_kernels.linear_logprobs(hidden, weight, targets, bias=torch.zeros(9))
    with pytest.raises(ValueError, match="bias must be \\[V\\]=10 of the weight's dtype"):
        rto_kernels.linear_logprobs(hidden, weight, targets, bias=torch.zeros(10, dtype=torch.float64))


# ---- PyTorch op registration: schema, fake kernels, autograd, and torch.compile ----


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_logprob_ops(gen, device):
    hidden, weight, targets = linear_case(gen, 6, 16, 40, torch.float32, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    for with_entropy in (False, True):
        plain = (1.0, None, 0.9, with_entropy)  # logit_scale, softcap, temperature, with_entropy
        torch.library.opcheck(torch.ops.rto.linear_logprobs.default, (h, w, targets, None, *plain))
        torch.library.opcheck(torch.ops.rto.logprobs_from_logits.default, (h, targets, *plain))
    logp, ent, lse = torch.ops.rto.linear_logprobs(
        hidden.detach(), weight.detach(), targets, None, 1.0, None, 1.0, True
    )
    g = torch.randn(6, generator=gen).to(device)
    h, w = hidden.detach(), weight.detach()
    torch.library.opcheck(
        torch.ops.rto.linear_logprobs_backward.default, (g, g, h, w, targets, None, lse, ent, 1.0, None, 1.0)
    )
    torch.library.opcheck(
        torch.ops.rto.logprobs_from_logits_backward.default, (g, None, h, targets, lse, ent, 1.0, None, 1.0)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_under_torch_compile(gen, device):
    # the plain head and one with every transform, in one compiled graph (one compile: it is the slow part)
    hidden, weight, targets = linear_case(gen, 7, 16, 50, torch.float32, device)
    bias = torch.randn(50, generator=gen).to(device)

    def head(h, w, b, t):
        logp, ent = rto_kernels.linear_logprobs(h, w, t, temperature=0.8, return_entropy=True)
        capped = rto_kernels.linear_logprobs(h, w, t, bias=b, logit_scale=2.0, softcap=1.5, temperature=0.8)
        return (logp + 0.1 * ent + capped).sum()

    leaves1 = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    leaves2 = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    torch.compile(head, fullgraph=True)(*leaves1, targets).backward()
    head(*leaves2, targets).backward()
    for a, b in zip(leaves1, leaves2):
        torch.testing.assert_close(a.grad, b.grad)


# ---- realistic sizes, compiled kernels on a GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_logprobs_realistic_gpu(gen, dtype, monkeypatch):
    if dtype == torch.bfloat16:  # the training path, through the autotuner (the other tests take the defaults)
        monkeypatch.setenv("RTO_AUTOTUNE", "1")
    inputs = linear_case(gen, 2048, 1024, 32011, dtype, "cuda")
    _check_linear(inputs, gen, 1.0, ATOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logprobs_from_logits_realistic_gpu(gen):
    logits = (torch.randn(4096, 32011, generator=gen) * 3).to(torch.bfloat16).cuda()
    targets = torch.randint(0, 32011, (4096,), generator=gen).cuda()
    _check_logits([logits, targets], gen, 1.0, ATOL[torch.bfloat16])
