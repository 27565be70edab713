"""The main job, shortened: `rto pipeline --recipe toy quick=true` end to end on CPU.

Margins were measured on this configuration (seed 0, 2-core CPU, torch 2.13): SFT NLL on its own conversations
fell from the base model's ~4.1 to ~3.5 nats/token; the RM's held-out pair accuracy was 0.70 (300 pairs);
held-out gold reward was 1.70 for SFT, 2.91 for PPO and 2.90 for RTO (win rates vs SFT 0.71 +- 0.07). The
bounds below sit well inside those numbers, so they test the effect, not the exact run.
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from rto.cli import main as cli
from rto.config import DataConfig
from rto.data import collate, load_rows, tokenize_sft
from rto.models import PolicyModel
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
    items, _ = tokenize_sft(load_rows(str(root / "world" / "sft.jsonl"), "train").select(range(256)), tokenizer(),
                            DataConfig(path="x", max_length=96, max_prompt_length=48), "sft")  # fmt: skip
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
