"""Models: the fused-head policy against HF's own logits, scalar heads, tiny factories, path checks."""

from __future__ import annotations

import pytest
import torch

from rto.config import ConfigError, ModelConfig
from rto.data import Example, collate, collate_packed, tokenize_sft
from rto.models import PolicyModel, ScalarModel, check_model_path, last_valid, load_scalar_model, tiny_causal_lm
from tests.assets import make_assets
from tests.test_data import TOK, USER, cfg


def _batch():
    second = [{"role": "user", "content": "repeat w7"}, {"role": "assistant", "content": "w7"}]
    rows = [{"messages": [USER, {"role": "assistant", "content": "w1 w2 w3"}]}, {"messages": second}]
    items, _ = tokenize_sft(rows, TOK, cfg(), "sft")
    return collate(items, TOK.pad_token_id)


def test_policy_logprobs_equal_hf_logits():
    lm = tiny_causal_lm(len(TOK), seed=3)
    b = _batch()
    out = PolicyModel(lm)(b["input_ids"], b["attention_mask"], loss_mask=b["loss_mask"], temperature=0.8)
    logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1] / 0.8
    expected = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    mask = b["loss_mask"][:, 1:]
    torch.testing.assert_close(out["logp"][:, 1:][mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert (out["logp"][:, 1:][~mask] == 0).all() and (out["logp"][:, 0] == 0).all()


def test_scalar_model_from_a_causal_lm_checkpoint(tmp_path):
    paths = make_assets(tmp_path, n=4)
    hf = load_scalar_model(str(paths["model"]), ModelConfig(path=str(paths["model"])))
    assert hf.config.num_labels == 1 and hf.dropout.p == 0.0
    b = _batch()
    values = ScalarModel(hf)(b["input_ids"], b["attention_mask"])
    assert values.shape == b["input_ids"].shape and values.dtype == torch.float32
    score = last_valid(values, b["attention_mask"])
    n = b["attention_mask"].sum(1) - 1
    torch.testing.assert_close(score, values[torch.arange(2), n])
    with pytest.raises(ValueError, match="a row has no valid token"):
        last_valid(values, torch.zeros_like(b["attention_mask"]))


def test_model_paths_are_checked_before_loading():
    with pytest.raises(ConfigError, match="model.path: no such file or folder: ./nowhere"):
        check_model_path("./nowhere")
    with pytest.raises(ConfigError, match="ref: no such file or folder: runs/x/hf"):
        check_model_path("runs/x/hf", "ref")
    check_model_path("meta-llama/Meta-Llama-3-8B")  # a hub id is left to the hub client


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batches_match_padded_on_cpu(attn):
    """Padding-free batches: HF reads the sequence boundaries from the restarting position ids (no KV cache) and
    masks attention block-diagonally, so packed and padded forwards agree."""
    lm = tiny_causal_lm(len(TOK), seed=1)
    lm.config._attn_implementation = attn
    b = _batch()
    items = [Example(ids[m].tolist(), lm_[m].tolist()) for ids, lm_, m in zip(b["input_ids"], b["loss_mask"],
             b["attention_mask"].bool())]  # fmt: skip
    assert len({len(e.input_ids) for e in items}) > 1  # ragged: the padded batch has padding
    padded, packed = collate(items, TOK.pad_token_id), collate_packed(items)
    model = PolicyModel(lm)
    a = model(padded["input_ids"], padded["attention_mask"], loss_mask=padded["loss_mask"])["logp"]
    p = model(packed["input_ids"], None, packed["position_ids"], loss_mask=packed["loss_mask"])["logp"]
    torch.testing.assert_close(a[padded["loss_mask"]], p[packed["loss_mask"]], rtol=0, atol=1e-5)
    ga = torch.autograd.grad(a.sum(), lm.model.layers[0].self_attn.q_proj.weight)[0]
    gp = torch.autograd.grad(p.sum(), lm.model.layers[0].self_attn.q_proj.weight)[0]
    torch.testing.assert_close(ga, gp, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_batches_match_padded_with_flash_attention():
    pytest.importorskip("flash_attn", reason="padding-free attention needs flash-attn")
    lm = tiny_causal_lm(len(TOK), seed=1).to("cuda", torch.bfloat16)
    lm.config._attn_implementation = "flash_attention_2"
    b = _batch()
    items = [Example(ids[m].tolist(), lm_[m].tolist()) for ids, lm_, m in zip(b["input_ids"], b["loss_mask"],
             b["attention_mask"].bool())]  # fmt: skip
    padded, packed = collate(items, TOK.pad_token_id, "cuda"), collate_packed(items, "cuda")
    model = PolicyModel(lm)
    with torch.no_grad():
        a = model(padded["input_ids"], padded["attention_mask"], loss_mask=padded["loss_mask"])["logp"]
        b = model(packed["input_ids"], None, packed["position_ids"], loss_mask=packed["loss_mask"])["logp"]
    torch.testing.assert_close(a[padded["loss_mask"]], b[packed["loss_mask"]], rtol=0, atol=3e-2)
