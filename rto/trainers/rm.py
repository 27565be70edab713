"""`rto rm`: a Bradley-Terry reward model on preference pairs; its score is the value at the last token.

Run: rto rm --recipe toy model.path=<causal LM or reward model> data.path=<pairs>
The model is an HF model with a scalar head: a trained reward model as it was saved (sequence classification,
token classification or OpenRLHF's format), or a causal LM with a new head (its family's sequence-classification
class), so the export loads with `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import torch

from rto import build
from rto.config import RMConfig
from rto.data import last_token_index, make_batch, model_inputs, tokenize_pairs
from rto.losses import bradley_terry_loss
from rto.trainers.offline import Task, run


def pair_batch(pairs, packing: bool, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Chosen responses are sequences [0, P), rejected ones [P, 2P) of one batch."""
    return make_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], packing, pad_id, device)


def build_task(ctx) -> Task:
    cfg, d = ctx.cfg, ctx.d
    packing = "data.packing" if cfg.data.packing else None
    model, hf = build.scalar(
        cfg.model.path, cfg.model, "model.path", cfg.parallel, d.device, packing=packing, tokenizer=ctx.tokenizer
    )
    pad = ctx.tokenizer.pad_token_id

    def scores(pairs):
        b = pair_batch(pairs, cfg.data.packing, pad, d.device)
        values = model(**model_inputs(b))  # [2P, T] ([1, total] packed)
        s = values.reshape(-1)[last_token_index(b["seq_id"], 2 * len(pairs))]  # [2P]
        return s[: len(pairs)], s[len(pairs) :]

    def forward(pairs):
        r_w, r_l = scores(pairs)
        losses = bradley_terry_loss(r_w, r_l)  # [P]
        return losses.sum(), pair_stats(losses, r_w, r_l)

    def means(s):
        n = max(s["pairs"], 1)
        return {"loss": s["loss"] / n, "accuracy": s["correct"] / n, "margin": s["margin"] / n}

    return Task(model=model, hf_model=hf, forward=forward, count=lambda items: float(len(items)), means=means)


def pair_stats(losses: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair statistics [P] of a preference loss with its rewards (chosen r_w, rejected r_l)."""
    return {
        "loss": losses,
        "correct": (r_w > r_l).float(),
        "margin": r_w - r_l,
        "chosen_reward": r_w,
        "rejected_reward": r_l,
        "pairs": torch.ones_like(r_w),
    }


def main(cfg: RMConfig) -> dict[str, float]:
    return run(cfg, "rm", tokenize_pairs, build_task)
