"""The toy world, `rto eval` and `rto inspect`."""

from __future__ import annotations

import json
import random

import pytest

from rto import toy
from rto.cli import main as cli
from rto.config import DataConfig, ModelConfig
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


FOOD = ("bread", "cheese", "apple", "soup", "rice", "cake", "salad", "pasta", "honey", "pie")  # w0..w9, by hand


def test_chain_gold_per_token_by_hand():
    t, end = "food", toy.END  # rival: sports
    # bread->cheese is +1 (offset 1), cheese->soup -1 (offset 2), soup->rice +1 (offset 1); 4 words = L
    assert toy.chain_token_gold(FOOD, t, 4, ["bread", "cheese", "soup", "rice", end]) == [0, 1, -1, 1, 0]
    # a filler breaks the chain; a rival word costs 1; a prompt word and a special token are out of support
    tokens = ["bread", "the", "cheese", "ball", "talk", "<|user|>", end]
    assert toy.chain_token_gold(FOOD, t, 6, tokens) == [0, 0, 0, -1, -2, -2, 0]
    # pie->bread wraps around (offset 1): +1; two words of L = 5: the last token pays 3
    assert toy.chain_token_gold(FOOD, t, 5, ["pie", "bread", end]) == [0, 1, -3]
    # offsets 1, 3 and 4 are good, 0, 2, 5 and 7 bad, 6, 8 and 9 neutral (fillers keep the pairs apart)
    good = ["bread", "soup", "the", "bread", "rice", "the", "bread", "bread"]
    assert toy.chain_token_gold(FOOD, t, 2, good) == [0, 1, 0, 0, 1, 0, 0, -1]
    bad = ["bread", "cake", "the", "bread", "pasta", "a", "bread", "apple"]
    assert toy.chain_token_gold(FOOD, t, 2, bad) == [0, -1, 0, 0, -1, 0, 0, -1]
    neutral = ["bread", "salad", "the", "bread", "honey", "dog", "bread", "pie"]  # another topic's word: 0
    assert toy.chain_token_gold(FOOD, t, 2, neutral) == [0] * 8
    assert toy.chain_token_gold(FOOD, t, 2, ["soup", "bread"]) == [0, -1]  # bread after soup: offset 7
    # an end-of-turn token inside the response is out of support; only the final one is the turn's end
    assert toy.chain_token_gold(FOOD, t, 3, ["bread", end, "cheese", end]) == [0, -2, 0, 0]
    assert toy.chain_token_gold(FOOD, t, 3, []) == []
    world = toy.World("chain", seed=7, length=4)
    order = world.order(t)
    assert sorted(order) == sorted(toy.TOPICS[t].split()) and order != toy.World("chain", seed=8).order(t)
    chain = [order[0], order[1], order[4], order[6], order[6]]  # offsets +1, +3, +2, 0
    assert world.gold(t, chain) == 1 + 1 - 1 - 1
    assert world.transitions(t, [*chain, "the", order[0], end]) == (2, 2, 4)
    assert world.gold(t, []) == -4.0  # a bare end-of-turn: 4 missing words
    # no word is good on its own: each is good after some words and bad after others
    assert all({toy.transition(order, p, w) for p in order} == {-1, 0, 1} for w in order)
    with pytest.raises(ValueError, match="world.kind='tree'"):
        toy.World("tree")


def test_bag_gold_per_token_by_hand_and_sums_to_the_gold_reward():
    t, end = "food", toy.END
    assert toy.bag_token_gold(t, ["bread", "bread", "the", "ball", end]) == [1, -0.75, 0, -1, 0]
    # special tokens are not words: two words, two short of MIN_LEN, paid on the last token
    assert toy.bag_token_gold(t, ["bread", "<|user|>", "soup", end]) == [1, 0, 1, -1]
    assert toy.bag_token_gold(t, ["bread", end]) == [0, -3]
    tok = toy.tokenizer()
    prompt = tok.convert_tokens_to_ids(["<|user|>", "tell", "me", "about", "food", end, "<|assistant|>"])
    rng = random.Random(0)
    for _ in range(200):  # random token strings, specials included: the per-token shares sum to the gold reward
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 18))]
        words = tok.decode(ids, skip_special_tokens=True).split()
        assert toy.response_gold(prompt, ids, tok) == toy.gold_reward(t, words)
        assert len(toy.response_token_gold(prompt, ids, tok)) == len(ids)
        chain = toy.World("chain", seed=1, length=12)
        shares = toy.response_token_gold(prompt, ids, tok, chain)
        assert sum(shares) == toy.response_gold(prompt, ids, tok, chain) and len(shares) == len(ids)


def test_chain_world_data_follow_its_gold(tmp_path):
    L = 12
    paths = toy.build_world(
        tmp_path, n_sft=200, n_pairs=600, n_prompts=50, n_eval=20, hidden=16, kind="chain", length=L
    )
    world = toy.load_world(paths["world"])
    assert world == toy.World("chain", 0, L)
    tok = toy.tokenizer()
    cfg = DataConfig(path="x", max_length=64, max_prompt_length=32)
    sft, report = tokenize_sft(load_rows(paths["sft"], "train"), tok, cfg, "sft")
    assert report.kept == 200 and "<unk>" not in tok.convert_ids_to_tokens([i for e in sft for i in e.input_ids])
    answers = [json.loads(x)["messages"][-1]["content"].split() for x in open(paths["sft"])]
    assert all(L // 2 <= len(a) <= L and set(a) <= toy.RESPONSE_VOCAB for a in answers)
    rows = [json.loads(x) for x in open(paths["prefs"])]
    golds = [
        [world.gold(toy.topic_of(r["prompt"]), r[k][-1]["content"].split()) for k in ("chosen", "rejected")]
        for r in rows
    ]
    agree = sum((c > r) + 0.5 * (c == r) for c, r in golds) / len(golds)
    assert 0.72 < agree < 0.88, agree  # Bradley-Terry at bt_beta * 6 / L: about 80% agreement
    spread = [g for pair in golds for g in pair]
    assert max(spread) - min(spread) > L  # careful and careless writers: answers vary in quality


def test_win_rate_counts_ties_as_half():
    rate, half = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert half > 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    return toy.build_world(root, n_sft=40, n_pairs=40, n_prompts=20, n_eval=6, hidden=16)


def test_rto_eval_scores_and_exports(world, tmp_path, capsys):
    from transformers import AutoTokenizer

    from rto.models import load_scalar_model

    base = world["base"]
    rm = tmp_path / "rm"  # a reward model with its head (a causal LM as eval's reward is refused)
    load_scalar_model(str(base), ModelConfig(path=str(base))).save_pretrained(rm)
    AutoTokenizer.from_pretrained(base).save_pretrained(rm)
    rc = cli(
        [
            "eval",
            f"model={base}",
            f"reference={base}",
            f"reward={rm}",
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
    alpaca = json.loads((tmp_path / "e" / "alpaca_eval" / "model_outputs.json").read_text())
    assert len(alpaca) == 6 and set(alpaca[0]) == {"instruction", "output", "generator"}
    (answers,) = (tmp_path / "e" / "arena_hard").glob("*.jsonl")  # named after the model
    arena = [json.loads(x) for x in answers.read_text().splitlines()]
    assert arena[0]["messages"][-1]["content"]["answer"] == alpaca[0]["output"]
    greedy = ["eval", f"model={base}", f"data.path={world['eval_prompts']}", "temperature=0", "max_new_tokens=8"]
    assert cli([*greedy, f"output_dir={tmp_path}", "name=g"]) == 0


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
    assert "(bad: ['kto'])" in capsys.readouterr().err
