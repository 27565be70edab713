"""Model families as they ship: tiny random models of each family built in code (no downloads), every path of the
project's log-probs against Hugging Face's own log_softmax(model(ids).logits / T) in fp32; the parity probe that
guards the families not listed; packing refused by name where a family cannot run it; stop tokens."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

import rto.families as fam
import rto.models as models
from rto.config import ConfigError, ModelConfig, RolloutConfig
from rto.families import ModelError, check_packing, parity_probe, stop_token_ids
from rto.models import PolicyModel, load_causal_lm, tiny_causal_lm, tiny_tokenizer
from rto.rollout import hf as hf_engine
from rto.rollout.engine import assemble
from rto.rollout.hf import HFEngine

V, TOL = 128, 1e-4
EAGER = ModelConfig(path="unused", attn_implementation="eager")
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
LLAMA_LIKE.update(num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
GPT2_LIKE = dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64, tie_word_embeddings=False)
GPT2_LIKE.update(bos_token_id=1, eos_token_id=1)
BLOOM_LIKE = dict(vocab_size=V, hidden_size=32, n_layer=1, n_head=4, tie_word_embeddings=False)
MAMBA = dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4)
MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# family -> (config class, its settings, attention); the head transforms are set well away from the identity
FAMILIES = {
    "llama": ("LlamaConfig", LLAMA_LIKE, "sdpa"),
    "mistral": ("MistralConfig", LLAMA_LIKE, "sdpa"),
    "qwen2": ("Qwen2Config", LLAMA_LIKE, "sdpa"),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=8), "sdpa"),
    "gpt2": ("GPT2Config", GPT2_LIKE, "sdpa"),
    "gpt_neox": ("GPTNeoXConfig", dict(LLAMA_LIKE, num_key_value_heads=None), "sdpa"),
    "bloom": ("BloomConfig", BLOOM_LIKE, "eager"),
    "opt": ("OPTConfig", dict(LLAMA_LIKE, ffn_dim=64, word_embed_proj_dim=32), "sdpa"),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=1.5), "eager"),
    "gemma3_text": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=1.5), "sdpa"),
    "cohere": ("CohereConfig", dict(LLAMA_LIKE, logit_scale=3.0, eos_token_id=1), "sdpa"),
    "cohere2": ("Cohere2Config", dict(LLAMA_LIKE, logit_scale=3.0, eos_token_id=1), "sdpa"),
    "granite": ("GraniteConfig", dict(LLAMA_LIKE, logits_scaling=0.3), "sdpa"),
    "phi": ("PhiConfig", LLAMA_LIKE, "sdpa"),
    "gptj": ("GPTJConfig", dict(GPT2_LIKE, rotary_dim=4), "sdpa"),
    "falcon_h1": ("FalconH1Config", dict(LLAMA_LIKE, lm_head_multiplier=4.0, **MAMBA), "sdpa"),
    "nanochat": ("NanoChatConfig", dict(LLAMA_LIKE, final_logit_softcapping=1.5), "sdpa"),
    "minicpm3": ("MiniCPM3Config", dict(LLAMA_LIKE, dim_model_base=8, **MLA), "sdpa"),
}


@functools.cache
def build(name: str) -> torch.nn.Module:
    """The family's tiny model, its head made far from plain: output weights x4, biases ~ N(0, 2)."""
    config_cls, settings, attn = FAMILIES[name]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"the installed transformers has no {config_cls} ({name})")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**settings), attn_implementation=attn)
    out = lm.get_output_embeddings()
    with torch.no_grad():
        out.weight.mul_(4)
        if out.bias is not None:
            out.bias.normal_(0, 2)
    return lm.eval()


family = pytest.mark.parametrize("name", list(FAMILIES))
LENGTHS = (7, 4, 6)


def _rows(lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def _padded(rows):
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], attn[b, : len(r)] = torch.tensor(r), 1
    return ids, attn


@torch.no_grad()
def _hf_logp(lm, ids, attn, temperature=1.0) -> torch.Tensor:
    """HF's own log_softmax(logits / T) [B, T, V] in fp32."""
    return torch.log_softmax(lm(input_ids=ids, attention_mask=attn).logits.float() / temperature, -1)


def _next_token(logp_all, ids):
    return logp_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: log p(token t | < t)


@family
def test_padded_logprobs_and_entropy_equal_hf(name):
    lm = build(name)
    ids, attn = _padded(_rows())
    mask = attn.bool()
    for temperature in (1.0, 0.7):
        with torch.no_grad():
            out = PolicyModel(lm)(ids, attn, loss_mask=mask, temperature=temperature, return_entropy=True)
        own = _hf_logp(lm, ids, attn, temperature)
        m = mask[:, 1:]
        torch.testing.assert_close(out["logp"][:, 1:][m], _next_token(own, ids)[m], rtol=0, atol=TOL)
        entropy = -(own.exp() * own).sum(-1)[:, :-1]
        torch.testing.assert_close(out["entropy"][:, 1:][m], entropy[m], rtol=0, atol=TOL)


