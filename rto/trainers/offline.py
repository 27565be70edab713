"""The loop shared by the offline trainers (SFT, reward model, DPO family), and their set-up.

A trainer supplies a `Task`: the trainable FSDP2 root, the HF model to export, and a forward over a
micro-batch of items giving a differentiable sum and per-item statistics. `fit` is the loop:

    for each optimizer step:  this rank's micro-batches of the global batch
        -> loss, backward (gradient sync on the last micro-batch only)
        -> clip, skip the update if the gradient norm is not finite, optimizer and schedule step
        -> metrics (one all-reduce), evaluation and checkpoint when due
    -> final evaluation, checkpoint and HF export

Losses are sums divided by the global batch's count (tokens or pairs) and multiplied by the world size,
because FSDP2 averages gradients over ranks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from rto.checkpoint import checkpoint_dir, export_hf, load_checkpoint, save_checkpoint
from rto.config import OfflineConfig
from rto.data import epoch_batches, leftover, load_data_rows, load_rows, rank_micro_batches, require_rows
from rto.guard import NonFiniteGuard
from rto.metrics import run_logger
from rto.models import load_tokenizer
from rto.parallel import Dist, all_reduce_sum, named_collectives
from rto.run import (
    ResumeError,
    RunLock,
    StopSignals,
    Trainable,
    build_trainable,
    checkpoint_trainables,
    start_run,
)

log = logging.getLogger(__name__)


@dataclass
class Task:
    model: nn.Module  # the trainable FSDP2 root
    hf_model: nn.Module  # what the HF export saves
    # items -> (objective: a differentiable sum over the items, statistics: name -> per-item values [n_items])
    forward: Callable[[list], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count: Callable[[list], float]  # the normaliser of a global batch: response tokens or pairs
    means: Callable[[dict[str, float]], dict[str, float]]  # summed statistics -> logged metrics


@dataclass
class Context:
    cfg: OfflineConfig
    d: Dist
    run_dir: Path
    tokenizer: object
    lock: RunLock  # the claimed run folder; lock.checkpoint: what to resume from (None: a fresh start)


def setup(cfg: OfflineConfig, command: str) -> Context:
    """start_run, then the tokenizer."""
    d, run_dir, lock = start_run(cfg, command)
    torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank (e.g. a new scalar head)
    return Context(cfg=cfg, d=d, run_dir=run_dir, tokenizer=load_tokenizer(cfg.model), lock=lock)


def load_items(ctx: Context, tokenize: Callable) -> tuple[list, list]:
    """Training and held-out items: rows loaded, validated and tokenised by `tokenize` (data.tokenize_*)."""
    cfg = ctx.cfg
    progress = ctx.d.is_main and cfg.run.progress
    rows = load_data_rows(cfg.data)
    name = f"{cfg.data.path}[{cfg.data.split}]"
    items, _ = tokenize(rows, ctx.tokenizer, cfg.data, name=name, progress=progress)
    held_out = None
    if cfg.data.eval_path or cfg.data.eval_split:
        path, split = cfg.data.eval_path or cfg.data.path, cfg.data.eval_split or cfg.data.split
        subset = cfg.data.subset if path == cfg.data.path else None  # data.subset names a config of data.path
        rows = load_rows(path, split, "data.eval_path", bad_rows=cfg.data.bad_rows, subset=subset)
        held_out, _ = tokenize(rows, ctx.tokenizer, cfg.data, name=f"{path}[{split}]", progress=progress)
    train, held_out = split_eval(items, cfg, held_out)
    require_rows(len(train), cfg.train.global_batch_size, f"{name} (training part)", "train.global_batch_size")
    return train, held_out


def run(
    cfg: OfflineConfig, command: str, tokenize: Callable, build_task: Callable[[Context], Task]
) -> dict[str, float]:
    """Set up, load and tokenise the data (errors surface before any model loads), build the task, train."""
    ctx = setup(cfg, command)
    with ctx.lock:
        train, held_out = load_items(ctx, tokenize)
        task = build_task(ctx)
        torch.manual_seed(cfg.train.seed + ctx.d.rank)  # per-rank streams from here on
        return fit(task, train, held_out, ctx)


def split_eval(items: list, cfg: OfflineConfig, eval_items: list | None) -> tuple[list, list]:
    """The held-out set: given, or the last eval_fraction of a seeded shuffle of the training items."""
    if eval_items is not None or cfg.data.eval_fraction == 0:
        return items, eval_items or []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    n_eval = max(1, int(len(items) * cfg.data.eval_fraction))
    return [items[i] for i in order[:-n_eval]], [items[i] for i in order[-n_eval:]]


def evaluate(task: Task, items: Sequence, ctx: Context) -> dict[str, float]:
    """Statistics over the held-out items, split across ranks. Every rank runs the same number of forwards
    (FSDP2 gathers are collectives); ranks short of items repeat one with weight 0."""
    d, mb = ctx.d, ctx.cfg.train.micro_batch_size
    if not items:
        return {}
    per_rank = math.ceil(len(items) / d.world_size)
    mine = list(items[d.rank * per_rank : (d.rank + 1) * per_rank])
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [items[0]] * (per_rank - len(mine))
    totals: dict[str, torch.Tensor] = {}
    task.model.eval()
    with torch.no_grad():
        for i in range(0, per_rank, mb):
            w = torch.tensor(weights[i : i + mb], device=d.device)
            _, stats = task.forward(mine[i : i + mb])
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + (v.detach() * w).sum()
    task.model.train()
    sums = {k: all_reduce_sum(v, d.device).item() for k, v in totals.items()}  # host sync
    return {f"eval/{k}": v for k, v in task.means(sums).items()}


def fit(task: Task, train_items: list, eval_items: list, ctx: Context) -> dict[str, float]:
    cfg, d = ctx.cfg, ctx.d
    t, o = cfg.train, cfg.optim
    steps_per_epoch = len(train_items) // t.global_batch_size
    if steps_per_epoch == 0:
        n, batch = len(train_items), t.global_batch_size
        raise ValueError(f"{n} training items cannot fill one global batch of train.global_batch_size={batch}")
    left = leftover(len(train_items), t.global_batch_size)
    if left:
        text = "%d of %d training items do not fill a last global batch: each epoch leaves out a different %d"
        log.info(text + " (seeded shuffle)", left, len(train_items), left)
    total = t.max_steps or steps_per_epoch * t.epochs
    trainable = build_trainable("model", task.model, o, total)

    step = 0
    resume = ctx.lock.checkpoint
    if resume is not None:
        state = load_checkpoint(resume, checkpoint_trainables([trainable]), d, seed=t.seed)
        if state["n_train"] != len(train_items) or state["global_batch_size"] != t.global_batch_size:
            raise ResumeError(
                f"cannot resume from {resume}: it was trained on {state['n_train']} items with global batch "
                f"{state['global_batch_size']}, this run has {len(train_items)} and {t.global_batch_size}"
            )
        trainable.scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        log.info("resumed from %s at step %d", resume, step)

    logger = run_logger(ctx.run_dir, cfg.run, d, total_steps=total, initial_step=step)
    guard = NonFiniteGuard(t.max_nonfinite, str(ctx.run_dir / "checkpoints"))
    metrics: dict[str, float] = {}
    epoch_cache: dict[int, list[list[int]]] = {}
    task.model.train()
    with StopSignals() as stop, logger:
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(len(train_items), t.global_batch_size, t.seed, epoch)}
            batch = epoch_cache[epoch][index]
            start = time.perf_counter()
            denom = task.count([train_items[i] for i in batch])
            micro = rank_micro_batches(batch, d.rank, d.world_size, t.micro_batch_size)
            totals: dict[str, torch.Tensor] = {}
            with named_collectives(f"step {step + 1}: forward/backward (FSDP2 all-gather / reduce-scatter)"):
                for i, ids in enumerate(micro):
                    task.model.set_requires_gradient_sync(i == len(micro) - 1)
                    objective, stats = task.forward([train_items[j] for j in ids])
                    (objective * d.world_size / denom).backward()  # FSDP2 averages gradients over ranks
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0) + v.detach().sum()
                grad_norm = trainable.clip()
            first = next(iter(totals))  # the loss-like statistic of the task (loss or nll)
            finite = guard.check(step + 1, {f"loss ({first})": totals[first], "gradient norm": grad_norm})
            trainable.finish(apply=finite)
            step += 1
            logger.advance()

            if step % t.log_every == 0 or step == total:
                sums = {k: all_reduce_sum(v, d.device).item() for k, v in totals.items()}  # host sync
                elapsed = time.perf_counter() - start
                metrics = {f"train/{k}": v for k, v in task.means(sums).items()}
                metrics["train/lr"] = trainable.lr
                metrics["train/grad_norm"] = grad_norm.item()
                metrics["train/skipped_updates"] = guard.total
                metrics["time/step_s"] = elapsed
                if "tokens" in sums:
                    metrics["throughput/tokens_per_s"] = sums["tokens"] / elapsed
                logger.log(step, metrics)
            if t.eval_every and step % t.eval_every == 0 and step < total:
                logger.log(step, evaluate(task, eval_items, ctx))
            save = partial(_save, trainable, step, len(train_items), ctx)
            stop.end_of_step(step, total, t.save_every, guard.in_a_row == 0, save, d.device)
        final = evaluate(task, eval_items, ctx)
        logger.log(step, final)
        _save(trainable, step, len(train_items), ctx)
        export_hf(task.hf_model, ctx.tokenizer, ctx.run_dir / "hf", d)
        if d.is_main:
            log.info("done: %d steps; HF checkpoint in %s", step, ctx.run_dir / "hf")
        return {**metrics, **final}


def _save(trainable: Trainable, step: int, n_train: int, ctx: Context) -> Path:
    batch = ctx.cfg.train.global_batch_size
    state = {
        "step": step,
        "scheduler": trainable.scheduler.state_dict(),
        "n_train": n_train,
        "global_batch_size": batch,
    }
    trainables = checkpoint_trainables([trainable])
    path = checkpoint_dir(ctx.run_dir, step)
    save_checkpoint(path, trainables, state, ctx.d, ctx.cfg.run.keep_last, identity=ctx.lock.identity)
    return path
