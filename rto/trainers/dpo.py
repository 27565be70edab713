"""`rto dpo --loss dpo|ipo|rdpo|simpo|tdpo`: preference optimisation against a frozen reference.

Run: rto dpo --recipe toy --loss dpo model.path=<SFT model> data.path=<pairs>
Every log-prob goes through the fused head; TDPO's full-vocabulary KL runs in position chunks under
activation checkpointing, with the reference's head weight gathered once (it is frozen).
"""

from __future__ import annotations

import torch

from rto import build
from rto.config import DPOConfig
from rto.data import model_inputs, per_sequence_sum, tokenize_pairs
from rto.losses import preference_loss
from rto.models import check_same_tokenizer
from rto.trainers.offline import Task, run
from rto.trainers.rm import pair_batch, pair_stats


def build_task(ctx) -> Task:
    cfg: DPOConfig = ctx.cfg
    d = ctx.d
    packing = "data.packing" if cfg.data.packing else None
    common = dict(parallel=cfg.parallel, device=d.device, packing=packing, tokenizer=ctx.tokenizer)
    policy, lm = build.policy(cfg.model.path, cfg.model, "model.path", **common)
    ref = ref_head = None
    if cfg.loss != "simpo":
        ref_what = "ref" if cfg.ref else "model.path"
        if cfg.ref:
            check_same_tokenizer(ctx.tokenizer, cfg.ref, "ref", "the policy's", cfg.model)
        ref, _ = build.policy(cfg.ref or cfg.model.path, cfg.model, ref_what, **common, frozen=True)
        if cfg.loss == "tdpo":
            ref_head = ref.gathered_head()  # (weight, head spec), gathered once: the reference never changes
    pad = ctx.tokenizer.pad_token_id
    kw = dict(
        beta=cfg.beta,
        rdpo_alpha=cfg.rdpo_alpha,
        simpo_gamma_beta_ratio=cfg.simpo_gamma_beta_ratio,
        tdpo_alpha=cfg.tdpo_alpha,
    )

    def pair_losses(pairs):
        P = len(pairs)
        b = pair_batch(pairs, cfg.data.packing, pad, d.device)
        inputs = dict(**model_inputs(b), loss_mask=b["loss_mask"])

        def chosen_rejected(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = per_sequence_sum(per_token, b["loss_mask"], b["seq_id"], 2 * P)  # [2P]
            return s[:P], s[P:]

        ref_w = ref_l = kl_w = kl_l = kl_ref = None
        if ref is not None:
            with torch.no_grad():
                r = ref(**inputs, return_hidden=cfg.loss == "tdpo")
            ref_w, ref_l = chosen_rejected(r["logp"])
            if cfg.loss == "tdpo":
                kl_ref = (r["hidden"], *ref_head)
        out = policy(**inputs, kl_ref=kl_ref, kl_chunk=cfg.tdpo_chunk)
        if kl_ref is not None:
            kl_w, kl_l = chosen_rejected(out["kl"])
        (lp_w, lp_l), (len_w, len_l) = chosen_rejected(out["logp"]), chosen_rejected(b["loss_mask"].float())
        return preference_loss(cfg.loss, lp_w, lp_l, ref_w, ref_l, len_w, len_l, kl_chosen=kl_w, kl_rejected=kl_l, **kw)

    def forward(pairs):
        losses, r_w, r_l = pair_losses(pairs)
        return losses.sum(), pair_stats(losses, r_w, r_l)

    def means(s):
        n = max(s["pairs"], 1)
        return {
            "loss": s["loss"] / n,
            "reward_accuracy": s["correct"] / n,
            "reward_margin": s["margin"] / n,
            "chosen_reward": s["chosen_reward"] / n,
            "rejected_reward": s["rejected_reward"] / n,
        }

    return Task(model=policy, hf_model=lm, forward=forward, count=lambda items: float(len(items)), means=means)


def main(cfg: DPOConfig) -> dict[str, float]:
    return run(cfg, "dpo", tokenize_pairs, build_task)
