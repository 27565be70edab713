"""Datasets as people bring them, written with the real `datasets` library as jsonl, parquet and saved folders and
read through the project's loaders: OpenAI messages with a system turn and several turns, ShareGPT, Anthropic
HH-RLHF transcripts, plain-string preferences, UltraFeedback's binarized layout, capitalised and unknown roles,
preferences that go on past the reply. Loss masks are checked token by token against hand-written expectations."""

from __future__ import annotations

import datasets
import pytest

from rto.config import ConfigError, DataConfig
from rto.data import DataError, load_data_rows, tokenize_pairs, tokenize_prompts, tokenize_sft
from rto.models import tiny_tokenizer
from tests.assets import WORDS, write_jsonl

TOK = tiny_tokenizer(WORDS)
STORAGE = ["jsonl", "parquet", "saved"]


def stored(rows: list[dict], root, kind: str) -> str:
    """`rows` written as one of the storage kinds people download."""
    if kind == "jsonl":
        return str(write_jsonl(root / "d.jsonl", rows))
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(root / "d.parquet"))
        return str(root / "d.parquet")
    ds.save_to_disk(str(root / "saved"))
    return str(root / "saved")


def data(path: str, **settings) -> DataConfig:
    c = DataConfig(path=path)
    for k, v in settings.items():  # setattr: also settings DataConfig may not declare yet (format, assistant_turns)
        setattr(c, k, v)
    return c


def marked(ids: list[int], mask: list[bool] | None = None) -> str:
    """Tokens as text with the trained ones in brackets: "a [b c] d" (one bracket per run)."""
    mask = mask or [False] * len(ids)
    out, prev = [], False
    for token, m in zip(TOK.convert_ids_to_tokens(ids), mask):
        out.append(("[" if m and not prev else "") + token)
        if prev and not m:
            out[-2] += "]"
        prev = m
    return " ".join(out) + ("]" if prev else "")


def turn(role: str, text: str, keys=("role", "content")) -> dict:
    return {keys[0]: role, keys[1]: text}


MULTI_TURN = (
    "<|system|> w5 <|end|> <|user|> repeat w1 <|end|> <|assistant|> [w1 <|end|>] <|user|> repeat w2 w3 <|end|> "
)
MULTI_TURN += "<|assistant|> [w2 w3 <|end|>]"
ENDS_ON_USER = "<|user|> repeat w4 <|end|> <|assistant|> [w4 <|end|>]"


def conversations(keys, roles) -> list[list[dict]]:
    system, user, assistant = roles
    first = [(system, "w5"), (user, "repeat w1"), (assistant, "w1"), (user, "repeat w2 w3"), (assistant, "w2 w3")]
    second = [(user, "repeat w4"), (assistant, "w4"), (user, "w6")]  # ends on a user turn
    return [[turn(r, t, keys) for r, t in conv] for conv in (first, second)]


@pytest.mark.parametrize("kind", STORAGE)
def test_openai_messages_train_every_assistant_turn(tmp_path, kind):
    rows = [{"messages": c} for c in conversations(("role", "content"), ("system", "user", "assistant"))]
    cfg = data(stored(rows, tmp_path, kind))
    (a, b), report = tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(a.input_ids, a.loss_mask) == MULTI_TURN and marked(b.input_ids, b.loss_mask) == ENDS_ON_USER
    assert (report.turns, report.loss_tokens) == (3, 7)
    assert report.counts["conversations ending after their last assistant turn (the later turns left out)"] == 1
    cfg.assistant_turns = "last"
    (a, _), report = tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(a.input_ids, a.loss_mask) == MULTI_TURN.replace("[w1 <|end|>]", "w1 <|end|>")


@pytest.mark.parametrize("kind", STORAGE)
def test_sharegpt_reads_like_messages_with_the_role_mapping_counted(tmp_path, kind):
    convs = conversations(("from", "value"), ("system", "human", "gpt"))
    rows = [{"conversations": c, "id": str(i)} for i, c in enumerate(convs)]
    cfg = data(stored(rows, tmp_path, kind))
    (a, b), report = tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(a.input_ids, a.loss_mask) == MULTI_TURN and marked(b.input_ids, b.loss_mask) == ENDS_ON_USER
    assert report.read["role 'human' read as 'user'"] == 4 and report.read["role 'gpt' read as 'assistant'"] == 3
    assert "conversations from column 'conversations' (ShareGPT; no 'messages')" in report.summary()


