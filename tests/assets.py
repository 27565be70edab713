"""Tiny assets on disk for trainer tests: a word-level tokenizer and Llama saved as HF checkpoints, and an easy
task (repeat the prompt's words) as SFT conversations and UltraFeedback-style preference pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rto.models import tiny_causal_lm, tiny_tokenizer

WORDS = [f"w{i}" for i in range(24)] + ["repeat"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_assets(root: Path, n: int = 96, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    tok = tiny_tokenizer(WORDS)
    model_dir = root / "tiny-model"
    tiny_causal_lm(len(tok), seed=seed).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sft, pairs = [], []
    for _ in range(n):
        words = rng.sample(WORDS[:-1], rng.randint(2, 5))
        user = {"role": "user", "content": "repeat " + " ".join(words)}
        good = {"role": "assistant", "content": " ".join(words)}
        bad = {"role": "assistant", "content": " ".join(rng.sample(WORDS[:-1], len(words)))}
        sft.append({"messages": [user, good]})
        pairs.append({"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]})
    return {
        "model": model_dir,
        "sft": write_jsonl(root / "sft.jsonl", sft),
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
    }
