"""`rto ppo`: PPO and RTO (and the paper's ablations) with an FSDP2 actor and critic.

Run: rto ppo --recipe toy actor.path=<SFT> reward=<RM> dpo=<DPO model> data.path=<prompts> [algo=rto]
     torchrun --nproc_per_node=8 -m rto ppo --recipe llama3_8b_rto actor.path=... reward=... dpo=...

One step, as the loop below reads:
    prompts -> engine.generate -> score_rollout (old/ref/DPO log-probs, values, RM score)
            -> compute_advantages (rto_kernels.rto_advantages, whitened over ranks)
            -> ppo_update (epochs x minibatches x micro-batches; actor and critic)
            -> engine.sync_weights -> metrics, checkpoint
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoTokenizer

from rto.advantages import compute_advantages
from rto.checkpoint import checkpoint_dir, export_hf, load_checkpoint, save_checkpoint
from rto.config import ConfigError, PPOConfig
from rto.data import epoch_batches, load_data_rows, tokenize_prompts
from rto.guard import NonFiniteGuard
from rto.losses import ppo_policy_loss, value_loss
from rto.metrics import MetricLogger
from rto.models import PolicyModel, ScalarModel, check_model_path, load_causal_lm, load_scalar_model, load_tokenizer
from rto.parallel import Dist, all_reduce_sum, clip_grad_norm, freeze, named_collectives, shard
from rto.rollout.engine import RolloutBatch
from rto.rollout.hf import HFEngine
from rto.scoring import Packed, Scored, action_values, policy_forward, score_rollout
from rto.trainers.offline import cosine_schedule, resume_path, start_run

log = logging.getLogger(__name__)


@dataclass
class Models:
    actor: nn.Module  # PolicyModel, FSDP2 root, trainable
    actor_lm: nn.Module  # the HF causal LM inside it (generation, export)
    ref: nn.Module
    dpo: nn.Module | None
    critic: nn.Module | None  # ScalarModel, trainable (None for reinforce++)
    critic_hf: nn.Module | None
    reward: nn.Module  # ScalarModel, frozen


def check_same_tokenizer(actor_tok, path: str, what: str) -> None:
    """The DPO model and the reward model score the actor's token ids: their vocabularies must be the actor's."""
    check_model_path(path, what)
    other = AutoTokenizer.from_pretrained(path)
    a, b = actor_tok.get_vocab(), other.get_vocab()
    if a != b or actor_tok.eos_token_id != other.eos_token_id:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ConfigError(
            f"the tokenizer of {what} ({path}) differs from the actor's ({len(b)} vs {len(a)} tokens, EOS "
            f"{other.eos_token_id} vs {actor_tok.eos_token_id}; e.g. {diff}): {what} must share the actor's "
            "tokenizer, because it scores the actor's token ids directly"
        )


def build_models(cfg: PPOConfig, d: Dist) -> Models:
    m, p = cfg.actor, cfg.parallel
    lm = load_causal_lm(m.path, m, "actor.path")
    actor = shard(PolicyModel(lm), lm, p, d.device)
    ref_lm = load_causal_lm(cfg.ref or m.path, m, "ref" if cfg.ref else "actor.path")
    ref = freeze(shard(PolicyModel(ref_lm), ref_lm, p, d.device))
    dpo = None
    if cfg.algo != "ppo":
        dpo_lm = load_causal_lm(cfg.dpo, m, "dpo")
        dpo = freeze(shard(PolicyModel(dpo_lm), dpo_lm, p, d.device))
    rm_hf = load_scalar_model(cfg.reward, m, "reward")
    reward = freeze(shard(ScalarModel(rm_hf), rm_hf, p, d.device))
    critic = critic_hf = None
    if cfg.estimator == "gae":
        critic_hf = load_scalar_model(cfg.critic or cfg.reward, m, "critic" if cfg.critic else "reward")
        critic = shard(ScalarModel(critic_hf), critic_hf, p, d.device)
    return Models(actor, lm, ref, dpo, critic, critic_hf, reward)


def build_engine(cfg: PPOConfig, models: Models, tokenizer, d: Dist):
    if cfg.rollout.engine == "vllm":
        from rto.rollout.vllm import VLLMEngine

        return VLLMEngine(models.actor_lm, cfg.actor.path, tokenizer, cfg.rollout, d.device, cfg.train.seed)
    return HFEngine(models.actor, models.actor_lm, tokenizer, cfg.rollout, d.device)


class Timer:
    """Wall time per phase; a collective that times out inside a phase is reported with the phase's name."""

    def __init__(self, step: int = 0):
        self.seconds: dict[str, float] = {}
        self.step = step

    @contextmanager
    def __call__(self, phase: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with named_collectives(f"step {self.step}: the {phase} phase"):
            yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] = time.perf_counter() - start


