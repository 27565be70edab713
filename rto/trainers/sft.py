"""`rto sft`: supervised fine-tuning on conversations; the loss covers the last assistant turn.

Run: rto sft --recipe toy model.path=... data.path=...   (or torchrun --nproc_per_node=N -m rto sft ...)
"""

from __future__ import annotations

import torch

from rto.config import SFTConfig
from rto.data import collate, tokenize_sft
from rto.losses import sft_loss
from rto.models import PolicyModel, load_causal_lm
from rto.parallel import shard
from rto.trainers.offline import Task, fit, load_items, setup


def build_task(ctx) -> Task:
    cfg, d = ctx.cfg, ctx.d
    lm = load_causal_lm(cfg.model.path, cfg.model)
    model = shard(PolicyModel(lm), lm, cfg.parallel, d.device)
    pad = ctx.tokenizer.pad_token_id
    world = d.world_size

    def loss(items, n_tokens):
        b = collate(items, pad, d.device)
        logp = model(b["input_ids"], b["attention_mask"], b["loss_mask"])["logp"]  # [B, T]
        stats = {"nll": -logp.detach().sum(), "tokens": b["loss_mask"][:, 1:].sum().float()}
        return sft_loss(logp, n_tokens) * world, stats

    def eval_stats(items, weights):
        b = collate(items, pad, d.device)
        logp = model(b["input_ids"], b["attention_mask"], b["loss_mask"])["logp"]
        per_seq = (logp.sum(1), b["loss_mask"][:, 1:].sum(1).float())
        return {"nll": -(per_seq[0] * weights).sum(), "tokens": (per_seq[1] * weights).sum()}

    def means(s):
        return {"loss": s["nll"] / max(s["tokens"], 1), "tokens": s["tokens"]}

    return Task(model=model, hf_model=lm, loss=loss, count=lambda items: float(sum(e.n_response for e in items)),
                eval_stats=eval_stats, means=means)  # fmt: skip


def main(cfg: SFTConfig) -> dict[str, float]:
    ctx = setup(cfg)
    train, held_out = load_items(ctx, tokenize_sft)
    task = build_task(ctx)
    torch.manual_seed(cfg.train.seed + ctx.d.rank)
    return fit(task, train, held_out, ctx)
