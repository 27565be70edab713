"""The main job, shortened: `rto pipeline --recipe toy quick=true` end to end on CPU.

Margins were measured on this configuration (seed 0, 2-core CPU, torch 2.13): SFT NLL on its own conversations
fell from the base model's ~4.1 to ~3.5 nats/token; the RM's held-out pair accuracy was 0.70 (300 pairs);
held-out gold reward was 1.70 for SFT, 2.91 for PPO and 2.90 for RTO (win rates vs SFT 0.71 +- 0.07). The
bounds below sit well inside those numbers, so they test the effect, not the exact run.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rto import toy
from rto.advantages import compute_advantages
from rto.cli import main as cli
from rto.config import DataConfig, load_config
from rto.data import collate, load_rows, tokenize_sft
from rto.models import PolicyModel
from rto.pipeline import gold_metrics
from rto.rollout.engine import assemble
from rto.scoring import Scored
from rto.toy import tokenizer


def nll(model_dir, items) -> float:
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    b = collate(items, tokenizer().pad_token_id)
    with torch.no_grad():
        logp = PolicyModel(lm)(b["input_ids"], b["attention_mask"], loss_mask=b["loss_mask"])["logp"]
    return (-logp.sum() / b["loss_mask"][:, 1:].sum()).item()


def test_short_pipeline(tmp_path):
    rc = cli(["pipeline", "--recipe", "toy", "quick=true", "baselines=[dpo]", f"output_dir={tmp_path}", "name=ci"])
    assert rc == 0
    root = tmp_path / "ci"
    for stage in ("sft", "rm", "dpo"):
        assert (root / stage / "hf" / "model.safetensors").is_file(), stage
    for algo in ("ppo", "rto"):
        assert (root / algo / "hf" / "actor" / "model.safetensors").is_file(), algo
        assert (root / algo / "hf" / "critic" / "model.safetensors").is_file(), algo
    assert (root / "report.md").read_text().count("\n| ") == 5  # header + SFT, DPO, PPO, RTO
    assert (root / "gold_reward.png").read_bytes()[:4] == b"\x89PNG"

    # SFT improved the toy likelihood of the conversations it learned from
    rows = load_rows(str(root / "world" / "sft.jsonl"), "train").select(range(256))
    items, _ = tokenize_sft(rows, tokenizer(), DataConfig(path="x", max_length=96, max_prompt_length=48), "sft")
    base, tuned = nll(root / "world" / "base", items), nll(root / "sft" / "hf", items)
    assert tuned < base - 0.3, f"SFT NLL {tuned:.3f} vs base {base:.3f}"

    # the reward model beats chance on held-out pairs
    rm_eval = [json.loads(x) for x in (root / "rm" / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in x]
    assert rm_eval[-1]["eval/accuracy"] > 0.6

    # PPO and RTO raised the held-out gold reward over SFT
    results = json.loads((root / "results.json").read_text())
    for algo in ("ppo", "rto"):
        gain = results[algo]["gold_reward"] - results["sft"]["gold_reward"]
        assert gain > 0.5, f"{algo} gold gain over SFT {gain:.3f}"
        assert results[algo]["win_rate_vs_sft"] > 0.6
    # every rollout step logged its gold reward
    rows = [json.loads(x) for x in (root / "rto" / "metrics.jsonl").read_text().splitlines()]
    assert all("rollout/gold_reward" in r for r in rows) and rows


def test_gold_probe_by_hand_and_its_mechanism_metrics():
    tok, end = tokenizer(), toy.END
    world = toy.World("chain", seed=0, length=3)
    o = world.order("food")
    prompt = tok.convert_tokens_to_ids(["<|user|>", "talk", "about", "food", end, "<|assistant|>"])
    # row 0: o0 -> o1 good, o1 -> o3 bad, 3 words: gold 0; row 1: a prompt word (-2), a rival word (-1), one word
    # short of L (-1 on the end token): gold -4
    responses = [[o[0], o[1], o[3], end], ["talk", "ball", end]]
    ids = [tok.convert_tokens_to_ids(r) for r in responses]
    batch = assemble(
        [prompt, prompt],
        ids,
        [[0.0] * len(r) for r in ids],
        stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        max_new_tokens=8,
        device="cpu",
    )
    probe = gold_metrics(tok, world)
    m = probe(batch)
    assert m["gold_reward"].tolist() == [0.0, -4.0]
    assert m["out_of_support_rate"].tolist() == pytest.approx([1 / 7] * 2)  # "talk" of 7 response tokens
    assert m["good_transition_share"].tolist() == [0.5] * 2 and m["bad_transition_share"].tolist() == [0.5] * 2
    assert "gold_corr_advantages" not in m  # nothing from the trainer yet

    mask = batch.response_mask
    gold = torch.zeros(mask.shape)
    gold[mask] = torch.tensor([0.0, 1, -1, 0, -2, -1, -1])  # the per-token shares, by hand
    g = torch.Generator().manual_seed(0)
    logp = torch.where(mask, -torch.rand(mask.shape, generator=g), 0.0)
    values = torch.where(mask, torch.randn(mask.shape, generator=g), 0.0)
    scored = Scored(logp, logp, logp + gold, values, torch.tensor([0.5, -1.0]), torch.tensor([0.5, -1.0]))
    need = ["actor.path=x", "reward=x", "dpo=x", "data.path=x", "rewards.dpo_scale=1", "rewards.dpo_clip=10"]
    cfg = load_config("ppo", "toy", need)
    _, adv, _ = compute_advantages(scored, mask, cfg)
    _, ppo_adv, _ = compute_advantages(scored, mask, load_config("ppo", "toy", [*need, "algo=ppo"]))
    trainer = SimpleNamespace(compute_advantages=compute_advantages)  # what `watching` wraps in rto.trainers.ppo
    with probe.watching(trainer):
        trainer.compute_advantages(scored, mask, cfg)
        m = probe(batch)
    assert trainer.compute_advantages is compute_advantages and probe.recorded is None  # restored on exit
    # the DPO log-ratio is the gold share itself, and the unclipped term a multiple of it: correlation 1
    assert m["gold_corr_dpo_logratio"][0].item() == pytest.approx(1.0)
    assert m["gold_corr_dpo_term"][0].item() == pytest.approx(1.0)
    adv_gold = torch.corrcoef(torch.stack([adv[mask], gold[mask]]))[0, 1].item()
    assert m["gold_corr_advantages"][0].item() == pytest.approx(adv_gold, abs=1e-6)
    rto_ppo = torch.corrcoef(torch.stack([adv[mask], ppo_adv[mask]]))[0, 1].item()
    assert m["advantages_corr_ppo"][0].item() == pytest.approx(rto_ppo, abs=1e-6) and rto_ppo < 0.999


def test_short_chain_pipeline(tmp_path):
    sizes = ["world.n_sft=320", "world.n_pairs=320", "world.n_prompts=64", "world.n_eval=16"]
    steps = ["sft.train.max_steps=10", "rm.train.max_steps=10", "dpo.train.max_steps=10", "ppo.train.steps=3"]
    args = [
        "pipeline",
        "--recipe",
        "toy",
        "quick=true",
        "world.kind=chain",
        "world.length=12",
        "baselines=[]",
        "online=[rto]",
        *sizes,
        *steps,
        f"output_dir={tmp_path}",
        "name=chain",
    ]
    assert cli(args) == 0
    root = tmp_path / "chain"
    assert toy.load_world(root / "world") == toy.World("chain", 0, 12)
    assert (root / "report.md").read_text().count("\n| ") == 3  # header + SFT, RTO
    results = json.loads((root / "results.json").read_text())
    assert set(results) == {"sft", "rto"}
    rto_rows = [json.loads(x) for x in (root / "rto" / "metrics.jsonl").read_text().splitlines()]
    keys = {"rollout/gold_reward", "rollout/good_transition_share", "rollout/out_of_support_rate"}
    assert rto_rows and all(keys <= r.keys() for r in rto_rows)
    mechanism = {"rollout/gold_corr_dpo_term", "rollout/gold_corr_advantages", "rollout/advantages_corr_ppo"}
    assert all(mechanism <= r.keys() for r in rto_rows), "the trainer no longer reaches GoldProbe.watching"