@family
def test_packed_logprobs_equal_hf_or_packing_is_refused_by_name(name):
    lm = build(name)
    rows = _rows()
    ids, attn = _padded(rows)
    packed_ids = torch.tensor([t for r in rows for t in r])[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    first = torch.cat([torch.arange(len(r)) == 0 for r in rows])[None]
    with torch.no_grad():
        packed = PolicyModel(lm)(packed_ids, None, positions, loss_mask=~first)["logp"][~first]
    want = _next_token(_hf_logp(lm, ids, attn), ids)[attn[:, 1:].bool()]
    if name in fam.NO_PACKING:
        with pytest.raises(ModelError, match=rf"actor.path: model family {name} .*cannot run packed.*train.packing"):
            check_packing(lm, "actor.path")
        assert (packed - want).abs().max() > TOL  # the refusal is needed
    else:
        check_packing(lm, "actor.path")
        torch.testing.assert_close(packed, want, rtol=0, atol=TOL)


@family
def test_engine_samples_from_the_models_own_distribution(name, monkeypatch):
    """Every [B, V] row the built-in engine samples from is HF's log_softmax(logits / T) at that position."""
    lm = build(name)
    seen = []
    real_sample = hf_engine.sample
    monkeypatch.setattr(hf_engine, "sample", lambda logits, **kw: (seen.append(logits), real_sample(logits, **kw))[1])
    prompts = _rows((5, 2, 4))
    cfg = RolloutConfig(max_new_tokens=3, temperature=0.7, micro_batch_size=3)
    batch = HFEngine(PolicyModel(lm), lm, _Tok(), cfg, torch.device("cpu"), stop_ids=[V - 1]).generate(prompts)
    own = _hf_logp(lm, batch.input_ids, batch.attention_mask, 0.7)
    for t, logits in enumerate(seen):
        for b, p in enumerate(prompts):
            if batch.response_lengths[b] > t:  # rows still decoding at step t
                got = torch.log_softmax(logits[b], -1)
                torch.testing.assert_close(got, own[b, len(p) - 1 + t], rtol=0, atol=TOL)


class _Tok:
    eos_token_id, pad_token_id = V - 1, 0


@family
def test_parity_probe_passes_on_every_family(name, caplog):
    with caplog.at_level(logging.INFO, logger="rto.families"):
        assert parity_probe(build(name), "actor.path", torch.float32) < TOL
    assert f"parity probe actor.path ({name})" in caplog.text


BROKEN = {  # a head read wrong on purpose: the probe must stop with the family's name
    "gemma2": lambda mp: mp.setattr(fam, "_softcap_of", lambda lm: None),
    "cohere": lambda mp: mp.setattr(fam, "_scale_of", lambda lm: 1.0),
    "phi": lambda mp: mp.setattr(fam, "head_spec", lambda lm, form=None: fam.HeadSpec(None, 1.0, None)),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_parity_probe_stops_on_a_misread_head(name, monkeypatch):
    lm = build(name)
    BROKEN[name](monkeypatch)
    monkeypatch.setattr(models, "head_spec", fam.head_spec)
    with pytest.raises(ModelError, match=rf"ref: .*model family {name} .*max \|log-prob difference\|"):
        parity_probe(lm, "ref", torch.float32)


def test_parity_probe_guards_a_head_no_table_knows(tmp_path, monkeypatch):
    """A model whose forward changes its logits in a way no reader knows: the probe stops it at load."""
    lm = tiny_causal_lm(V, hidden=16, layers=1)
    forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **k: _doubled(forward(*a, **k)))
    with pytest.raises(ModelError, match=r"dpo: .*model family llama \(LlamaForCausalLM\)"):
        parity_probe(lm, "dpo")
    build("gemma2").save_pretrained(tmp_path / "gemma2")  # and load_causal_lm runs the probe
    assert isinstance(load_causal_lm(str(tmp_path / "gemma2"), EAGER, "actor.path"), torch.nn.Module)
    monkeypatch.setattr(fam, "_softcap_of", lambda lm: None)
    with pytest.raises(ModelError, match="actor.path: .*model family gemma2"):
        load_causal_lm(str(tmp_path / "gemma2"), EAGER, "actor.path")


def _doubled(out):
    out.logits = out.logits * 2
    return out


def test_a_family_whose_head_is_a_block_is_refused_by_name():
    config = transformers.RobertaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True
    )
    lm = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ModelError, match=r"model family roberta \(RobertaForCausalLM\) is not supported"):
        PolicyModel(lm)
    with pytest.raises(ModelError, match=r"^reward: model family roberta"):
        parity_probe(lm, "reward")


def test_packing_probe_catches_a_family_missing_from_the_table(monkeypatch):
    monkeypatch.delitem(fam.NO_PACKING, "opt")
    with pytest.raises(ModelError, match=r"critic: model family opt .*packed probe differs.*data.packing=false"):
        check_packing(build("opt"), "critic", "data.packing")


