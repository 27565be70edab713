"""Models: the fused-head policy against HF's own logits, scalar heads, tiny factories, path checks."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from rto.config import ConfigError, ModelConfig
from rto.data import Example, collate, collate_packed, tokenize_sft
from rto.families import ModelError
from rto.models import (
    PolicyModel,
    ScalarModel,
    check_model_path,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    reward_normalisation,
    tiny_causal_lm,
)
from rto.tensors import last_valid
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
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    b = _batch()
    values = ScalarModel(hf)(b["input_ids"], b["attention_mask"])
    assert values.shape == b["input_ids"].shape and values.dtype == torch.float32
    score = last_valid(values, b["attention_mask"])
    n = b["attention_mask"].sum(1) - 1
    torch.testing.assert_close(score, values[torch.arange(2), n])
    with torch.no_grad():  # HF's own sequence score: the head at the last non-pad token
        own = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(score, own, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="a row has no valid token"):
        last_valid(values, torch.zeros_like(b["attention_mask"]))


# ---- reward models as they are published ----

V = 64
SIZES = dict(vocab_size=V, hidden_size=16, num_attention_heads=2, pad_token_id=0, tie_word_embeddings=False)
RM_CONFIGS = {  # families with a token-classification class, and some without one (OPT, Gemma 3, OLMo 2)
    "gpt_neox": ("GPTNeoXConfig", dict(SIZES, intermediate_size=32, num_hidden_layers=1)),
    "opt": ("OPTConfig", dict(SIZES, ffn_dim=32, num_hidden_layers=1, word_embed_proj_dim=16)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(SIZES, intermediate_size=32, num_hidden_layers=1, head_dim=8, num_key_value_heads=1),
    ),
    "llama": ("LlamaConfig", dict(SIZES, intermediate_size=32, num_hidden_layers=1, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", dict(SIZES, intermediate_size=32, num_hidden_layers=1, num_key_value_heads=1)),
    "gemma2": (
        "Gemma2Config",
        dict(SIZES, intermediate_size=32, num_hidden_layers=1, head_dim=8, num_key_value_heads=1),
    ),
    "olmo2": ("Olmo2Config", dict(SIZES, intermediate_size=32, num_hidden_layers=1, num_key_value_heads=1)),
}


def _rm_config(name):
    config_cls, settings = RM_CONFIGS[name]
    return getattr(transformers, config_cls)(**settings, num_labels=1)


def _rm_rows():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (3, 6), generator=g)
    attn = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    return ids.masked_fill(attn == 0, 0), attn


def _hand_score(base: torch.nn.Module, head_weight: torch.Tensor, ids, attn) -> torch.Tensor:
    """The saved head applied to the base model's hidden state at each row's last token."""
    with torch.no_grad():
        hidden = base(input_ids=ids, attention_mask=attn).last_hidden_state  # [B, T, H]
    return (hidden[torch.arange(len(ids)), attn.sum(1) - 1] @ head_weight.T).squeeze(-1)


def _score(path, attn_implementation: str = "sdpa") -> torch.Tensor:
    cfg = ModelConfig(path=str(path), attn_implementation=attn_implementation)
    hf = load_scalar_model(str(path), cfg, "reward")
    ids, attn = _rm_rows()
    with torch.no_grad():
        return last_valid(ScalarModel(hf)(ids, attn), attn), hf


@pytest.mark.parametrize("name", list(RM_CONFIGS))
def test_sequence_classification_reward_models_load_with_their_head(tmp_path, name):
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(_rm_config(name), attn_implementation="eager").eval()
    rm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")["score.weight"]
    if name == "gemma2":  # its sequence-classification class has no sdpa path: refused with our setting's name
        with pytest.raises(ConfigError, match="Gemma2ForSequenceClassification cannot run attention through sdpa; set"):
            _score(tmp_path)
    score, hf = _score(tmp_path, "eager" if name == "gemma2" else "sdpa")
    ids, attn = _rm_rows()
    torch.testing.assert_close(score, _hand_score(rm.base_model, saved, ids, attn), rtol=0, atol=1e-5)
    with torch.no_grad():
        own = rm(input_ids=ids, attention_mask=attn).logits.squeeze(-1)  # HF's own pooled score
    torch.testing.assert_close(score, own, rtol=0, atol=1e-5)
    assert reward_normalisation(hf) is None


def _openrlhf_rm(folder, name: str, prefix: str, saved_as: str | None = None):
    """An OpenRLHF-format reward model: {base_model_prefix}.* and a bias-free value head `prefix`, with the
    normalisation statistics in config.json."""
    config = _rm_config(name)
    torch.manual_seed(1)
    base = AutoModel.from_config(config)
    state = {f"{base.base_model_prefix}.{k}": v.contiguous() for k, v in base.state_dict().items()}
    head = torch.randn(1, config.hidden_size)
    state[f"{saved_as or prefix}.weight"] = head
    folder.mkdir(exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    extra = dict(architectures=["RewardModel"], value_head_prefix=prefix, normalize_reward=True, mean=1.5, std=2.0)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), **extra}))
    return base.eval(), head


@pytest.mark.parametrize("prefix", ["value_head", "score"])
def test_openrlhf_reward_models_load_with_their_value_head_and_statistics(tmp_path, prefix):
    base, head = _openrlhf_rm(tmp_path, "llama", prefix)
    score, hf = _score(tmp_path)
    ids, attn = _rm_rows()
    torch.testing.assert_close(score, _hand_score(base, head, ids, attn), rtol=0, atol=1e-5)
    assert reward_normalisation(hf) == (1.5, 2.0)


def test_a_reward_model_missing_its_head_weights_stops_the_run(tmp_path):
    _openrlhf_rm(tmp_path / "a", "llama", "value_head", saved_as="v_head")
    with pytest.raises(ModelError, match=r"reward \(.*RewardModel\): missing weights when loading: score.weight"):
        _score(tmp_path / "a")
    rm = AutoModelForSequenceClassification.from_config(_rm_config("gpt_neox"))
    rm.save_pretrained(tmp_path / "b")
    state = load_file(tmp_path / "b" / "model.safetensors")
    state["classifier.weight"] = state.pop("score.weight")  # a head under another name
    save_file(state, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="GPTNeoXForSequenceClassification\\): missing weights .*score.weight"):
        _score(tmp_path / "b")


def test_a_causal_lm_without_a_token_classification_class_gets_a_new_head(tmp_path):
    AutoModelForCausalLM.from_config(_rm_config("opt")).save_pretrained(tmp_path)
    score, hf = _score(tmp_path)
    assert type(hf).__name__ == "OPTForSequenceClassification" and score.shape == (3,)


def test_a_causal_lm_is_refused_as_a_scorer_and_its_new_head_said_in_one_line(tmp_path, caplog):
    """PPO's and eval's `reward` scores: a checkpoint without a scalar head would score at random, so it is refused
    (a reward model to be trained, or a critic, gets its new head, said in one line instead of transformers'
    load report)."""
    paths = make_assets(tmp_path, n=4)
    lm = str(paths["model"])
    with pytest.raises(ModelError, match=r"^reward: .* \(LlamaForCausalLM\) is not a reward model: it has no scalar"):
        load_scalar_model(lm, ModelConfig(path=lm), "reward", scorer=True)
    from rto import build
    from rto.config import ParallelConfig

    with pytest.raises(ModelError, match=r"^reward: .* is not a reward model"):  # PPO's frozen reward model scores
        build.scalar(lm, ModelConfig(path=lm), "reward", ParallelConfig(), torch.device("cpu"), frozen=True)
    reports = []  # transformers' own records (its logger does not propagate to caplog's)
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    transformers.logging.get_logger("transformers").addHandler(handler)
    try:
        with caplog.at_level("INFO", logger="rto.models"):
            load_scalar_model(lm, ModelConfig(path=lm), "model.path")
    finally:
        transformers.logging.get_logger("transformers").removeHandler(handler)
    assert "model.path: " in caplog.text and "has no scalar head: a new one-label SequenceClassification" in caplog.text
    assert not any("LOAD REPORT" in r for r in reports), reports
    rm = tmp_path / "rm"
    load_scalar_model(lm, ModelConfig(path=lm)).save_pretrained(rm)  # now a one-label seq-cls checkpoint
    assert type(load_scalar_model(str(rm), ModelConfig(path=str(rm)), "reward", scorer=True)).__name__ == (
        "LlamaForSequenceClassification"
    )


def test_model_paths_are_checked_before_loading():
    with pytest.raises(ConfigError, match="model.path: no such file or folder: ./nowhere"):
        check_model_path("./nowhere")
    with pytest.raises(ConfigError, match="ref: no such file or folder: runs/x/hf"):
        check_model_path("runs/x/hf", "ref")
    check_model_path("meta-llama/Meta-Llama-3-8B")  # a hub id is left to the hub client


def test_a_wrong_kind_of_model_path_is_named_before_the_tokenizer_reads_it(tmp_path):
    """The tokenizer is the first thing read from model.path: a file, an empty folder or a run folder must get the
    path's own message, not a tokenizer library's complaint about a missing vocabulary file."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "config.json").write_text("{}")
    cases = {"notes.txt": "is a file", "empty": "holds no config.json", "run": "is a run folder; its model is"}
    for name, says in cases.items():
        with pytest.raises(ConfigError, match=f"^model.path: {re.escape(str(tmp_path / name))} {says}"):
            load_tokenizer(ModelConfig(path=str(tmp_path / name)))


