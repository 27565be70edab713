"""`rto ppo`: PPO and RTO (and the paper's ablations) with an FSDP2 actor and critic.

Run: rto ppo --recipe toy actor.path=<SFT> reward=<RM> dpo=<DPO model> data.path=<prompts> [algo=rto]
     torchrun --nproc_per_node=8 -m rto ppo --recipe llama3_8b_rto actor.path=... reward=... dpo=...

`PPOTrainer.step(prompts)` is one whole step, read top to bottom in `step`:
    generate (rollout engine) -> score (old/ref/DPO log-probs, values, RM score, no gradients)
    -> advantages (rto_kernels.rto_advantages, whitened over ranks) -> guard (non-finite inputs skip the update)
    -> update (PPO epochs x minibatches x micro-batches; actor and critic) -> sync (weights to the engine)
    -> metrics
`main` builds the trainer, resumes, loops over steps, saves and exports. The step benchmark and the tests call
the same `step`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from rto import build
from rto.advantages import compute_advantages
from rto.checkpoint import checkpoint_dir, export_hf, load_checkpoint, save_checkpoint
from rto.config import PPOConfig
from rto.data import epoch_batches, load_data_rows, require_rows, tokenize_prompts
from rto.families import stop_token_ids
from rto.guard import NonFiniteGuard
from rto.metrics import run_logger
from rto.models import check_same_tokenizers, load_tokenizer, reward_normalisation
from rto.parallel import Dist, all_reduce_sum
from rto.rollout.engine import RolloutBatch
from rto.rollout.hf import HFEngine
from rto.run import (
    ResumeError,
    RunLock,
    StopSignals,
    Timer,
    Trainable,
    build_trainable,
    checkpoint_trainables,
    start_run,
)
from rto.scoring import Scored, score_rollout
from rto.step_metrics import rollout_stats, summarise
from rto.update import all_reduce_max, ppo_update

log = logging.getLogger(__name__)
RolloutMetrics = Callable[[RolloutBatch], dict[str, torch.Tensor]]


@dataclass
class Models:
    actor: nn.Module  # PolicyModel, FSDP2 root, trainable
    actor_lm: nn.Module  # the HF causal LM inside it (generation, export)
    ref: nn.Module
    dpo: nn.Module | None
    critic: nn.Module | None  # ScalarModel, trainable (None for reinforce++)
    critic_hf: nn.Module | None
    reward: nn.Module  # ScalarModel, frozen
    reward_norm: tuple[float, float] | None = None  # (mean, std) the reward model's checkpoint states, if any


def build_models(cfg: PPOConfig, d: Dist, tokenizer=None) -> Models:
    m, packing = cfg.actor, "train.packing" if cfg.train.packing else None
    common = dict(parallel=cfg.parallel, device=d.device, packing=packing, tokenizer=tokenizer)
    actor, lm = build.policy(m.path, m, "actor.path", **common)
    ref, _ = build.policy(cfg.ref or m.path, m, "ref" if cfg.ref else "actor.path", **common, frozen=True)
    dpo = build.policy(cfg.dpo, m, "dpo", **common, frozen=True)[0] if cfg.algo != "ppo" else None
    reward, rm_hf = build.scalar(cfg.reward, m, "reward", **common, frozen=True)
    critic = critic_hf = None
    if (source := cfg.critic_source()) is not None:
        critic, critic_hf = build.scalar(source[1], m, source[0], **common)
    return Models(actor, lm, ref, dpo, critic, critic_hf, reward, reward_normalisation(rm_hf))


def build_engine(cfg: PPOConfig, models: Models, tokenizer, d: Dist):
    """The rollout engine; it stops a response at any of the model's stop tokens (tokenizer EOS, the model's
    generation_config eos ids, rollout.stop_tokens)."""
    stops = stop_token_ids(tokenizer, cfg.actor.path, cfg.rollout.stop_tokens, revision=cfg.actor.revision)
    if cfg.rollout.engine == "vllm":
        from rto.rollout.vllm import VLLMEngine

        lm, seed = models.actor_lm, cfg.train.seed
        hub = dict(revision=cfg.actor.revision, trust_remote_code=cfg.actor.trust_remote_code)
        return VLLMEngine(lm, cfg.actor.path, tokenizer, cfg.rollout, d.device, seed, stop_ids=stops, **hub)
    return HFEngine(models.actor, models.actor_lm, tokenizer, cfg.rollout, d.device, stop_ids=stops)


def build_trainables(cfg: PPOConfig, models: Models) -> list[Trainable]:
    """The actor's and (with GAE) the critic's optimiser and schedule, over every update of the run."""
    t = cfg.train
    updates_per_step = (
        t.ppo_epochs * cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt // t.train_batch_size
    )
    total = t.steps * updates_per_step
    out = [build_trainable("actor", models.actor, cfg.actor_optim, total)]
    if models.critic is not None:
        out.append(build_trainable("critic", models.critic, cfg.critic_optim, total))
    return out


@dataclass
class StepResult:
    step: int  # 1-based index of the step just done
    batch: RolloutBatch
    scored: Scored
    rewards: torch.Tensor  # [B, T] token rewards fed to GAE
    advantages: torch.Tensor  # [B, T] whitened
    returns: torch.Tensor  # [B, T]
    update: dict[str, torch.Tensor]  # this rank's summed update statistics (empty when the guard skipped it)
    seconds: dict[str, float]  # wall time per phase
    metrics: dict[str, float] = field(default_factory=dict)  # the logged numbers (when asked for)


class PPOTrainer:
    """One PPO/RTO step as a unit, over models, an engine and trainables built elsewhere (`build`, or by hand in
    the step benchmark). `advantages` and `timer` can be swapped by the benchmark's peer-style variant."""

    def __init__(
        self,
        cfg: PPOConfig,
        d: Dist,
        models: Models,
        engine,
        trainables: list[Trainable],
        guard: NonFiniteGuard,
        *,
        rollout_metrics: RolloutMetrics | None = None,
        advantages: Callable | None = None,
        timer: type[Timer] = Timer,
    ):
        self.cfg, self.d, self.models, self.engine, self.trainables = cfg, d, models, engine, trainables
        self.guard, self.rollout_metrics, self.timer = guard, rollout_metrics, timer
        self.advantages = advantages or compute_advantages
        self.steps_done = 0
        self.identity: dict | None = None  # the run's identity, recorded in each checkpoint (set by main)
        r = cfg.rewards
        self.score_norm = (r.score_mean, r.score_std) if r.score_mean is not None else models.reward_norm
        if self.score_norm is not None and d.is_main:
            source = "rewards.score_mean/score_std" if r.score_mean is not None else "the reward model's config"
            log.info("reward-model scores normalised as (score - %g) / %g (%s)", *self.score_norm, source)

    @classmethod
    def build(cls, cfg: PPOConfig, d: Dist, tokenizer, guard: NonFiniteGuard, **kwargs) -> PPOTrainer:
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        models = build_models(cfg, d, tokenizer)
        engine = build_engine(cfg, models, tokenizer, d)
        return cls(cfg, d, models, engine, build_trainables(cfg, models), guard, **kwargs)

    def step(self, prompts: list[list[int]], *, with_metrics: bool = True) -> StepResult:
        """Generate from `prompts` (this rank's, each repeated per sample), score, compute advantages, update the
        actor and critic, sync the engine; with_metrics: also reduce the logged numbers over ranks."""
        n = self.steps_done + 1
        timer = self.timer(n)
        with timer("generate"):
            batch = self.engine.generate(prompts)
        with timer("score"):
            scored = self.score(batch)
        with timer("advantages"):
            rewards, adv, returns = self.advantages(scored, batch.response_mask, self.cfg)
        with timer("guard"):
            named = {"reward-model score": scored.score, "token rewards": rewards, "advantages": adv}
            finite = self.guard.check(n, {**named, "returns": returns})
        with timer("update"):
            update = self.update(batch, scored, adv, returns) if finite else {}
        with timer("sync"):
            self.engine.sync_weights()
        self.steps_done = n
        result = StepResult(n, batch, scored, rewards, adv, returns, update, timer.seconds)
        if with_metrics:
            result.metrics = self.metrics(result)
        return result

    def score(self, batch: RolloutBatch) -> Scored:
        m, c = self.models, self.cfg
        models = dict(actor=m.actor, ref=m.ref, dpo=m.dpo, critic=m.critic, reward_model=m.reward)
        settings = dict(temperature=c.rollout.temperature, micro_batch_size=c.train.micro_batch_size)
        settings.update(packing=c.train.packing, dpo_support=c.rewards.dpo_support)
        return score_rollout(batch, **models, score_norm=self.score_norm, **settings)

    def update(self, batch, scored, adv, returns) -> dict[str, torch.Tensor]:
        update = ppo_update(batch, scored, adv, returns, self.trainables, self.cfg, self.d, self.steps_done)
        skipped = [tr.name for tr in self.trainables if float(update.get(f"{tr.name}_skipped_updates", 0)) > 0]
        if skipped:  # host sync above
            self.guard.skip(self.steps_done + 1, f"{skipped[0]} gradient norm")
        return update

    def metrics(self, r: StepResult) -> dict[str, float]:
        """The logged numbers of a step, reduced over ranks (collectives: every rank calls this)."""
        dev = self.d.device
        stats = rollout_stats(r.batch, r.scored, r.rewards, r.returns, self.cfg)
        extra = self.rollout_metrics(r.batch) if self.rollout_metrics is not None else {}
        stats.update({f"extra/{k}": v.float().sum() for k, v in extra.items()})
        rollout = {k: all_reduce_sum(v, dev).item() for k, v in stats.items()}
        update = {k: all_reduce_sum(v, dev).item() for k, v in r.update.items()}
        rollout["max_length"] = all_reduce_max(int(r.batch.response_lengths.max()), dev)
        metrics = summarise(rollout, defaultdict(float, update), r.seconds, self.cfg)
        metrics["train/skipped_updates"] = self.guard.total
        n = rollout["sequences"]
        metrics.update({f"rollout/{k[6:]}": v / n for k, v in rollout.items() if k.startswith("extra/")})
        metrics["train/actor_lr"] = self.trainables[0].lr
        return metrics

    def save(self, run_dir: Path, n_prompts: int) -> Path:
        schedulers = {tr.name: tr.scheduler.state_dict() for tr in self.trainables}
        state = {"step": self.steps_done, "n_prompts": n_prompts, "schedulers": schedulers}
        path = checkpoint_dir(run_dir, self.steps_done)
        trainables, keep = checkpoint_trainables(self.trainables), self.cfg.run.keep_last
        save_checkpoint(path, trainables, state, self.d, keep, identity=self.identity)
        return path

    def resume(self, path: Path, n_prompts: int) -> None:
        state = load_checkpoint(path, checkpoint_trainables(self.trainables), self.d, seed=self.cfg.train.seed)
        if state["n_prompts"] != n_prompts:
            raise ResumeError(
                f"cannot resume from {path}: it used {state['n_prompts']} prompts, this run has {n_prompts}"
            )
        for tr in self.trainables:
            tr.scheduler.load_state_dict(state["schedulers"][tr.name])
        self.steps_done = state["step"]
        log.info("resumed from %s at step %d", path, self.steps_done)

    def export(self, run_dir: Path, tokenizer) -> None:
        export_hf(self.models.actor_lm, tokenizer, run_dir / "hf" / "actor", self.d)
        if self.models.critic_hf is not None:
            export_hf(self.models.critic_hf, tokenizer, run_dir / "hf" / "critic", self.d)