def step_prompts(prompts: list[list[int]], step: int, cfg: PPOConfig, d: Dist) -> list[list[int]]:
    """This rank's prompts for a rollout step (a seeded pass over the prompt set), each repeated per sample."""
    per_step = cfg.rollout.prompts_per_step
    steps_per_epoch = len(prompts) // per_step
    epoch, index = divmod(step, steps_per_epoch)
    batch = epoch_batches(len(prompts), per_step, cfg.train.seed, epoch)[index]
    share = per_step // d.world_size
    mine = batch[d.rank * share : (d.rank + 1) * share]
    return [prompts[i] for i in mine for _ in range(cfg.rollout.samples_per_prompt)]


def micro_batches(index: torch.Tensor, lengths: torch.Tensor, cfg: PPOConfig, device) -> list[torch.Tensor]:
    """Cut a minibatch into micro-batches of at most micro_batch_size sequences and micro_token_budget tokens.
    Every rank must run the same number of forwards (FSDP2 collectives), so the count is agreed over ranks."""
    t = cfg.train
    n = max(1, -(-len(index) // t.micro_batch_size))
    if t.micro_token_budget:
        n = max(n, -(-int(lengths[index].sum()) // t.micro_token_budget))
    n = int(all_reduce_max(n, device))
    return [chunk for chunk in torch.tensor_split(index, min(n, len(index))) if len(chunk)]


def all_reduce_max(x: int, device) -> int:
    t = torch.tensor(x, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def trimmed(batch: RolloutBatch, rows: torch.Tensor) -> tuple[RolloutBatch, int]:
    """The selected rows, cut to their longest sequence (fewer padded columns to compute)."""
    b = batch.select(rows)
    T = int(b.attention_mask.sum(1).max())  # host sync
    return RolloutBatch(*(getattr(b, f)[:, :T] if getattr(b, f).ndim == 2 else getattr(b, f)
                          for f in b.__dataclass_fields__)), T  # fmt: skip


def ppo_update(batch: RolloutBatch, s: Scored, adv: torch.Tensor, returns: torch.Tensor, models: Models, opt,
               cfg: PPOConfig, d: Dist, step: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """PPO epochs x minibatches x micro-batches; losses are sums over tokens / the minibatch's global token count."""
    t = cfg.train
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

                models.actor.set_requires_gradient_sync(last)
                out = policy_forward(models.actor, mb, cfg.rollout.temperature, packed,
                                     return_entropy=t.entropy_coef > 0)  # fmt: skip
                pg, stats = ppo_policy_loss(out["logp"], cut(s.logp_old), cut(adv), mask, t.clip_eps)
                loss = pg
                if t.entropy_coef > 0:
                    entropy = out["entropy"].sum()
                    loss = loss - t.entropy_coef * entropy
                    add("entropy", entropy)
                (loss * scale).backward()
                add("pg_loss", pg)
                for k, v in stats.items():
                    add(k, v)
                add("tokens", mask.sum().float())
                if models.critic is not None:
                    models.critic.set_requires_gradient_sync(last)
                    values = action_values(models.critic, mb, packed)
                    vf = value_loss(values, cut(s.values), cut(returns), mask, t.value_clip)
                    (vf * scale).backward()
                    add("vf_loss", vf)
            for name, optimizer, sched, model in opt:
                grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], sched.grad_clip)
                if bool(torch.isfinite(grad_norm)):  # host sync
                    optimizer.step()
                else:
                    add(f"{name}_skipped_updates", torch.ones((), device=d.device))
                    log.warning("step %d: %s gradient norm is %s; update skipped", step + 1, name, grad_norm.item())
                optimizer.zero_grad(set_to_none=True)
                sched.scheduler.step()
                add(f"{name}_grad_norm", grad_norm.float())
                add(f"{name}_updates", torch.ones((), device=d.device))
    return totals


@dataclass
class Sched:
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float


def rollout_stats(batch: RolloutBatch, s: Scored, rewards: torch.Tensor, returns: torch.Tensor,
                  cfg: PPOConfig) -> dict[str, torch.Tensor]:  # fmt: skip
    """Sums over this rank's rollout (reduced over ranks by the caller)."""
    mask = batch.response_mask
    zero = torch.zeros((), device=mask.device)
    z = torch.zeros_like(rewards)
    if s.logp_dpo is not None:
        z = cfg.rewards.dpo_scale * (s.logp_dpo - s.logp_ref)
        if cfg.rewards.dpo_clip is not None:
            z = z.clamp(-cfg.rewards.dpo_clip, cfg.rewards.dpo_clip)
    # the engine's log-prob of a forced EOS is that of the token it replaced: leave those tokens out
    last = mask & (torch.arange(mask.shape[1], device=mask.device) == (mask.cumsum(1).argmax(1, keepdim=True)))
    compare = mask & ~(last & batch.truncated[:, None])
    stats = {
        "sequences": torch.tensor(float(mask.shape[0]), device=mask.device),
        "response_tokens": mask.sum().float(),
        "score": s.raw_score.sum(),
        "truncated": batch.truncated.float().sum(),
        "reward_total": torch.where(mask, rewards, zero).sum(),
        "dpo_reward_total": torch.where(mask, z, zero).sum(),
        "kl_ref": torch.where(mask, s.logp_old - s.logp_ref, zero).sum(),
        "mismatch_abs": torch.where(compare, (batch.rollout_logp - s.logp_old).abs(), zero).sum(),
        "mismatch_tokens": compare.sum().float(),
    }
    if cfg.estimator == "gae":
        err = torch.where(mask, returns - s.values, zero)
        stats["ret_sum"], stats["ret_sq"] = (
            torch.where(mask, returns, zero).sum(),
            (torch.where(mask, returns, zero) ** 2).sum(),
        )
        stats["err_sum"], stats["err_sq"] = err.sum(), (err**2).sum()
    return stats


def summarise(r: dict[str, float], u: dict[str, float], seconds: dict[str, float], cfg: PPOConfig) -> dict[str, float]:
    n, tok = max(r["sequences"], 1), max(r["response_tokens"], 1)
    updates = max(u.get("actor_updates", 1), 1)
    m = {
        "rollout/score": r["score"] / n,
        "rollout/response_length": r["response_tokens"] / n,
        "rollout/max_response_length": r["max_length"],
        "rollout/truncated_fraction": r["truncated"] / n,
        "rollout/reward_per_sequence": r["reward_total"] / n,
        "rollout/dpo_reward_per_sequence": r["dpo_reward_total"] / n,
        "rollout/kl_ref_per_token": r["kl_ref"] / tok,
        "rollout/kl_ref_per_sequence": r["kl_ref"] / n,
        "rollout/logp_mismatch": r["mismatch_abs"] / max(r["mismatch_tokens"], 1),
        "train/pg_loss": u["pg_loss"] / max(u["tokens"], 1),
        "train/clip_fraction": u["clipped"] / max(u["tokens"], 1),
        "train/kl_old_k1": u["kl_old_k1"] / max(u["tokens"], 1),
        "train/kl_old_k3": u["kl_old_k3"] / max(u["tokens"], 1),
        "train/actor_grad_norm": u["actor_grad_norm"] / updates,
    }
    if "entropy" in u:
        m["train/entropy"] = u["entropy"] / max(u["tokens"], 1)
    if "vf_loss" in u:
        m["train/vf_loss"] = u["vf_loss"] / max(u["tokens"], 1)
        m["train/critic_grad_norm"] = u["critic_grad_norm"] / updates
        var_ret = r["ret_sq"] / tok - (r["ret_sum"] / tok) ** 2
        var_err = r["err_sq"] / tok - (r["err_sum"] / tok) ** 2
        m["train/value_explained_variance"] = 1 - var_err / var_ret if var_ret > 0 else 0.0
    for phase, sec in seconds.items():
        m[f"time/{phase}_s"] = sec
    m["time/step_s"] = sum(seconds.values())
    m["throughput/generate_tokens_per_s"] = r["response_tokens"] / max(seconds.get("generate", 0), 1e-9)
    return m


def load_prompts(cfg: PPOConfig, tokenizer, d: Dist) -> list[list[int]]:
    rows = load_data_rows(cfg.data)
    prompts, _ = tokenize_prompts(rows, tokenizer, cfg.data, f"{cfg.data.path}[{cfg.data.split}]",
                                  progress=d.is_main and cfg.run.progress)  # fmt: skip
    if len(prompts) < cfg.rollout.prompts_per_step:
        raise ConfigError(f"{len(prompts)} prompts cannot fill one rollout step of rollout.prompts_per_step="
                          f"{cfg.rollout.prompts_per_step}")  # fmt: skip
    return prompts


def main(cfg: PPOConfig, rollout_metrics: Callable[[RolloutBatch], dict[str, torch.Tensor]] | None = None) -> dict:
    """Train; `rollout_metrics` (optional) maps a rollout batch to extra per-sequence values [B], logged as
    their mean under rollout/<name> (the toy world logs the gold reward of every rollout this way)."""
    d, run_dir = start_run(cfg)
    tokenizer = load_tokenizer(cfg.actor)
    if cfg.dpo is not None and cfg.algo != "ppo":
        check_same_tokenizer(tokenizer, cfg.dpo, "dpo")
    check_same_tokenizer(tokenizer, cfg.reward, "reward")
    prompts = load_prompts(cfg, tokenizer, d)
    torch.manual_seed(cfg.train.seed)
    models = build_models(cfg, d)
    engine = build_engine(cfg, models, tokenizer, d)
    t = cfg.train
    updates_per_step = (
        t.ppo_epochs * cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt // t.train_batch_size
    )
    opt = []
    for name, model, o in (("actor", models.actor, cfg.actor_optim), ("critic", models.critic, cfg.critic_optim)):
        if model is None:
            continue
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                      betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)  # fmt: skip
        sched = Sched(
            cosine_schedule(optimizer, t.steps * updates_per_step, o.warmup_ratio, o.min_lr_ratio), o.grad_clip
        )
        opt.append((name, optimizer, sched, model))
    trainables = {name: (model, optimizer) for name, optimizer, _, model in opt}

    start = 0
    torch.manual_seed(t.seed + 1000 * d.rank)  # per-rank sampling streams (a resume restores the saved ones)
    resume = resume_path(cfg, run_dir)
    if resume is not None:
        state = load_checkpoint(resume, trainables, d)
        if state["n_prompts"] != len(prompts):
            raise ValueError(
                f"cannot resume from {resume}: it used {state['n_prompts']} prompts, this run has {len(prompts)}"
            )
        for name, _, sched, _ in opt:
            sched.scheduler.load_state_dict(state["schedulers"][name])
        start = state["step"]
        log.info("resumed from %s at step %d", resume, start)

    logger = MetricLogger(run_dir, enabled=d.is_main, total_steps=t.steps, initial_step=start,
                          tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb, progress=cfg.run.progress)  # fmt: skip
    metrics: dict[str, float] = {}
    guard = NonFiniteGuard(t.max_nonfinite, str(run_dir / "checkpoints"))

    def save(step: int) -> None:
        state = {"step": step, "n_prompts": len(prompts),
                 "schedulers": {name: sched.scheduler.state_dict() for name, _, sched, _ in opt}}  # fmt: skip
        save_checkpoint(checkpoint_dir(run_dir, step), trainables, state, d, cfg.run.keep_last)

    try:
        for step in range(start, t.steps):
            timer = Timer(step + 1)
            with timer("generate"):
                batch = engine.generate(step_prompts(prompts, step, cfg, d))
            with timer("score"):
                scored = score_rollout(
                    batch, actor=models.actor, ref=models.ref, dpo=models.dpo, critic=models.critic,
                    reward_model=models.reward, rewards=cfg.rewards, temperature=cfg.rollout.temperature,
                    micro_batch_size=t.micro_batch_size, packing=t.packing,
                )  # fmt: skip
            with timer("advantages"):
                rewards, adv, returns = compute_advantages(scored, batch.response_mask, cfg)
            inputs = {
                "reward-model score": scored.score,
                "token rewards": rewards,
                "advantages": adv,
                "returns": returns,
            }
            with timer("update"):
                update = {}
                if guard.check(step + 1, inputs):
                    update = ppo_update(batch, scored, adv, returns, models, opt, cfg, d, step)
                    skipped = [n for n, *_ in opt if float(update.get(f"{n}_skipped_updates", 0)) > 0]  # host sync
                    if skipped:
                        guard.skip(step + 1, f"{skipped[0]} gradient norm")
            with timer("sync"):
                engine.sync_weights()
            logger.advance()
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                stats = rollout_stats(batch, scored, rewards, returns, cfg)
                extra = rollout_metrics(batch) if rollout_metrics is not None else {}
                stats.update({f"extra/{k}": v.float().sum() for k, v in extra.items()})
                r = {k: all_reduce_sum(v, d.device).item() for k, v in stats.items()}
                u = {k: all_reduce_sum(v, d.device).item() for k, v in update.items()}
                r["max_length"] = all_reduce_max(int(batch.response_lengths.max()), d.device)
                metrics = summarise(r, defaultdict(float, u), timer.seconds, cfg)
                metrics["train/skipped_updates"] = guard.total
                metrics.update({f"rollout/{k[6:]}": v / r["sequences"] for k, v in r.items() if k.startswith("extra/")})
                metrics["train/actor_lr"] = opt[0][2].scheduler.get_last_lr()[0]
                logger.log(step + 1, metrics)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps and guard.in_a_row == 0:
                save(step + 1)
        save(t.steps)
        export_hf(models.actor_lm, tokenizer, run_dir / "hf" / "actor", d)
        if models.critic_hf is not None:
            export_hf(models.critic_hf, tokenizer, run_dir / "hf" / "critic", d)
        return metrics
    finally:
        logger.close()
