"""`rto sft`: supervised fine-tuning on conversations; the loss covers the last assistant turn.

Run: rto sft --recipe toy model.path=... data.path=...   (or torchrun --nproc_per_node=N -m rto sft ...)
"""

from __future__ import annotations

from rto import build
from rto.config import SFTConfig
from rto.data import make_batch, model_inputs, per_sequence_sum, tokenize_sft
from rto.trainers.offline import Task, run


def build_task(ctx) -> Task:
    cfg, d = ctx.cfg, ctx.d
    packing = "data.packing" if cfg.data.packing else None
    model, lm = build.policy(
        cfg.model.path, cfg.model, "model.path", cfg.parallel, d.device, packing=packing, tokenizer=ctx.tokenizer
    )
    pad = ctx.tokenizer.pad_token_id

    def forward(items):
        b = make_batch(items, cfg.data.packing, pad, d.device)
        logp = model(**model_inputs(b), loss_mask=b["loss_mask"])["logp"]  # [B, T]
        per_seq = lambda x: per_sequence_sum(x, b["loss_mask"], b["seq_id"], len(items))  # noqa: E731  [S]
        nll = -logp.sum()  # the objective: summed negative log-likelihood of the response tokens
        return nll, {"nll": per_seq(-logp), "tokens": per_seq(b["loss_mask"].float())}

    def means(s):
        return {"loss": s["nll"] / max(s["tokens"], 1), "tokens": s["tokens"]}

    count = lambda items: float(sum(e.n_response for e in items))  # noqa: E731
    return Task(model=model, hf_model=lm, forward=forward, count=count, means=means)


def main(cfg: SFTConfig) -> dict[str, float]:
    return run(cfg, "sft", tokenize_sft, build_task)
