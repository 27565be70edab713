"""What every training command does around its loop: start-up, optimisers and schedules, resume, phase timing.

Both loops (the offline trainers in `rto.trainers.offline`, PPO/RTO in `rto.trainers.ppo`) build on these:
- `start_run`: process group, validation against the real world size, logging, the run folder claimed for this
  run (`rto.rundir`: lock, owner, the checkpoint `run.resume` picks) and its config;
- `Trainable` / `build_trainable`: one model with its AdamW optimiser, cosine schedule and gradient clip, and
  `Trainable.step()`, the clip-check-step-schedule sequence of one optimiser update;
- `Timer`: wall time per phase, with a timed-out collective reported under the phase's name;
- `StopSignals` / `PreemptedError`: SIGTERM and SIGINT end a run after a checkpoint of its last finished step.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rto.config import OptimConfig, to_yaml, validate
from rto.parallel import Dist, clip_grad_norm, init_distributed, named_collectives
from rto.rundir import RunLock, claim, identity_of

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from (missing, or written by a different run)."""


# The settings a checkpoint can only be continued under (with the command): what the run trains, on what, and
# what shapes its optimiser state and data order. A resume under other values is refused, naming the field.
_OFFLINE_KEYS = (
    "model.path",
    "model.revision",
    "data.path",
    "data.subset",
    "data.split",
    "train.seed",
    "train.global_batch_size",
    "optim.betas",
)
IDENTITY_KEYS = {
    "sft": _OFFLINE_KEYS,
    "rm": _OFFLINE_KEYS,
    "dpo": (*_OFFLINE_KEYS, "loss", "ref"),
    "ppo": (
        "algo",
        "estimator",
        "actor.path",
        "actor.revision",
        "ref",
        "dpo",
        "reward",
        "critic",
        "data.path",
        "data.subset",
        "data.split",
        "train.seed",
        "train.train_batch_size",
        "rollout.prompts_per_step",
        "rollout.samples_per_prompt",
        "actor_optim.betas",
        "critic_optim.betas",
    ),
}


def start_run(cfg, command: str) -> tuple[Dist, Path, RunLock]:
    """Process group, validation against the real world size, logging, then the run folder: claimed for this
    run (locked, its owner checked, the checkpoint to resume from picked: `lock.checkpoint`), with config.yaml."""
    d = init_distributed(cfg.parallel.timeout_s)
    validate(cfg, d.world_size)
    log_format = "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING, format=log_format)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    identity = identity_of(command, cfg, IDENTITY_KEYS[command])
    lock = claim(run_dir, identity, resume=cfg.run.resume, overwrite=cfg.run.overwrite, is_main=d.is_main)
    if lock.checkpoint is None and cfg.run.resume == "auto":
        log.info("run.resume=auto: no checkpoint in %s yet, starting fresh", run_dir)
    if d.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return d, run_dir, lock


def cosine_schedule(optimizer, total: int, warmup_ratio: float, min_ratio: float):
    """Linear warm-up over warmup_ratio of `total` updates, then cosine decay to min_ratio x lr."""
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Trainable:
    """One trained model with its optimiser, schedule and gradient clip (the actor, the critic, an offline model)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip(self) -> torch.Tensor:
        """Clip the global gradient norm; returns the norm before clipping (a collective over ranks)."""
        return clip_grad_norm(self.params, self.grad_clip)

    def finish(self, apply: bool) -> None:
        """Apply the update (or skip it), clear the gradients, advance the schedule either way."""
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def build_trainable(name: str, model: nn.Module, o: OptimConfig, total_updates: int) -> Trainable:
    """AdamW over the model's trainable parameters, with the cosine schedule over `total_updates` updates."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = cosine_schedule(optimizer, total_updates, o.warmup_ratio, o.min_lr_ratio)
    return Trainable(name, model, optimizer, scheduler, o.grad_clip)


def checkpoint_trainables(trainables: list[Trainable]) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """The (model, optimizer) pairs a checkpoint saves, by name."""
    return {t.name: (t.model, t.optimizer) for t in trainables}


class Timer:
    """Wall time per phase; a collective that times out inside a phase is reported with the phase's name.
    Subclasses (the step benchmark) may measure more around each phase through `start`/`stop`."""

    def __init__(self, step: int = 0):
        self.seconds: dict[str, float] = {}
        self.step = step

    def start(self, phase: str) -> None:
        pass

    def stop(self, phase: str) -> None:
        pass

    @contextmanager
    def __call__(self, phase: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start(phase)
        begin = time.perf_counter()
        with named_collectives(f"step {self.step}: the {phase} phase"), torch.profiler.record_function(phase):
            yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[phase] = time.perf_counter() - begin
        self.stop(phase)


class PreemptedError(RuntimeError):
    """The run stopped on SIGTERM or SIGINT after checkpointing its last finished step."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no new checkpoint (a bad streak)"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}, {where}; continue with run.resume=auto"
        )


class StopSignals:
    """SIGTERM and SIGINT while training: the current step finishes, a checkpoint is written, then the run
    raises `PreemptedError` (exit code 128 + the signal). A second signal stops at once. Ranks agree through one
    small all-reduce per step, since the save is collective and only some ranks may have been signalled."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int = 0
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.received:  # the second one: stop now
            raise SystemExit(128 + signum)
        self.received = signum
        log.warning("received %s: finishing this step, then checkpointing and stopping", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def requested(self, device: torch.device) -> int:
        """The signal any rank received (0: none); a collective, called by every rank once per step."""
        flag = torch.tensor(self.received, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)  # host sync

    def end_of_step(self, step: int, total: int, save_every: int, good: bool, save: Callable[[], Path], device) -> None:
        """After step `step` of `total`: the periodic checkpoint (not in a bad streak, not at the end: the loop's
        final save follows), then, if a stop was asked for, a checkpoint of this step and PreemptedError."""
        saved = bool(save_every) and step % save_every == 0 and step < total and good
        path = save() if saved else None
        signum = self.requested(device) if step < total else 0
        if signum:
            if good and path is None:
                path = save()
            raise PreemptedError(signum, step, path)