@pytest.mark.parametrize("name", ["phi", "gemma2"])
def test_update_gradients_and_tdpo_kl_follow_the_head(name):
    """Gradient of the summed log-probs w.r.t. the head (bias included) and TDPO's full-vocabulary KL, against
    the same through HF's logits."""
    lm = build(name)
    ids, attn = _padded(_rows())
    mask = attn.bool()
    policy = PolicyModel(lm)
    ref_w, ref_head = policy.gathered_head()
    ref_w = ref_w * 0.5  # a reference that differs from the policy
    with torch.no_grad():
        ref_hidden = policy.hidden_states(ids, attn)[:, :-1][mask[:, 1:]]
    params = [p for p in (policy.head_weight, lm.get_output_embeddings().bias) if p is not None]
    out = policy(ids, attn, loss_mask=mask, kl_ref=(ref_hidden, ref_w, ref_head))
    got = torch.autograd.grad(out["logp"].sum() + out["kl"].sum(), params)
    logits = lm(input_ids=ids, attention_mask=attn).logits.float()[:, :-1][mask[:, 1:]]  # [N, V]
    own = torch.log_softmax(logits, -1)
    ref = torch.log_softmax(fam.head_logits(ref_hidden, ref_w, ref_head), -1)
    kl = (ref.exp() * (ref - own)).sum(-1)
    torch.testing.assert_close(out["kl"][:, 1:][mask[:, 1:]], kl, rtol=0, atol=TOL)
    want = torch.autograd.grad(
        _next_token(torch.log_softmax(lm(input_ids=ids, attention_mask=attn).logits.float(), -1), ids)[
            mask[:, 1:]
        ].sum()
        + kl.sum(),
        params,
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=TOL)


# ---- stop tokens ----


def _chat_model():
    tok = tiny_tokenizer([f"w{i}" for i in range(20)])
    lm = tiny_causal_lm(len(tok), hidden=16, layers=1, seed=2).eval()
    return tok, lm


def test_a_chat_model_stops_at_its_end_of_turn_token(tmp_path):
    """generation_config.json lists an end-of-turn token that is not the tokenizer's EOS: the engine stops there,
    as HF's own generate does."""
    tok, lm = _chat_model()
    prompts = [tok.encode("<|user|> w1 w2 <|end|> <|assistant|>"), tok.encode("<|user|> w3 <|end|> <|assistant|>")]
    cfg = RolloutConfig(max_new_tokens=6, top_k=1, micro_batch_size=2)
    free = HFEngine(PolicyModel(lm), lm, tok, cfg, torch.device("cpu")).generate(prompts)  # tokenizer EOS only
    first = free.input_ids[0, len(prompts[0])].item()  # the greedy first token of row 0
    assert first != tok.eos_token_id
    GenerationConfig(eos_token_id=[tok.eos_token_id, first]).save_pretrained(tmp_path)
    stops = stop_token_ids(tok, str(tmp_path), [])
    assert stops == [tok.eos_token_id, first]
    batch = HFEngine(PolicyModel(lm), lm, tok, cfg, torch.device("cpu"), stop_ids=stops).generate(prompts)
    assert batch.response_lengths[0] == 1 and batch.input_ids[0, len(prompts[0])] == first
    assert not batch.truncated[0]
    lm.generation_config = GenerationConfig.from_pretrained(tmp_path)
    hf = lm.generate(input_ids=torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert hf.shape[1] - len(prompts[0]) == 1  # HF's own generate stops after the same one token


def test_stop_token_ids_union_and_errors(tmp_path):
    tok, _ = _chat_model()
    user = tok.convert_tokens_to_ids("<|user|>")
    assert stop_token_ids(tok, str(tmp_path), []) == [tok.eos_token_id]  # no generation_config.json
    GenerationConfig(eos_token_id=7).save_pretrained(tmp_path)
    assert stop_token_ids(tok, str(tmp_path), ["<|user|>", "<|end|>"]) == [tok.eos_token_id, 7, user]
    with pytest.raises(ConfigError, match="stop token '<eot>' is not in the vocabulary"):
        stop_token_ids(tok, str(tmp_path), ["<eot>"])


def test_assemble_cuts_at_any_stop_token_and_forces_the_primary_eos():
    batch = assemble(
        [[5, 6], [7]],
        [[8, 3, 9], [8, 8, 8]],
        [[-1.0, -2.0, -3.0], [-1.0, -1.5, -2.5]],
        stop_ids=[2, 3],
        pad_id=0,
        max_new_tokens=3,
        device="cpu",
    )
    assert batch.input_ids.tolist() == [[5, 6, 8, 3], [7, 8, 8, 2]]  # row 0 stops at 3; row 1 capped: EOS 2
    assert batch.truncated.tolist() == [False, True]
    assert batch.response_mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    assert batch.rollout_logp.tolist() == [[0.0, 0.0, -1.0, -2.0], [0.0, -1.0, -1.5, -2.5]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