def step_prompts(prompts: list[list[int]], step: int, cfg: PPOConfig, d: Dist) -> list[list[int]]:
    """This rank's prompts for a rollout step (a seeded pass over the prompt set), each repeated per sample."""
    per_step = cfg.rollout.prompts_per_step
    steps_per_epoch = len(prompts) // per_step
    epoch, index = divmod(step, steps_per_epoch)
    batch = epoch_batches(len(prompts), per_step, cfg.train.seed, epoch)[index]
    share = per_step // d.world_size
    mine = batch[d.rank * share : (d.rank + 1) * share]
    return [prompts[i] for i in mine for _ in range(cfg.rollout.samples_per_prompt)]


def load_prompts(cfg: PPOConfig, tokenizer, d: Dist) -> list[list[int]]:
    rows = load_data_rows(cfg.data)
    name = f"{cfg.data.path}[{cfg.data.split}]"
    prompts, _ = tokenize_prompts(rows, tokenizer, cfg.data, name, progress=d.is_main and cfg.run.progress)
    require_rows(len(prompts), cfg.rollout.prompts_per_step, name, "rollout.prompts_per_step")
    return prompts


def main(cfg: PPOConfig, rollout_metrics: RolloutMetrics | None = None) -> dict:
    """Train; `rollout_metrics` (optional) maps a rollout batch to extra per-sequence values [B], logged as
    their mean under rollout/<name> (the toy world logs the gold reward of every rollout this way)."""
    d, run_dir, lock = start_run(cfg, "ppo")
    with lock:
        return _train(cfg, d, run_dir, lock, rollout_metrics)