@pytest.mark.parametrize("kind", STORAGE)
def test_capitalised_roles_are_mapped_and_unknown_ones_refused(tmp_path, kind):
    rows = [{"messages": c} for c in conversations(("role", "content"), ("System", "User", "ASSISTANT"))]
    rows.append({"messages": [turn("user", "repeat w1"), turn("Tool", "w1"), turn("assistant", "w1")]})
    cfg = data(stored(rows, tmp_path, kind))
    with pytest.raises(DataError, match="d row 2: field 'messages' turn 1 has role 'Tool': the roles are system, "):
        tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    cfg.bad_rows = "skip"
    (a, _), report = tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(a.input_ids, a.loss_mask) == MULTI_TURN and "<unk>" not in marked(a.input_ids)
    assert report.read["role 'ASSISTANT' read as 'assistant'"] == 3 and sum(report.counts.values()) == 2


HH_CHOSEN = "\n\nHuman: repeat w1\n\nAssistant: w1\n\nHuman: repeat w2\n\nAssistant: w2"
HH_PROMPT = "<|user|> repeat w1 <|end|> <|assistant|> w1 <|end|> <|user|> repeat w2 <|end|> <|assistant|>"


@pytest.mark.parametrize("kind", STORAGE)
def test_hh_rlhf_transcripts_for_sft_pairs_and_prompts(tmp_path, kind):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN[:-2] + "w3"}]
    cfg = data(stored(rows, tmp_path, kind))
    ((pair,), report) = tokenize_pairs(load_data_rows(cfg), TOK, cfg, "d")  # the reward model and DPO read these
    assert marked(pair.chosen.input_ids, pair.chosen.loss_mask) == HH_PROMPT + " [w2 <|end|>]"
    assert marked(pair.rejected.input_ids, pair.rejected.loss_mask) == HH_PROMPT + " [w3 <|end|>]"
    assert report.read["'chosen' as HH-RLHF transcripts"] == 1 and "share (no 'prompt' column)" in report.summary()
    (prompt,), _ = tokenize_prompts(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(prompt) == HH_PROMPT
    with pytest.raises(DataError, match="no conversation column: 'messages' is not among the columns .*'chosen'"):
        tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    cfg.messages_key = "chosen"  # SFT on the chosen transcripts: every assistant turn
    (sft,), _ = tokenize_sft(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(sft.input_ids, sft.loss_mask) == HH_PROMPT.replace("> w1 <|end|>", "> [w1 <|end|>]") + " [w2 <|end|>]"


def test_strings_that_do_not_parse_as_hh_are_refused_by_row(tmp_path):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN[:-2] + "w3"}, {"chosen": HH_CHOSEN, "rejected": "w3 w4"}]
    cfg = data(stored(rows, tmp_path, "jsonl"), format="hh")
    with pytest.raises(DataError, match=r"d row 1: field 'rejected' is not an HH-RLHF transcript '\\n\\nHuman: "):
        tokenize_pairs(load_data_rows(cfg), TOK, cfg, "d")
    cfg.format = "auto"  # read as a plain reply, it shares no prompt with chosen
    with pytest.raises(DataError, match="d row 1: fields 'chosen' and 'rejected' share no prompt turns"):
        tokenize_pairs(load_data_rows(cfg), TOK, cfg, "d")


