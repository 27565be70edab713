"""The toy world, `rto eval` and `rto inspect`."""

from __future__ import annotations

import json
import random

import pytest

from rto import toy
from rto.cli import main as cli
from rto.config import DataConfig
from rto.data import load_rows, tokenize_pairs, tokenize_prompts, tokenize_sft
from rto.evaluate import win_rate


def test_gold_reward_by_hand():
    t = "food"  # rival: sports
    assert toy.rival(t) == "sports"
    assert toy.gold_reward(t, "bread cheese apple soup".split()) == 4.0
    assert toy.gold_reward(t, "bread cheese ball goal".split()) == 0.0  # two on-topic, two rival words
    assert toy.gold_reward(t, "bread bread bread soup".split()) == 2.0 - 2 * 0.75  # repeats cost 0.75 each
    assert toy.gold_reward(t, "bread the and soup dog".split()) == 2.0  # fillers and other topics are neutral
    assert toy.gold_reward(t, "bread soup".split()) == 2.0 - 0.5 * 2  # two words short of MIN_LEN
    assert toy.gold_reward(t, ["bread"]) == -3.0 and toy.gold_reward(t, []) == -3.0
    long = "bread cheese apple soup rice cake salad pasta honey pie the the the a a".split()  # 15 words
    assert toy.gold_reward(t, long) == 10.0 - 0.5 * 3
    assert toy.topic_of("please talk about music") == "music"
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy.topic_of("hello there")


def test_world_is_written_in_the_real_schemas_and_labels_follow_the_gold_reward(tmp_path):
    paths = toy.build_world(tmp_path, n_sft=200, n_pairs=400, n_prompts=50, n_eval=20, hidden=16)
    tok = toy.tokenizer()
    cfg = DataConfig(path="x", max_length=64, max_prompt_length=32)
    sft, r1 = tokenize_sft(load_rows(paths["sft"], "train"), tok, cfg, "sft")
    pairs, r2 = tokenize_pairs(load_rows(paths["prefs"], "train"), tok, cfg, "prefs")
    prompts, r3 = tokenize_prompts(load_rows(paths["prompts"], "train"), tok, cfg, "prompts")
    assert (r1.kept, r2.kept, r3.kept) == (200, 360, 50) and not (r1.counts or r2.counts or r3.counts)
    assert "<unk>" not in tok.convert_ids_to_tokens([i for e in sft for i in e.input_ids])
    rows = [json.loads(x) for x in open(paths["prefs"])]
    agree = sum(
        toy.gold_reward(toy.topic_of(r["prompt"]), r["chosen"][-1]["content"].split())
        >= toy.gold_reward(toy.topic_of(r["prompt"]), r["rejected"][-1]["content"].split())
        for r in rows
    )
    assert agree / len(rows) > 0.7  # Bradley-Terry labels with beta 1 mostly agree with the gold order
    golds = [toy.gold_reward(t, toy.noisy_answer(t, random.Random(i))) for i, t in enumerate(toy.TOPIC_NAMES * 50)]
    assert max(golds) - min(golds) > 8  # SFT samples vary in quality


def test_win_rate_counts_ties_as_half():
    rate, half = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert half > 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    return toy.build_world(root, n_sft=40, n_pairs=40, n_prompts=20, n_eval=6, hidden=16)


def test_rto_eval_scores_and_exports(world, tmp_path, capsys):
    base = world["base"]
    rc = cli(
        [
            "eval",
            f"model={base}",
            f"reference={base}",
            f"reward={base}",
            "gold=true",
            f"data.path={world['eval_prompts']}",
            "max_new_tokens=8",
            f"output_dir={tmp_path}",
            "name=e",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert result["n"] == 6 and {"gold", "rm_score", "win_rate_vs_reference_gold"} <= result.keys()
    assert result["win_rate_vs_reference_gold"] == 0.5  # the same model with the same seed ties everywhere
    alpaca = json.loads((tmp_path / "e" / "alpaca_eval_outputs.json").read_text())
    assert len(alpaca) == 6 and set(alpaca[0]) == {"instruction", "output", "generator"}
    arena = [json.loads(x) for x in (tmp_path / "e" / "arena_hard_answers.jsonl").read_text().splitlines()]
    assert arena[0]["choices"][0]["turns"][0]["content"] == alpaca[0]["output"]
    greedy = cli(["eval", f"model={world['base']}", f"data.path={world['eval_prompts']}", "temperature=0",
                  "max_new_tokens=8", f"output_dir={tmp_path}", "name=g"])  # fmt: skip
    assert greedy == 0


def test_rto_inspect_writes_html_and_png(world, tmp_path):
    base = world["base"]
    rc = cli(
        [
            "inspect",
            f"model={base}",
            f"ref={base}",
            f"dpo={base}",
            "n=3",
            f"data.path={world['eval_prompts']}",
            "max_new_tokens=6",
            f"output_dir={tmp_path}",
            "name=i",
        ]
    )
    assert rc == 0
    records = json.loads((tmp_path / "i" / "tokens.json").read_text())
    assert len(records) == 3
    # the DPO model is the reference here: every token reward is exactly 0
    assert all(z == 0 for r in records for z in r["dpo_reward"])
    assert "<span" in (tmp_path / "i" / "inspect.html").read_text()
    assert (tmp_path / "i" / "inspect.png").read_bytes()[:4] == b"\x89PNG"


def test_pipeline_refuses_unknown_methods(capsys):
    assert cli(["pipeline", "baselines=[dpo,kto]"]) == 2
    assert "unknown methods ['kto']" in capsys.readouterr().err
