"""The fast CPU paths against their oracles: the chunked fused head (`rto_kernels.chunked`) against the fp64
reference, the engine's sampler against the distribution it must draw from, and the built-in decode loop
against Hugging Face `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rto_kernels
from rto.config import RolloutConfig
from rto.models import PolicyModel
from rto.rollout import sampling
from rto.rollout.hf import HFEngine
from rto_kernels import chunked, reference
from tests.conftest import SEED

# ---- the chunked head ----

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}  # x max(1, |truth|), values and gradients


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(1, 3, 5), (29, 16, 37), (64, 8, 300)])
def test_chunked_head_matches_the_fp64_reference(gen, monkeypatch, dtype, temperature, shape):
    N, H, V = shape
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 7 * V * 8)  # several chunks of 7 rows, a ragged last one
    h = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logp, ent = chunked.linear_logprobs(h, w, y, temperature=temperature, return_entropy=True)
    logp64, ent64 = reference.linear_logprobs(h64, w64, y, temperature=temperature, return_entropy=True)
    assert logp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g1, g2 = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    ((logp.double() * g1).sum() + (ent.double() * g2).sum()).backward()
    ((logp64 * g1).sum() + (ent64 * g2).sum()).backward()
    tol = TOL[dtype]
    scale = lambda t: tol * max(1.0, t.abs().max().item())  # noqa: E731
    for got, want in ((logp, logp64), (ent, ent64), (h.grad, h64.grad), (w.grad, w64.grad)):
        assert got.dtype in (dtype, logp.dtype)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=scale(want))


def test_chunked_head_gradient_of_logp_alone_and_the_dispatch(gen, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 5 * 11 * 8)
    h = torch.randn(13, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (13,), generator=gen)
    rto_kernels.linear_logprobs(h, w, y).sum().backward()  # CPU without the interpreter: the chunked path
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.linear_logprobs(h2, w2, y).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="hidden must be"):
        chunked.linear_logprobs(h[None], w, y)


# ---- the sampler ----


def _check_counts(draws: torch.Tensor, p: torch.Tensor) -> None:
    """Counts of each index within 5 binomial sigmas (+3 draws, for bins expecting almost none) of n * p, and
    none where p = 0."""
    n = draws.numel()
    counts = torch.bincount(draws.flatten(), minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0
    expected = n * p
    slack = 5 * (expected * (1 - p)).sqrt() + 3
    worst = ((counts - expected).abs() - slack).argmax()
    assert ((counts - expected).abs() <= slack).all(), (int(worst), counts[worst].item(), expected[worst].item())


def test_draw_follows_the_weights_and_never_draws_zero_mass(gen):
    torch.manual_seed(SEED)
    K = 2 * sampling.BLOCK + 37  # three blocks, the last one ragged
    w = torch.rand(K, generator=gen) ** 4
    w[torch.randperm(K, generator=gen)[:100]] = 0.0  # zero-mass tokens, scattered
    w[sampling.BLOCK : 2 * sampling.BLOCK] = 0.0  # and a whole zero-mass block
    w[5] = 40.0  # one heavy token
    draws = torch.cat([sampling.draw(w.expand(20000, K).contiguous()) for _ in range(10)])  # 200,000 draws
    _check_counts(draws, w.double() / w.double().sum())


def test_sample_top_k_top_p_and_the_logp_it_reports(gen):
    torch.manual_seed(SEED)
    V, n = 50, 100000
    logits = torch.randn(V, generator=gen) * 2
    full = torch.log_softmax(logits.double(), -1)
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.8), (10, 0.5)):
        tok, logp = sampling.sample(logits.expand(n, V).contiguous(), top_k=top_k, top_p=top_p)
        torch.testing.assert_close(logp.double(), full[tok], rtol=0, atol=1e-5)  # the untruncated log-prob
        order = full.argsort(descending=True)
        keep = torch.zeros(V, dtype=torch.bool)
        kept = order[: top_k or V]
        if top_p < 1:
            p = full[kept].exp() / full[kept].exp().sum()
            kept = kept[(p.cumsum(0) - p) < top_p]
        keep[kept] = True
        target = torch.where(keep, full.exp(), 0.0)
        target /= target.sum()
        _check_counts(tok, target)


# ---- the decode loop ----


def _tiny_lm(vocab: int = 61) -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(**sizes, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


class _Tok:
    pad_token_id = 0

    def __init__(self, eos: int):
        self.eos_token_id = eos


def _hf_greedy(lm, prompts, eos, max_new):
    rows = []
    for p in prompts:  # one at a time: no padding at all on the Hugging Face side
        ids = torch.tensor([p])
        greedy = dict(do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0)
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **greedy)
        rows.append(out[0, len(p) :].tolist())
    return rows


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("stop", ["eos", "cap"])
def test_decode_loop_is_hf_greedy_decoding_at_top_k_1(gen, stop, kv_cache):
    lm = _tiny_lm()
    prompts = [torch.randint(1, 60, (n,), generator=gen).tolist() for n in (3, 9, 5, 1, 7)]
    max_new = 12
    free = _hf_greedy(lm, prompts, eos=60, max_new=max_new)
    row = max(range(len(free)), key=lambda b: len(free[b]))  # (a row may have stopped early at token 60)
    at = len(free[row]) // 2
    if stop == "eos":  # a token the longest row emits mid-way: rows stop there, and the early stop is exercised
        eos = free[row][at]
    else:  # a token no row emits before 60: rows run to the cap and get EOS forced
        eos = next(t for t in range(1, 61) if all(t not in f for f in free))
    expected = _hf_greedy(lm, prompts, eos=eos, max_new=max_new)
    # two micro-batches (the second of two rows), left padding
    cfg = RolloutConfig(max_new_tokens=max_new, top_k=1, micro_batch_size=3, kv_cache=kv_cache)
    engine = HFEngine(PolicyModel(lm), lm, _Tok(eos), cfg, torch.device("cpu"))
    batch = engine.generate(prompts)
    for b, (p, want) in enumerate(zip(prompts, expected)):
        got = batch.input_ids[b][batch.response_mask[b]].tolist()
        if eos in want:
            want = want[: want.index(eos) + 1]
        else:
            assert len(want) == max_new
            want = want[:-1] + [eos]  # the cap forces EOS last
        assert got == want, b
        assert batch.input_ids[b, : len(p)].tolist() == p
    assert batch.truncated.tolist() == [eos not in w for w in expected]
    assert (
        (batch.truncated.any() or all(60 in f for f in free))
        if stop == "cap"
        else batch.response_lengths[row] <= at + 1
    )
    # the reported log-probs are the model's own, under the full softmax
    with torch.no_grad():
        logp = PolicyModel(lm)(batch.input_ids, batch.attention_mask, loss_mask=batch.response_mask)["logp"]
    last = batch.response_mask.cumsum(1) == batch.response_lengths[:, None]  # each response's last token
    compare = batch.response_mask & ~(batch.truncated[:, None] & last)  # a forced EOS was not sampled
    torch.testing.assert_close(batch.rollout_logp[compare], logp[compare], rtol=0, atol=1e-5)


def test_compiled_static_decode_matches_eager(gen):
    """rollout.compile_decode: the decode step through torch.compile (inductor on CPU; CUDA graphs on GPU)."""
    lm = _tiny_lm()
    prompts = [torch.randint(1, 60, (n,), generator=gen).tolist() for n in (4, 2, 6)]
    batches = []
    for compiled in (False, True):
        cfg = RolloutConfig(max_new_tokens=8, top_k=1, micro_batch_size=3, kv_cache="static", compile_decode=compiled)
        batches.append(HFEngine(PolicyModel(lm), lm, _Tok(60), cfg, torch.device("cpu")).generate(prompts))
    eager, compiled = batches
    assert torch.equal(eager.input_ids, compiled.input_ids)
    torch.testing.assert_close(eager.rollout_logp, compiled.rollout_logp, rtol=0, atol=1e-5)


def test_compile_decode_needs_a_static_cache():
    from rto.config import ConfigError, load_config

    base = ["actor.path=x", "reward=x", "dpo=x", "data.path=x"]
    with pytest.raises(ConfigError, match="compile_decode=true needs rollout.kv_cache=static"):
        load_config("ppo", None, [*base, "rollout.compile_decode=true"])
    with pytest.raises(ConfigError, match="rollout.kv_cache must be one of dynamic, static"):
        load_config("ppo", None, [*base, "rollout.kv_cache=paged"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_matches_eager_on_gpu(gen):
    lm = _tiny_lm().cuda()
    prompts = [torch.randint(1, 60, (n,), generator=gen).tolist() for n in (4, 2, 6, 9)]
    batches = []
    for compiled in (False, True):
        cfg = RolloutConfig(max_new_tokens=16, top_k=1, micro_batch_size=4, kv_cache="static", compile_decode=compiled)
        engine = HFEngine(PolicyModel(lm), lm, _Tok(60), cfg, torch.device("cuda"))
        engine.generate(prompts)  # the first call records the graphs
        batches.append(engine.generate(prompts))
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    torch.testing.assert_close(batches[0].rollout_logp, batches[1].rollout_logp, rtol=0, atol=1e-4)