def test_a_truncated_weights_file_is_named(tmp_path):
    lm = tiny_causal_lm(vocab_size=32, hidden=16, layers=1, heads=2)
    lm.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"^model.path: {re.escape(str(weights))} is unreadable: "):
        load_causal_lm(str(tmp_path), ModelConfig(path=str(tmp_path), dtype="float32"))


def _examples(b) -> list[Example]:
    """The rows of a padded batch as unpadded examples."""
    rows = zip(b["input_ids"], b["loss_mask"], b["attention_mask"].bool())
    return [Example(ids[m].tolist(), loss[m].tolist()) for ids, loss, m in rows]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batches_match_padded_on_cpu(attn):
    """Padding-free batches: HF reads the sequence boundaries from the restarting position ids (no KV cache) and
    masks attention block-diagonally, so packed and padded forwards agree."""
    lm = tiny_causal_lm(len(TOK), seed=1)
    lm.config._attn_implementation = attn
    b = _batch()
    items = _examples(b)
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
    items = _examples(b)
    padded, packed = collate(items, TOK.pad_token_id, "cuda"), collate_packed(items, "cuda")
    model = PolicyModel(lm)
    with torch.no_grad():
        a = model(padded["input_ids"], padded["attention_mask"], loss_mask=padded["loss_mask"])["logp"]
        b = model(packed["input_ids"], None, packed["position_ids"], loss_mask=packed["loss_mask"])["logp"]
    torch.testing.assert_close(a[padded["loss_mask"]], b[packed["loss_mask"]], rtol=0, atol=3e-2)
