"""linear_logprobs and logprobs_from_logits: Triton kernels against a float64 truth, forward and gradients."""

from __future__ import annotations

import pytest
import torch

import rto_kernels
from rto_kernels import logprobs as lp_mod
from rto_kernels import reference
from tests.kernels._util import DEVICES, assert_close_to_truth

# Absolute floors per dtype; the bound is max(floor, 2 x eager's error in the same dtype).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _linear_case(gen, N, H, V, dtype, device, offset=0.0, spread=None):
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


def _run(fn, inputs, g_logp, g_ent, **kw):
    """Forward with entropy, backward of sum(g_logp * logp + g_ent * entropy); returns outputs and grads."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    logp, ent = fn(*leaves, **kw, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return [logp.detach(), ent.detach()] + [x.grad for x in leaves]


def _eager_logits(logits, targets, *, temperature, return_entropy):
    """Peer-style log-probs in the input dtype: log_softmax of the full logits, then gather."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def _eager_linear(hidden, weight, targets, *, temperature, return_entropy):
    """Peer-style head: materialised logits in the input dtype, then as above."""
    return _eager_logits(hidden @ weight.T, targets, temperature=temperature, return_entropy=return_entropy)


def _check_against_truth(triton_fn, eager_fn, ref_fn, inputs, gen, temperature, atol, names):
    N = inputs[0].shape[0]
    device = inputs[0].device
    g_logp = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    g_ent = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    got = _run(triton_fn, inputs, g_logp.float(), g_ent.float(), temperature=temperature)
    eager = _run(eager_fn, inputs, g_logp.to(inputs[0].dtype), g_ent.to(inputs[0].dtype), temperature=temperature)
    truth = _run(
        ref_fn, [x.double() if x.is_floating_point() else x for x in inputs], g_logp, g_ent, temperature=temperature
    )
    for name, out, e, t in zip(["logp", "entropy"] + names, got, eager, truth):
        if t is None:
            continue
        assert_close_to_truth(name, out, t, e, atol)
    for x, g in zip(inputs, got[2:]):
        if g is not None:
            assert g.dtype == x.dtype, f"gradient dtype {g.dtype} != input dtype {x.dtype}"
    return got


def _check_linear(inputs, gen, temperature, atol):
    names = ["grad_hidden", "grad_weight", None]
    _check_against_truth(rto_kernels.linear_logprobs, _eager_linear, reference.linear_logprobs, inputs, gen,
                         temperature, atol, names)  # fmt: skip


def _check_logits(inputs, gen, temperature, atol):
    names = ["grad_logits", None]
    _check_against_truth(rto_kernels.logprobs_from_logits, _eager_logits, reference.logprobs_from_logits, inputs,
                         gen, temperature, atol, names)  # fmt: skip


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
    inputs = _linear_case(gen, N, H, V, dtype, device)
    _check_linear(inputs, gen, temperature, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["around_-1e4", "spread_1e4"])
def test_linear_logprobs_extreme_logits(gen, device, kind):
    offset, spread = (-1e4, None) if kind == "around_-1e4" else (0.0, 1e4)
    inputs = _linear_case(gen, 19, 24, 300, torch.float32, device, offset=offset, spread=spread)
    # at |logit| ~ 1e4 one fp32 ulp is ~1e-3: the floor scales with the magnitude
    _check_linear(inputs, gen, 1.0, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_without_entropy_chunked_backward(gen, device, monkeypatch):
    # A tiny chunk budget forces the backward through several vocabulary chunks.
    monkeypatch.setattr(lp_mod, "DZ_CHUNK_BYTES", 64 * 4 * 23)
    hidden, weight, targets = _linear_case(gen, 23, 20, 500, torch.float32, device)
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
    wide, weight, targets = _linear_case(gen, 17, 40, 90, torch.float32, device)
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
    hidden, weight, targets = _linear_case(gen, 5, 16, 40, torch.float32, device)
    assert rto_kernels.use_triton(hidden)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the Triton kernel should have")

    monkeypatch.setattr(reference, "linear_logprobs", refuse)
    monkeypatch.setattr(reference, "logprobs_from_logits", refuse)
    logp = rto_kernels.linear_logprobs(hidden, weight, targets)
    raw, _, _ = torch.ops.rto.linear_logprobs(hidden, weight, targets, 1.0, False)
    torch.testing.assert_close(logp, raw, rtol=0, atol=0)
    rto_kernels.logprobs_from_logits(hidden, targets)


def test_bad_inputs_raise_clear_errors(gen):
    hidden, weight, targets = _linear_case(gen, 4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight \\[V, H\\]"):
        rto_kernels.linear_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(TypeError, match="share a dtype"):
        rto_kernels.linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(TypeError, match="targets must be int64"):
        rto_kernels.linear_logprobs(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        rto_kernels.logprobs_from_logits(hidden, targets, temperature=0.0)


# ---- PyTorch op registration: schema, fake kernels, autograd, and torch.compile ----


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_logprob_ops(gen, device):
    hidden, weight, targets = _linear_case(gen, 6, 16, 40, torch.float32, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    for with_entropy in (False, True):
        torch.library.opcheck(torch.ops.rto.linear_logprobs.default, (h, w, targets, 0.9, with_entropy))
        torch.library.opcheck(torch.ops.rto.logprobs_from_logits.default, (h, targets, 0.9, with_entropy))
    logp, ent, lse = torch.ops.rto.linear_logprobs(hidden.detach(), weight.detach(), targets, 1.0, True)
    g = torch.randn(6, generator=gen).to(device)
    torch.library.opcheck(
        torch.ops.rto.linear_logprobs_backward.default, (g, g, hidden.detach(), weight.detach(), targets, lse, ent, 1.0)
    )
    torch.library.opcheck(
        torch.ops.rto.logprobs_from_logits_backward.default, (g, None, hidden.detach(), targets, lse, ent, 1.0)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_linear_logprobs_under_torch_compile(gen, device):
    hidden, weight, targets = _linear_case(gen, 7, 16, 50, torch.float32, device)

    def head(h, w, t):
        logp, ent = rto_kernels.linear_logprobs(h, w, t, temperature=0.8, return_entropy=True)
        return (logp + 0.1 * ent).sum()

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.compile(head, fullgraph=True)(h1, w1, targets).backward()
    head(h2, w2, targets).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


# ---- realistic sizes, compiled kernels on a GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_logprobs_realistic_gpu(gen, dtype):
    inputs = _linear_case(gen, 2048, 1024, 32011, dtype, "cuda")
    _check_linear(inputs, gen, 1.0, ATOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logprobs_from_logits_realistic_gpu(gen):
    logits = (torch.randn(4096, 32011, generator=gen) * 3).to(torch.bfloat16).cuda()
    targets = torch.randint(0, 32011, (4096,), generator=gen).cuda()
    _check_logits([logits, targets], gen, 1.0, ATOL[torch.bfloat16])
