"""Metrics: JSON lines (always), tensorboard (when installed), wandb (when asked), a progress bar.

Only rank 0 writes. Metric names carry their unit where they have one (`time/step_s`, `tokens_per_s`). The run's
config (its `config.yaml`) goes to wandb as the run's config and to tensorboard once as the text `config`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from rto.config import ConfigError
from rto.config.offline import WANDB_MISSING

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
        wandb_project: str = "rto",
        wandb_entity: str | None = None,
        wandb_group: str | None = None,
    ):
        """config: the run's settings (nested), logged once; wandb_*: where wandb files the run (run.wandb_*)."""
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        self.file = None
        if not enabled:
            return
        wb = _import_wandb() if wandb else None  # before any file opens: a missing install stops the run here
        run_dir.mkdir(parents=True, exist_ok=True)
        # appended: a resume continues the log (rto.rundir.claim has dropped the rows past the checkpoint)
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("run.tensorboard=true but tensorboard is not installed: logging to metrics.jsonl only")
            else:
                if config is not None:  # tensorboard's text tab renders markdown: indented lines are code
                    text = "\n".join("    " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines())
                    self.tb.add_text("config", text, initial_step)
        if wb is not None:
            self.wandb = wb.init(
                project=wandb_project,
                entity=wandb_entity,
                group=wandb_group,
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                resume="allow",
            )
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


def _import_wandb():
    """wandb, asked for explicitly (run.wandb=true): a missing install is a ConfigError saying what to install."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(WANDB_MISSING.format(at="run.")) from e
    return wandb


def run_config(run_dir: Path) -> dict | None:
    """The run's settings as `rto.run.start_run` wrote them (`config.yaml`), or None without that file."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else None


def run_logger(run_dir: Path, run, d, *, total_steps: int, initial_step: int) -> MetricLogger:
    """The logger of a training run: rank 0 writes, with the outputs `run` (a RunConfig) asks for, and logs the
    run's config (the config.yaml in `run_dir`) once."""
    return MetricLogger(
        run_dir,
        enabled=d.is_main,
        total_steps=total_steps,
        initial_step=initial_step,
        tensorboard=run.tensorboard,
        wandb=run.wandb,
        progress=run.progress,
        config=run_config(run_dir) if d.is_main else None,
        wandb_project=run.wandb_project,
        wandb_entity=run.wandb_entity,
        wandb_group=run.wandb_group,
    )
