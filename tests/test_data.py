"""Data: loading local files, row validation errors, chat templating and loss masks, length policy, batching."""

from __future__ import annotations

import json

import pytest
import torch

from rto.config import ConfigError, DataConfig, ModelConfig
from rto.data import (
    DataError,
    collate,
    collate_packed,
    epoch_batches,
    last_token_index,
    load_rows,
    per_sequence_sum,
    rank_micro_batches,
    tokenize_pairs,
    tokenize_sft,
)
from rto.models import load_tokenizer, tiny_tokenizer
from tests.assets import WORDS, write_jsonl

TOK = tiny_tokenizer(WORDS)
USER = {"role": "user", "content": "repeat w1 w2"}
GOOD = {"role": "assistant", "content": "w1 w2"}
BAD = {"role": "assistant", "content": "w3"}


def cfg(**kw) -> DataConfig:
    return DataConfig(path="x", **kw)


def test_load_json_jsonl_parquet_and_saved_folder(tmp_path):
    rows = [{"messages": [USER, GOOD]}, {"messages": [USER, BAD]}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = load_rows(str(jsonl), "train")
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (jsonl, tmp_path / "a.json", tmp_path / "a.parquet", tmp_path / "saved"):
        got = load_rows(str(path), "train")
        assert len(got) == 2 and got[1]["messages"][1]["content"] == "w3"
    with pytest.raises(ConfigError, match="no such file or folder: ./missing.jsonl"):
        load_rows("./missing.jsonl", "train")
    (tmp_path / "a.csv").write_text("x\n1\n")
    with pytest.raises(ConfigError, match="is not a .json, .jsonl or .parquet file"):
        load_rows(str(tmp_path / "a.csv"), "train")


def test_sft_masks_cover_the_last_assistant_turn_only():
    rows = [{"messages": [USER, {"role": "assistant", "content": "w9"}, {"role": "user", "content": "w4"}, GOOD]}]
    (ex,), report = tokenize_sft(rows, TOK, cfg(), "sft")
    ids = TOK.convert_ids_to_tokens(ex.input_ids)
    response = [t for t, m in zip(ids, ex.loss_mask) if m]
    assert response == ["w1", "w2", "<|end|>"]
    assert ids[: ex.loss_mask.index(True)].count("<|assistant|>") == 2  # the earlier turn is context
    assert report.kept == 1


def test_pairs_accept_ultrafeedback_and_bare_responses():
    rows = [
        {"prompt": "repeat w1 w2", "chosen": [USER, GOOD], "rejected": [USER, BAD]},  # UltraFeedback style
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # responses only
    ]
    (p1, p2), _ = tokenize_pairs(rows, TOK, cfg(), "pairs")
    assert p1.chosen.input_ids == p2.chosen.input_ids and p1.rejected.input_ids == p2.rejected.input_ids
    n_prompt = p1.chosen.loss_mask.index(True)
    assert p1.chosen.input_ids[:n_prompt] == p1.rejected.input_ids[:n_prompt]


@pytest.mark.parametrize(
    "row,message",
    [
        ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "pairs row 1: missing field 'prompt'"),
        ({"prompt": "repeat w1", "chosen": "w1", "rejected": [BAD]}, "pairs row 1: field 'chosen' must be a non-empty"),
        ({"prompt": "  ", "chosen": [GOOD], "rejected": [BAD]}, "pairs row 1: field 'prompt' is an empty prompt"),
        ({"prompt": "repeat", "chosen": [GOOD], "rejected": [USER]}, "field 'rejected' has no assistant response"),
        ({"prompt": "r", "chosen": [{"role": "assistant", "content": " "}], "rejected": [BAD]}, "empty response"),
        ({"prompt": "r", "chosen": [{"role": "assistant"}], "rejected": [BAD]}, "message 0 must be {role: str"),
    ],
)
def test_malformed_rows_name_dataset_row_and_field(row, message):
    good = {"prompt": "repeat w1", "chosen": [GOOD], "rejected": [BAD]}
    with pytest.raises(DataError) as e:
        tokenize_pairs([good, row], TOK, cfg(), "pairs")
    assert message in str(e.value)
    items, report = tokenize_pairs([good, row, good], TOK, cfg(bad_rows="skip"), "pairs")
    assert len(items) == 2 and report.kept == 2 and report.rows == 3
    assert sum(report.counts.values()) == 1 and "skipped" in report.summary()


