"""The PPO update of one rollout: epochs x minibatches x micro-batches over the actor (and the critic).

Losses are sums over tokens divided by the minibatch's global token count and multiplied by the world size,
because FSDP2 averages gradients over ranks. Each minibatch ends in one optimiser update per trainable; an
update whose gradient norm is not finite is skipped and counted (`<name>_skipped_updates`).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from rto.config import PPOConfig
from rto.forward import Packed, action_values, policy_forward
from rto.losses import ppo_policy_loss, value_loss
from rto.parallel import Dist, all_reduce_sum
from rto.rollout.engine import RolloutBatch
from rto.run import Trainable
from rto.scoring import Scored

log = logging.getLogger(__name__)


def all_reduce_max(x: int, device) -> int:
    t = torch.tensor(x, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def micro_batches(index: torch.Tensor, lengths: torch.Tensor, cfg: PPOConfig, device) -> list[torch.Tensor]:
    """Cut a minibatch into micro-batches of at most micro_batch_size sequences and micro_token_budget tokens.
    Every rank must run the same number of forwards (FSDP2 collectives), so the count is agreed over ranks."""
    t = cfg.train
    n = max(1, -(-len(index) // t.micro_batch_size))
    if t.micro_token_budget:
        n = max(n, -(-int(lengths[index].sum()) // t.micro_token_budget))
    n = int(all_reduce_max(n, device))
    return [chunk for chunk in torch.tensor_split(index, min(n, len(index))) if len(chunk)]


def trimmed(batch: RolloutBatch, rows: torch.Tensor) -> tuple[RolloutBatch, int]:
    """The selected rows, cut to their longest sequence (fewer padded columns to compute)."""
    b = batch.select(rows)
    T = int(b.attention_mask.sum(1).max())  # host sync
    fields = (getattr(b, f) for f in b.__dataclass_fields__)
    return RolloutBatch(*(x[:, :T] if x.ndim == 2 else x for x in fields)), T


def ppo_update(
    batch: RolloutBatch,
    s: Scored,
    adv: torch.Tensor,
    returns: torch.Tensor,
    trainables: list[Trainable],
    cfg: PPOConfig,
    d: Dist,
    step: int,
) -> dict[str, torch.Tensor]:
    """One rollout's PPO epochs. trainables: the actor first, then the critic if any (`Trainable.name`s "actor",
    "critic"). Returns summed statistics (losses, clip counts, grad norms, update counts) of this rank."""
    t = cfg.train
    actor = trainables[0].model
    critic = trainables[1].model if len(trainables) > 1 else None
    B = batch.input_ids.shape[0]
    local_mb = t.train_batch_size // d.world_size
    lengths = batch.attention_mask.sum(1)
    totals: dict[str, torch.Tensor] = {}

    def add(k, v):
        totals[k] = totals.get(k, 0) + v.detach()

    for epoch in range(t.ppo_epochs):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(t.seed * 7919 + step * 31 + epoch))
        for start in range(0, B, local_mb):
            index = order[start : start + local_mb].to(batch.input_ids.device)
            n_tokens = all_reduce_sum(batch.response_mask[index].sum(), d.device).clamp(min=1)
            scale = d.world_size / n_tokens.float()  # FSDP2 averages gradients over ranks
            chunks = micro_batches(index, lengths, cfg, d.device)
            for i, rows in enumerate(chunks):
                last = i == len(chunks) - 1
                mb, T = trimmed(batch, rows)
                mask = mb.response_mask
                packed = Packed.of(mb) if t.packing else None  # one layout for the actor's and the critic's forward

                def cut(x, rows=rows, T=T):  # the rollout tensors of this micro-batch, trimmed like it
                    return x[rows][:, :T]

                actor.set_requires_gradient_sync(last)
                entropy_on = t.entropy_coef > 0
                out = policy_forward(actor, mb, cfg.rollout.temperature, packed, return_entropy=entropy_on)
                pg, stats = ppo_policy_loss(out["logp"], cut(s.logp_old), cut(adv), mask, t.clip_eps)
                loss = pg
                if entropy_on:
                    entropy = out["entropy"].sum()
                    loss = loss - t.entropy_coef * entropy
                    add("entropy", entropy)
                (loss * scale).backward()
                add("pg_loss", pg)
                for k, v in stats.items():
                    add(k, v)
                add("tokens", mask.sum().float())
                if critic is not None:
                    critic.set_requires_gradient_sync(last)
                    values = action_values(critic, mb, packed)
                    vf = value_loss(values, cut(s.values), cut(returns), mask, t.value_clip)
                    (vf * scale).backward()
                    add("vf_loss", vf)
            for tr in trainables:
                grad_norm = tr.clip()
                finite = bool(torch.isfinite(grad_norm))  # host sync
                if not finite:
                    add(f"{tr.name}_skipped_updates", torch.ones((), device=d.device))
                    log.warning("step %d: %s gradient norm is %s; update skipped", step + 1, tr.name, grad_norm.item())
                tr.finish(apply=finite)
                add(f"{tr.name}_grad_norm", grad_norm.float())
                add(f"{tr.name}_updates", torch.ones((), device=d.device))
    return totals
