"""Metrics: JSON lines (always), tensorboard (when installed), wandb (when asked), a progress bar.

Only rank 0 writes. Metric names carry their unit where they have one (`time/step_s`, `tokens_per_s`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int,
        tensorboard: bool,
        wandb: bool,
        progress: bool,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        self.file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # appended: a resume continues the log (rto.rundir.claim has dropped the rows past the checkpoint)
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("run.tensorboard=true but tensorboard is not installed: logging to metrics.jsonl only")
        if wandb:
            import wandb as wb  # asked for explicitly: a missing install is an error

            self.wandb = wb.init(project="rto", name=run_dir.name, dir=str(run_dir), config=config, resume="allow")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=run_dir.name, unit="step")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith(("train/", "eval/"))}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()


def run_logger(run_dir: Path, run, d, *, total_steps: int, initial_step: int) -> MetricLogger:
    """The logger of a training run: rank 0 writes, with the outputs `run` (a RunConfig) asks for."""
    return MetricLogger(
        run_dir,
        enabled=d.is_main,
        total_steps=total_steps,
        initial_step=initial_step,
        tensorboard=run.tensorboard,
        wandb=run.wandb,
        progress=run.progress,
    )