def test_length_policy_is_applied_and_counted():
    long_prompt = {"role": "user", "content": "repeat " + " ".join(WORDS[:20])}
    rows = [{"messages": [long_prompt, GOOD]}, {"messages": [USER, GOOD]}]
    with pytest.raises(DataError, match="sft row 0: prompt has 24 tokens, over data.max_prompt_length=10"):
        tokenize_sft(rows, TOK, cfg(max_prompt_length=10, max_length=40), "sft")
    items, report = tokenize_sft(rows, TOK, cfg(max_prompt_length=10, max_length=40, overlong="drop"), "sft")
    assert len(items) == 1 and report.counts["prompts dropped (over 10 tokens)"] == 1
    items, report = tokenize_sft(rows, TOK, cfg(max_prompt_length=10, max_length=40, overlong="truncate"), "sft")
    assert len(items) == 2 and items[0].loss_mask.index(True) == 10
    assert TOK.convert_ids_to_tokens(items[0].input_ids[9]) == "<|assistant|>"  # the end of the prompt is kept
    items, report = tokenize_sft(rows[1:], TOK, cfg(max_prompt_length=7, max_length=8), "sft")
    assert len(items[0].input_ids) == 8 and report.counts["responses cut at data.max_length=8"] == 1


def test_tokenizer_without_template_or_pad_token_is_refused(tmp_path):
    tok = tiny_tokenizer(WORDS)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "t")
    with pytest.raises(ConfigError, match="has no chat template: set model.chat_template"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "t")))
    fixed = load_tokenizer(ModelConfig(path=str(tmp_path / "t"), chat_template="{{ messages[0]['content'] }}"))
    assert fixed.chat_template
    tok = tiny_tokenizer(WORDS)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match="has no pad token: set model.pad_token"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "p")))
    with pytest.raises(ConfigError, match="model.pad_token 'nope' is not in the vocabulary"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "p"), pad_token="nope"))
    assert load_tokenizer(ModelConfig(path=str(tmp_path / "p"), pad_token="<|end|>")).pad_token == "<|end|>"


def test_padded_and_packed_batches_reduce_alike():
    rows = [{"messages": [USER, GOOD]}, {"messages": [{"role": "user", "content": "repeat w5"}, BAD]}]
    items, _ = tokenize_sft(rows, TOK, cfg(), "sft")
    padded, packed = collate(items, TOK.pad_token_id), collate_packed(items)
    assert padded["input_ids"].shape == (2, max(len(e.input_ids) for e in items))
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in items))
    assert packed["cu_seqlens"].tolist() == [
        0,
        len(items[0].input_ids),
        len(items[0].input_ids) + len(items[1].input_ids),
    ]
    assert packed["position_ids"][0, len(items[0].input_ids)].item() == 0  # restarts at each sequence
    values = {name: b["input_ids"].float() for name, b in (("padded", padded), ("packed", packed))}
    sums = {n: per_sequence_sum(values[n], b["loss_mask"], b["seq_id"], 2) for n, b in (("padded", padded),
            ("packed", packed))}  # fmt: skip
    torch.testing.assert_close(sums["padded"], sums["packed"])
    last_padded = padded["input_ids"].reshape(-1)[last_token_index(padded["seq_id"], 2)]
    last_packed = packed["input_ids"].reshape(-1)[last_token_index(packed["seq_id"], 2)]
    assert last_padded.tolist() == last_packed.tolist() == [TOK.eos_token_id] * 2


def test_batches_are_seeded_full_and_split_evenly_across_ranks():
    a, b = epoch_batches(10, 4, seed=1, epoch=0), epoch_batches(10, 4, seed=1, epoch=0)
    assert a == b and len(a) == 2 and all(len(x) == 4 for x in a)
    assert epoch_batches(10, 4, seed=1, epoch=1) != a
    assert len({i for batch in a for i in batch}) == 8
    parts = [rank_micro_batches(list(range(8)), r, 2, 2) for r in range(2)]
    assert parts == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
