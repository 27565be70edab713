"""`rto sft`: supervised fine-tuning on conversations; the loss covers the last assistant turn.

Run: rto sft --recipe toy model.path=... data.path=...   (or torchrun --nproc_per_node=N -m rto sft ...)
"""

from __future__ import annotations

import torch

from rto.config import SFTConfig
from rto.data import make_batch, model_inputs, per_sequence_sum, tokenize_sft
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

    def forward(items):
        b = make_batch(items, cfg.data.packing, pad, d.device)
        logp = model(**model_inputs(b), loss_mask=b["loss_mask"])["logp"]  # [B, T]
        return b, logp

    def loss(items, n_tokens):
        b, logp = forward(items)
        stats = {"nll": -logp.detach().sum(), "tokens": b["loss_mask"][:, 1:].sum().float()}
        return sft_loss(logp, n_tokens) * world, stats

    def eval_stats(items, weights):
        b, logp = forward(items)
        nll = per_sequence_sum(-logp, b["loss_mask"], b["seq_id"], len(items))  # [S]
        tokens = per_sequence_sum(b["loss_mask"].float(), b["loss_mask"], b["seq_id"], len(items))  # [S]
        return {"nll": (nll * weights).sum(), "tokens": (tokens * weights).sum()}

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