def _train(cfg: PPOConfig, d: Dist, run_dir: Path, lock: RunLock, rollout_metrics: RolloutMetrics | None) -> dict:
    tokenizer = load_tokenizer(cfg.actor, "actor.")
    dpo = cfg.dpo if cfg.algo != "ppo" else None
    scorers = {"dpo": dpo, "reward": cfg.reward, "critic": cfg.critic, "ref": cfg.ref}  # they score the actor's ids
    check_same_tokenizers(tokenizer, scorers, cfg=cfg.actor)
    prompts = load_prompts(cfg, tokenizer, d)
    t = cfg.train
    guard = NonFiniteGuard(t.max_nonfinite, str(run_dir / "checkpoints"))
    trainer = PPOTrainer.build(cfg, d, tokenizer, guard, rollout_metrics=rollout_metrics)
    trainer.identity = lock.identity
    torch.manual_seed(t.seed + 1000 * d.rank)  # per-rank sampling streams (a resume restores the saved ones)
    if lock.checkpoint is not None:
        trainer.resume(lock.checkpoint, len(prompts))
    logger = run_logger(run_dir, cfg.run, d, total_steps=t.steps, initial_step=trainer.steps_done)
    metrics: dict[str, float] = {}
    with StopSignals() as stop, logger:
        for step in range(trainer.steps_done, t.steps):
            due = (step + 1) % t.log_every == 0 or step + 1 == t.steps
            result = trainer.step(step_prompts(prompts, step, cfg, d), with_metrics=due)
            logger.advance()
            if due:
                metrics = result.metrics
                logger.log(result.step, metrics)
            save = partial(trainer.save, run_dir, len(prompts))
            stop.end_of_step(result.step, t.steps, t.save_every, guard.in_a_row == 0, save, d.device)
        trainer.save(run_dir, len(prompts))
        trainer.export(run_dir, tokenizer)
        return metrics
