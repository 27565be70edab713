"""`rto eval`: generate for a prompt set, score, compare with a reference model, export for external judges.

Run: rto eval model=<policy> data.path=<prompts> [reference=<SFT model>] [reward=<RM>] [temperature=0.7|0]
- temperature 0.7 is AlpacaEval's setting, temperature 0 (greedy) Arena-Hard's;
- scores: the reward model's (when given) and, for toy-world prompts, the gold reward;
- win rate against the reference model's responses to the same prompts (ties count one half), with a 95%
  normal-approximation interval over prompts;
- exports: AlpacaEval model outputs (JSON list of {instruction, output, generator}) and Arena-Hard answers
  (JSONL of {question_id, answer_id, model_id, choices: [{index, turns: [{content}]}], tstamp}).
Runs in one process on unsharded models (evaluation sets are small).
"""

from __future__ import annotations

import json
import math
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rto.config import EvalConfig, ModelConfig
from rto.data import load_data_rows, tokenize_prompts
from rto.models import ScalarModel, check_model_path, last_valid, load_scalar_model, load_tokenizer


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]


@torch.no_grad()
def generate(model_path: str, prompts: list[list[int]], tok, *, temperature: float, top_p: float = 1.0,
             max_new_tokens: int, batch_size: int = 64, seed: int = 0, device="cpu") -> list[Sample]:  # fmt: skip
    """One response per prompt (greedy at temperature 0), cut after the first EOS."""
    check_model_path(model_path, "model")
    lm = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), tok.pad_token_id, dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(chunk):
            ids[b, P - len(p) :] = torch.tensor(p)
            attn[b, P - len(p) :] = 1
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else {"do_sample": False}
        )
        seqs = lm.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, top_k=None,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sampling)  # fmt: skip
        for p, row in zip(chunk, seqs[:, P:].tolist()):
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(Sample(p, row))
    return out


@torch.no_grad()
def reward_scores(rm_path: str, samples: list[Sample], tok, batch_size: int = 64, device="cpu") -> list[float]:
    rm = ScalarModel(load_scalar_model(rm_path, ModelConfig(path=rm_path), "reward")).to(device).eval()
    scores = []
    for i in range(0, len(samples), batch_size):
        chunk = [s.prompt_ids + s.response_ids for s in samples[i : i + batch_size]]
        T = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        for b, x in enumerate(chunk):
            ids[b, : len(x)] = torch.tensor(x)
            attn[b, : len(x)] = 1
        scores += last_valid(rm(ids, attn), attn).tolist()
    return scores


def win_rate(scores: list[float], reference: list[float]) -> tuple[float, float]:
    """Share of prompts where scores beat the reference's (ties: 1/2) and the half-width of its 95% interval."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference)]
    mean = statistics.fmean(outcomes)
    half = 1.96 * statistics.pstdev(outcomes) / math.sqrt(len(outcomes)) if len(outcomes) > 1 else float("nan")
    return mean, half


def export(out_dir: Path, name: str, prompts: list[str], responses: list[str]) -> dict[str, str]:
    """AlpacaEval model outputs and Arena-Hard answers for external judging."""
    out_dir.mkdir(parents=True, exist_ok=True)
    alpaca = out_dir / "alpaca_eval_outputs.json"
    alpaca.write_text(json.dumps([{"instruction": p, "output": r, "generator": name}
                                  for p, r in zip(prompts, responses)], indent=1))  # fmt: skip
    arena = out_dir / "arena_hard_answers.jsonl"
    now = time.time()
    with arena.open("w") as f:
        for i, r in enumerate(responses):
            row = {"question_id": str(i), "answer_id": uuid.uuid4().hex, "model_id": name,
                   "choices": [{"index": 0, "turns": [{"content": r}]}], "tstamp": now}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return {"alpaca_eval": str(alpaca), "arena_hard": str(arena)}


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, score and compare; writes results.json, responses.jsonl and the exports under the run folder."""
    tok = load_tokenizer(ModelConfig(path=cfg.model, pad_token=cfg.pad_token))
    rows = load_data_rows(cfg.data)
    prompts, _ = tokenize_prompts(rows, tok, cfg.data, f"{cfg.data.path}[{cfg.data.split}]")
    kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    samples = generate(cfg.model, prompts, tok, **kw)
    result: dict = {"model": cfg.model, "n": len(samples), "temperature": cfg.temperature,
                    "mean_length": statistics.fmean(len(s.response_ids) for s in samples)}  # fmt: skip
    ref_samples = generate(cfg.reference, prompts, tok, **kw) if cfg.reference else None
    metrics = {}
    if cfg.reward:
        metrics["rm_score"] = reward_scores(cfg.reward, samples, tok)
        if ref_samples:
            metrics["ref_rm_score"] = reward_scores(cfg.reward, ref_samples, tok)
    if cfg.gold:
        from rto.toy import response_gold

        metrics["gold"] = [response_gold(s.prompt_ids, s.response_ids, tok) for s in samples]
        if ref_samples:
            metrics["ref_gold"] = [response_gold(s.prompt_ids, s.response_ids, tok) for s in ref_samples]
    for k, v in metrics.items():
        result[k] = statistics.fmean(v)
    for judge in ("gold", "rm_score"):
        if judge in metrics and f"ref_{judge}" in metrics:
            rate, half = win_rate(metrics[judge], metrics[f"ref_{judge}"])
            result[f"win_rate_vs_reference_{judge}"] = rate
            result[f"win_rate_vs_reference_{judge}_ci95"] = half
    out_dir = Path(cfg.output_dir) / cfg.name
    texts = [tok.decode(s.prompt_ids, skip_special_tokens=True) for s in samples]
    answers = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    result["exports"] = export(out_dir, cfg.name, texts, answers)
    with (out_dir / "responses.jsonl").open("w") as f:
        for i, (p, a) in enumerate(zip(texts, answers)):
            f.write(json.dumps({"prompt": p, "response": a, **{k: v[i] for k, v in metrics.items()}}) + "\n")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    return result
