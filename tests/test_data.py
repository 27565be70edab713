"""Data: loading and file errors, row reading and its errors, chat templating and loss masks token by token,
length policy, batching."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from rto.config import ConfigError, DataConfig, ModelConfig
from rto.data import (
    DataError,
    Example,
    collate,
    collate_packed,
    epoch_batches,
    last_token_index,
    load_data_rows,
    load_rows,
    per_sequence_sum,
    prompt_turns,
    rank_micro_batches,
    require_rows,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)
from rto.models import load_tokenizer, tiny_causal_lm, tiny_tokenizer
from tests.assets import WORDS, write_jsonl

TOK = tiny_tokenizer(WORDS)
USER = {"role": "user", "content": "repeat w1 w2"}
GOOD = {"role": "assistant", "content": "w1 w2"}
BAD = {"role": "assistant", "content": "w3"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def cfg(**kw) -> DataConfig:
    c = DataConfig(path="x")
    for k, v in kw.items():  # setattr: also settings DataConfig may not declare yet (format, assistant_turns)
        setattr(c, k, v)
    return c


def marked(example: Example, tok=TOK) -> list[tuple[str, bool]]:
    return list(zip(tok.convert_ids_to_tokens(example.input_ids), example.loss_mask))


def expect(text: str) -> list[tuple[str, bool]]:
    """Tokens with their loss flags, written by hand: "a [b c] d" trains b and c."""
    out, on = [], False
    for token in text.split():
        on = on or token.startswith("[")
        out.append((token.strip("[]") if len(token) > 1 else token, on))
        on = on and not token.endswith("]")
    return out


# ---- loading ----


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


def test_splits_are_listed_and_a_single_file_has_none(tmp_path):
    import datasets  # here, not at the top: tests/test_models.py imports this module on machines without datasets

    rows = [{"messages": [USER, GOOD]}]
    parts = {"train_prefs": datasets.Dataset.from_list(rows), "test_prefs": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "uf"))
    assert len(load_rows(str(tmp_path / "uf"), "test_prefs")) == 1
    with pytest.raises(DataError, match="has no split 'train'; its splits: train_prefs, test_prefs"):
        load_rows(str(tmp_path / "uf"), "train")
    one = write_jsonl(tmp_path / "one.jsonl", rows)
    with pytest.raises(ConfigError, match="data.split='test': .*one.jsonl is one file, so it has no splits"):
        load_data_rows(DataConfig(path=str(one), split="test"))


def test_bad_files_name_the_file_and_line(tmp_path):
    good = json.dumps({"messages": [USER, GOOD]})
    cases = {
        "empty.jsonl": (b"", "empty.jsonl: the file is empty"),
        "blank.jsonl": (b"\n \n", "blank.jsonl: the file holds no rows"),
        "broken.jsonl": (f"{good}\n{good}\n{good[:-3]}\n".encode(), "broken.jsonl line 3: is not valid JSON"),
        "array.jsonl": (f"{good}\n[1, 2]\n".encode(), "array.jsonl line 2: is a JSON list, not an object"),
        "doc.json": (b'[{"a": 1},\n {"a": 2]', r"doc.json: is not a UTF-8 JSON document \(.* line 2"),
        "bad.parquet": (b"PAR1 not really", "bad.parquet: cannot be loaded"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            load_rows(str(tmp_path / name), "train")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(f"{good}\n{{oops\n".encode())
    with pytest.raises(DataError, match="folder/train.jsonl line 2: is not valid JSON"):
        load_rows(str(folder), "train")


def test_a_non_utf8_line_is_refused_by_line_or_skipped_and_counted(tmp_path, caplog):
    good = json.dumps({"messages": [USER, GOOD]}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good.replace(b"w1 w2", b"w1 \xe9") + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl line 2: is not UTF-8 \(byte 0xe9.*set data.bad_rows=skip"):
        load_rows(str(path), "train")
    with caplog.at_level(logging.WARNING, logger="rto.formats"):
        rows = load_data_rows(DataConfig(path=str(path), bad_rows="skip"))
    assert len(rows) == 2 and rows[1]["messages"][1]["content"] == "w1 w2"
    assert "1 bad lines left out (data.bad_rows=skip): line 2 is not UTF-8" in caplog.text


def test_too_few_rows_for_one_batch_is_named():
    require_rows(8, 8, "d", "train.global_batch_size")
    with pytest.raises(DataError, match="d: 1 usable rows cannot fill one batch of train.global_batch_size=8"):
        require_rows(1, 8, "d", "train.global_batch_size")


# ---- SFT: every assistant turn ----


def test_sft_trains_every_assistant_turn_or_the_last():
    conv = [{"role": "system", "content": "w5"}, USER, reply("w9"), user("w4"), GOOD]
    (ex,), report = tokenize_sft([{"messages": conv}], TOK, cfg(), "sft")
    assert marked(ex) == expect(
        "<|system|> w5 <|end|> <|user|> repeat w1 w2 <|end|> <|assistant|> [w9 <|end|>] <|user|> w4 <|end|> "
        "<|assistant|> [w1 w2 <|end|>]"
    )
    assert (report.turns, report.loss_tokens) == (2, 5) and "2 assistant turns, 5 loss tokens" in report.summary()
    (last,), report = tokenize_sft([{"messages": conv}], TOK, cfg(assistant_turns="last"), "sft")
    assert last.input_ids == ex.input_ids and [t for t, m in marked(last) if m] == ["w1", "w2", "<|end|>"]
    # a conversation that ends on a user turn: the turn (which no loss covers) is left out and counted
    (cut,), report = tokenize_sft([{"messages": conv + [user("w6")]}], TOK, cfg(), "sft")
    assert (
        cut == ex
        and sum(report.counts.values()) == 1
        and "ending after their last assistant turn" in str(report.counts)
    )


def test_a_template_that_renders_turns_differently_in_context_is_refused_or_trained_on_the_last():
    tok = tiny_tokenizer(WORDS)  # like templates that strip earlier replies' reasoning: earlier replies render as w0
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' and not loop.last %}w0{% else %}"
        "{{ m['content'] }}{% endif %} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    rows = [{"messages": [USER, reply("w9"), user("w4"), GOOD]}]
    with pytest.raises(DataError) as e:
        tokenize_sft(rows, tok, cfg(), "sft")
    assert "sft row 0: the chat template does not render turns 0-1 as the start of the conversation (first " in str(
        e.value
    )
    assert "difference at character 45: " in str(e.value) and "; set data.assistant_turns=last" in str(e.value)
    (ex,), _ = tokenize_sft(rows, tok, cfg(assistant_turns="last"), "sft")
    tokens = tok.convert_ids_to_tokens(ex.input_ids)
    assert [t for t, m in zip(tokens, ex.loss_mask) if m] == ["w1", "w2", "<|end|>"] and "w0" in tokens


def test_template_errors_and_prefix_mismatches_become_row_errors():
    tok = tiny_tokenizer(WORDS)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('Only user and assistant roles "
        "are supported') }}{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    rows = [{"messages": [USER, GOOD]}, {"messages": [{"role": "system", "content": "w5"}, USER, GOOD]}]
    with pytest.raises(DataError, match="sft row 1: the chat template refused the turns .*Only user and assistant"):
        tokenize_sft(rows, tok, cfg(), "sft")
    tok.chat_template = (  # marks the final turn, so a prompt never renders as the start of its conversation
        "{% for m in messages %}{% if loop.last and not add_generation_prompt %}<|system|> {% endif %}"
        "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> "
        "{% endif %}"
    )
    with pytest.raises(DataError) as e:
        tokenize_pairs([{"prompt": "repeat w1 w2", "chosen": [GOOD], "rejected": [BAD]}], tok, cfg(), "pairs")
    assert str(e.value).startswith("pairs row 0: the chat template does not render turns 0-0 as the start")
    assert "first difference at character 32: '<|end|> <|assistant|' vs '<|end|> <|system|> <'" in str(e.value)


# ---- preference pairs ----


def test_pairs_accept_ultrafeedback_bare_and_plain_string_responses():
    rows = [
        {"prompt": "repeat w1 w2", "chosen": [USER, GOOD], "rejected": [USER, BAD]},  # UltraFeedback style
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # responses only
        {"prompt": "repeat w1 w2", "chosen": "w1 w2", "rejected": "w3"},  # plain strings
    ]
    (p1, p2, p3), report = tokenize_pairs(rows, TOK, cfg(), "pairs")
    assert p1 == p2 == p3
    assert marked(p1.rejected) == expect("<|user|> repeat w1 w2 <|end|> <|assistant|> [w3 <|end|>]")
    assert report.read["'chosen' as plain text"] == 1 and report.turns == 6
    assert "prompts from column 'prompt'" in report.summary()


@pytest.mark.parametrize(
    "row,message",
    [
        ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "pairs row 1: missing field 'prompt'"),
        ({"prompt": "repeat w1", "chosen": 5, "rejected": [BAD]}, "field 'chosen' must be a non-empty list of"),
        ({"prompt": "  ", "chosen": [GOOD], "rejected": [BAD]}, "pairs row 1: field 'prompt' is empty"),
        ({"prompt": "repeat", "chosen": [GOOD], "rejected": [user("repeat")]}, "'rejected' has no assistant reply"),
        ({"prompt": "r", "chosen": [reply(" ")], "rejected": [BAD]}, "field 'chosen' has an empty reply"),
        ({"prompt": "r", "chosen": [{"role": "assistant"}], "rejected": [BAD]}, "turn 0 must be {role: str, con"),
        (
            {"prompt": "repeat w1 w2", "chosen": [USER, GOOD, user("w4"), BAD], "rejected": [BAD]},
            "field 'chosen' goes on past the reply (turn 2 is a user turn)",
        ),
        ({"prompt": "repeat w1 w2", "chosen": [GOOD, BAD], "rejected": [BAD]}, "turn 1 is an assistant turn"),
        ({"prompt": "repeat w1 w2", "chosen": [USER, GOOD], "rejected": [GOOD]}, "hold the same reply"),
        (
            {"prompt": "repeat w1 w2\n", "chosen": [USER, GOOD], "rejected": [BAD]},
            "'chosen' does not repeat the prompt: turn 0 differs from the prompt's, first difference at character 12: "
            "'peat w1 w2' vs 'peat w1 w2\\n'",
        ),
        (
            {"prompt": [{"role": "tool", "content": "w1"}], "chosen": [GOOD], "rejected": [BAD]},
            "field 'prompt' turn 0 has role 'tool': the roles are system, user and assistant",
        ),
        ({"prompt": [USER, GOOD], "chosen": [BAD], "rejected": [GOOD]}, "'prompt' ends with an assistant turn"),
        ({"prompt": "r", "chosen": "w1\nHuman: w2\nAssistant: w3", "rejected": "w3"}, "looks like a transcript"),
    ],
)
def test_malformed_rows_name_dataset_row_and_field(row, message):
    good = {"prompt": "repeat w1", "chosen": [GOOD], "rejected": [BAD]}
    with pytest.raises(DataError) as e:
        tokenize_pairs([good, row], TOK, cfg(), "pairs")
    assert message in str(e.value), str(e.value)
    items, report = tokenize_pairs([good, row, good], TOK, cfg(bad_rows="skip"), "pairs")
    assert len(items) == 2 and report.kept == 2 and report.rows == 3
    assert sum(report.counts.values()) == 1 and "skipped" in report.summary()


def test_implicit_prompt_and_capitalised_roles():
    rows = [
        {"chosen": [user("w4"), reply("w5"), USER, GOOD], "rejected": [user("w4"), reply("w5"), USER, BAD]},
        {
            "chosen": [{"role": "User", "content": "repeat w1 w2"}, {"role": "Assistant", "content": "w1 w2"}],
            "rejected": [{"role": "USER", "content": "repeat w1 w2"}, {"role": "ASSISTANT", "content": "w3"}],
        },
    ]
    (multi, caps), report = tokenize_pairs(rows, TOK, cfg(), "pairs")
    assert [t for t, m in marked(multi.chosen) if m] == ["w1", "w2", "<|end|>"]  # the shared turns are the prompt
    assert marked(caps.rejected)[-3:] == [("<|assistant|>", False), ("w3", True), ("<|end|>", True)]
    assert report.read["role 'Assistant' read as 'assistant'"] == 1 and report.read["role 'USER' read as 'user'"] == 1
    assert "the turns 'chosen' and 'rejected' share (no 'prompt' column)" in report.summary()
    with pytest.raises(DataError, match="fields 'chosen' and 'rejected' are identical"):
        tokenize_pairs([{"chosen": [USER, GOOD], "rejected": [USER, GOOD]}], TOK, cfg(), "pairs")
    with pytest.raises(DataError, match="'chosen' and 'rejected' share no prompt turns"):
        tokenize_pairs([{"chosen": [GOOD], "rejected": [BAD]}], TOK, cfg(), "pairs")


# ---- prompts ----


def test_prompt_column_rule():
    both = [{"prompt": "repeat w1", "messages": [user("repeat w2"), reply("w2")]}]
    (ids,), report = tokenize_prompts(both, TOK, cfg(), "p")
    assert TOK.convert_ids_to_tokens(ids) == ["<|user|>", "repeat", "w1", "<|end|>", "<|assistant|>"]
    assert "prompts from column 'prompt' (not messages: data.prompt_key=none reads those)" in report.summary()
    (ids,), report = tokenize_prompts(both, TOK, cfg(prompt_key="none"), "p")  # messages less the final reply
    assert TOK.convert_ids_to_tokens(ids) == ["<|user|>", "repeat", "w2", "<|end|>", "<|assistant|>"]
    assert prompt_turns(both, cfg(prompt_key="none"), "p") == [[user("repeat w2")]]
    hh = [{"prompt": "\n\nHuman: repeat w1\n\nAssistant: w1\n\nHuman: w3\n\nAssistant:"}]
    assert prompt_turns(hh, cfg(), "p") == [[user("repeat w1"), reply("w1"), user("w3")]]
    for row, message in [
        ({"prompt": [user("w1"), reply("w1")]}, "p row 0: field 'prompt' ends with an assistant turn; a prompt ends"),
        ({"prompt": "\n\nHuman: w1\n\nAssistant: w2"}, "field 'prompt' ends with an assistant turn"),
        ({"messages": [reply("w1")]}, "field 'messages' holds only an assistant turn"),
        ({"messages": [user("w1"), reply("w1"), reply("w2")]}, "(less a final assistant turn) ends with an assistant"),
        ({"question": "w1"}, "p: no prompt column: none of 'prompt', 'messages' or 'chosen'/'rejected'"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            tokenize_prompts([row], TOK, cfg(), "p")


# ---- length policy, tokenizer, batches ----


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
    with pytest.raises(DataError, match="sft: 0 of 1 rows kept.*: no usable rows"):
        tokenize_sft(rows[:1], TOK, cfg(max_prompt_length=10, max_length=40, bad_rows="skip"), "sft")


def test_tokenizer_without_template_or_pad_token_is_refused(tmp_path):
    config = tiny_causal_lm(len(TOK)).config  # model.path must be a model folder (config.json); no weights needed
    tok = tiny_tokenizer(WORDS)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "t")
    config.save_pretrained(tmp_path / "t")
    with pytest.raises(ConfigError, match="has no chat template: set model.chat_template"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "t")))
    fixed = load_tokenizer(ModelConfig(path=str(tmp_path / "t"), chat_template="{{ messages[0]['content'] }}"))
    assert fixed.chat_template
    tok = tiny_tokenizer(WORDS)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "p")
    config.save_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match="has no pad token: set model.pad_token"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "p")))
    with pytest.raises(ConfigError, match="model.pad_token 'nope' is not in the vocabulary"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "p"), pad_token="nope"))
    assert load_tokenizer(ModelConfig(path=str(tmp_path / "p"), pad_token="<|end|>")).pad_token == "<|end|>"
    # the messages name the command's own settings: ppo's actor.*, eval's and inspect's top-level ones
    with pytest.raises(ConfigError, match="has no pad token: set actor.pad_token"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "p")), "actor.")
    with pytest.raises(ConfigError, match="has no chat template: set chat_template to"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "t")), "")
    with pytest.raises(ConfigError, match="^model: .* holds no config.json: not a Hugging Face model folder"):
        load_tokenizer(ModelConfig(path=str(tmp_path)), "")


def test_collate_pads_right_with_masks_and_row_ids():
    b = collate([Example([5, 6, 7], [False, True, True]), Example([8], [True])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and b["attention_mask"].dtype == torch.long
    assert b["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert b["seq_id"].tolist() == [[0, 0, 0], [1, -1, -1]]


def test_padded_and_packed_batches_reduce_alike():
    rows = [{"messages": [USER, GOOD]}, {"messages": [{"role": "user", "content": "repeat w5"}, BAD]}]
    items, _ = tokenize_sft(rows, TOK, cfg(), "sft")
    padded, packed = collate(items, TOK.pad_token_id), collate_packed(items)
    n0, n1 = len(items[0].input_ids), len(items[1].input_ids)
    assert padded["input_ids"].shape == (2, max(n0, n1)) and packed["input_ids"].shape == (1, n0 + n1)
    assert packed["cu_seqlens"].tolist() == [0, n0, n0 + n1]
    assert packed["position_ids"][0, n0].item() == 0  # restarts at each sequence
    sums = {}
    for name, b in (("padded", padded), ("packed", packed)):
        sums[name] = per_sequence_sum(b["input_ids"].float(), b["loss_mask"], b["seq_id"], 2)
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
