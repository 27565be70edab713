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


def make_rl_assets(root: Path, n_prompts: int = 64, seed: int = 0) -> dict[str, Path]:
    """make_assets plus what `rto ppo` needs: prompts, a reward model (a new scalar head on the tiny LM) and a
    DPO model (the tiny LM with other weights), all on the same tokenizer."""
    from rto.config import ModelConfig
    from rto.models import load_scalar_model

    paths = make_assets(root, n=n_prompts, seed=seed)
    rng = random.Random(seed + 1)
    prompts = [
        {"messages": [{"role": "user", "content": "repeat " + " ".join(rng.sample(WORDS[:-1], 3))}]}
        for _ in range(n_prompts)
    ]
    paths["prompts"] = write_jsonl(root / "prompts.jsonl", prompts)
    tok = tiny_tokenizer(WORDS)
    rm = load_scalar_model(str(paths["model"]), ModelConfig(path=str(paths["model"])))
    paths["reward"] = root / "tiny-rm"
    rm.save_pretrained(paths["reward"])
    tok.save_pretrained(paths["reward"])
    paths["dpo"] = root / "tiny-dpo"
    tiny_causal_lm(len(tok), seed=seed + 7).save_pretrained(paths["dpo"])
    tok.save_pretrained(paths["dpo"])
    return paths


def small_ppo_args(rl: dict, out: Path, name: str, *extra: str) -> list[str]:
    """`rto ppo --recipe toy` settings for a small run on `make_rl_assets` outputs: 16 prompts x 8 new tokens a
    step, minibatches of 8, no progress bar or tensorboard."""
    return [
        f"actor.path={rl['model']}",
        f"reward={rl['reward']}",
        f"dpo={rl['dpo']}",
        f"data.path={rl['prompts']}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "rollout.prompts_per_step=16",
        "rollout.max_new_tokens=8",
        "train.train_batch_size=8",
        "train.micro_batch_size=8",
        "run.progress=false",
        "run.tensorboard=false",
        *extra,
    ]