@pytest.mark.parametrize("kind", STORAGE)
def test_plain_string_preferences_and_prompts(tmp_path, kind):
    rows = [
        {"prompt": "repeat w1", "chosen": "w1", "rejected": "w2"},
        {"prompt": "repeat w3", "chosen": "w3", "rejected": "w4 w4"},
    ]
    cfg = data(stored(rows, tmp_path, kind))
    (p1, p2), report = tokenize_pairs(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(p1.chosen.input_ids, p1.chosen.loss_mask) == "<|user|> repeat w1 <|end|> <|assistant|> [w1 <|end|>]"
    expected = "<|user|> repeat w3 <|end|> <|assistant|> [w4 w4 <|end|>]"
    assert marked(p2.rejected.input_ids, p2.rejected.loss_mask) == expected
    assert report.read["'rejected' as plain text"] == 2
    (q1, _), _ = tokenize_prompts(load_data_rows(cfg), TOK, cfg, "d")
    assert marked(q1) == "<|user|> repeat w1 <|end|> <|assistant|>"


def ultrafeedback_rows(n: int = 2) -> list[dict]:
    out = []
    for i in range(n):
        q = turn("user", f"repeat w{i}")
        good, bad = [q, turn("assistant", f"w{i}")], [q, turn("assistant", f"w{i + 5}")]
        pair = {"chosen": good, "rejected": bad, "score_chosen": 8.0, "score_rejected": 3.0}
        out.append({"prompt": q["content"], "prompt_id": f"id{i}", **pair, "messages": good})
    return out


def test_ultrafeedback_binarized_as_published(tmp_path):
    splits = {s: datasets.Dataset.from_list(ultrafeedback_rows()) for s in ("train_prefs", "test_prefs", "train_sft")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "uf"))
    cfg = data(str(tmp_path / "uf"), split="train_prefs")
    (q0, _), report = tokenize_prompts(load_data_rows(cfg), TOK, cfg, "uf")  # the prompt column, not messages
    assert marked(q0) == "<|user|> repeat w0 <|end|> <|assistant|>"
    assert "prompts from column 'prompt' (not messages, chosen, rejected: data.prompt_key=none reads those)" in (
        report.summary()
    )
    (pair, _), _ = tokenize_pairs(load_data_rows(cfg), TOK, cfg, "uf")
    expected = "<|user|> repeat w0 <|end|> <|assistant|> [w5 <|end|>]"
    assert marked(pair.rejected.input_ids, pair.rejected.loss_mask) == expected
    cfg.split = "train_sft"
    (sft, _), _ = tokenize_sft(load_data_rows(cfg), TOK, cfg, "uf")
    assert marked(sft.input_ids, sft.loss_mask) == "<|user|> repeat w0 <|end|> <|assistant|> [w0 <|end|>]"
    cfg.split = "train"
    with pytest.raises(DataError, match="has no split 'train'; its splits: train_prefs, test_prefs, train_sft"):
        load_data_rows(cfg)
    one_file = stored(ultrafeedback_rows(), tmp_path, "jsonl")
    with pytest.raises(ConfigError, match="data.split='train_prefs': .* is one file, so it has no splits"):
        load_data_rows(data(one_file, split="train_prefs"))


@pytest.mark.parametrize("kind", STORAGE)
def test_preferences_that_go_on_past_the_reply_are_refused_or_skipped(tmp_path, kind):
    q = turn("user", "repeat w1")
    longer = [q, turn("assistant", "w1"), turn("user", "repeat w2"), turn("assistant", "w2")]
    rows = [
        {"prompt": "repeat w1", "chosen": [q, turn("assistant", "w1")], "rejected": [q, turn("assistant", "w3")]},
        {"prompt": "repeat w1", "chosen": longer, "rejected": [q, turn("assistant", "w3")]},
    ]
    cfg = data(stored(rows, tmp_path, kind))
    with pytest.raises(DataError, match="d row 1: field 'chosen' goes on past the reply \\(turn 2 is a user turn\\)"):
        tokenize_pairs(load_data_rows(cfg), TOK, cfg, "d")
    cfg.bad_rows = "skip"
    (pair,), report = tokenize_pairs(load_data_rows(cfg), TOK, cfg, "d")
    assert report.rows == 2 and sum(v for k, v in report.counts.items() if "goes on past the reply" in k) == 1
    expected = "<|user|> repeat w1 <|end|> <|assistant|> [w1 <|end|>]"
    assert marked(pair.chosen.input_ids, pair.chosen.loss_mask) == expected
