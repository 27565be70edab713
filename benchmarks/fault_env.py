"""The fault probe's machinery that its cases use too (benchmarks/fault_probe.py judges and runs them,
benchmarks/fault_cases.py sets them up): a case's folder and command (`Env`, `base_args`, `merge`), a command in
its own process group (`Process`) and what it leaves (`Run`), the last line of its stderr (`last_line`)."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OFFLINE = [
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.max_steps=2",
    "run.progress=false",
    "run.tensorboard=false",
]


@dataclass
class Run:
    rc: int | None  # None: killed at the timeout
    stderr: str
    seconds: float


@dataclass
class Env:
    """One case's folder (`root`, runs under `root/runs`) and the shared assets; `fmt` fills {case}, {runs} and
    {<asset>} in a setting."""

    root: Path
    assets: dict[str, Path]
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def fmt(self, text: str) -> str:
        return text.format(case=self.root, runs=self.runs, **self.assets)

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def rows(self, name: str, rows: list[dict]) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def lines(self, asset: str, name: str, edits: dict[int, bytes | dict]) -> Path:
        """A copy of a jsonl asset with the given (1-based) lines replaced: bytes as they are, a dict as JSON."""
        lines = self.assets[asset].read_bytes().split(b"\n")
        for n, new in edits.items():
            lines[n - 1] = json.dumps(new).encode() if isinstance(new, dict) else new
        return self.write(name, b"\n".join(lines))

    def copy(self, asset: str, name: str) -> Path:
        src, dst = self.assets[asset], self.root / name
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        return dst

    def prior(self, asset: str = "prior_sft") -> Path:
        """A finished run copied to runs/prior (checkpoints at steps 1 and 2, hf/)."""
        return self.copy(asset, "runs/prior")

    def argv(self, command: str, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "rto", command, *merge(base_args(command, self), [self.fmt(x) for x in extra])]


def base_args(command: str, env: Env) -> list[str]:
    """A small run of `command` on the shared assets, into env.runs/run."""
    a = env.assets
    if command == "ppo":
        from tests.assets import small_ppo_args

        return ["--recipe=toy", *small_ppo_args(a, env.runs, "run", "train.steps=2")]
    if command == "eval":
        sizes = ["max_new_tokens=8", "data.max_rows=8"]
        return [f"model={a['model']}", f"data.path={a['prompts']}", *sizes, f"output_dir={env.runs}", "name=run"]
    if command == "inspect":
        models = [f"model={a['model']}", f"ref={a['model']}", f"dpo={a['dpo']}"]
        return [*models, f"data.path={a['prompts']}", "n=2", "max_new_tokens=8", f"output_dir={env.runs}", "name=run"]
    data = a["sft"] if command == "sft" else a["pairs"]
    return [f"model.path={a['model']}", f"data.path={data}", f"run.output_dir={env.runs}", "run.name=run", *OFFLINE]


def merge(base: list[str], extra: list[str]) -> list[str]:
    """Settings by key, the case's last: `key=value` sets, `-key` removes, `--flag[=value]` replaces a flag, and
    anything else (a malformed override) is passed as it is."""
    flags, settings = {}, {}
    for token in base + extra:
        if token.startswith("--"):
            flags[token.split("=", 1)[0]] = token
        elif token.startswith("-"):
            settings.pop(token[1:], None)
        else:
            settings[token.split("=", 1)[0] if "=" in token else ("as it is", token)] = token
    return [*flags.values(), *settings.values()]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RTO_DEBUG", "TRITON_INTERPRET")}
    offline = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return {**env, **offline, "TOKENIZERS_PARALLELISM": "false"}


# ---- how a case runs ----


class Process:
    """A command in its own process group, its stderr collected line by line as it comes."""

    def __init__(self, argv: list[str], env: Env, limit_bytes: int | None = None):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            cwd=env.root,
            env={**child_env(), "HF_HOME": str(env.assets["hf_home"])},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if (
            limit_bytes is not None
        ):  # a disk that fills up: later writes past it fail with EFBIG (Python ignores SIGXFSZ)
            resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        self.err: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            self.err.append(raw.decode("utf-8", "replace"))

    def said(self, text: str) -> bool:
        return text in "".join(self.err)

    def finish(self, timeout: float) -> Run:
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - self.start)))
            rc = self.proc.returncode
            rc = 128 - rc if rc < 0 else rc  # killed by signal N: 128 + N, as a shell reports it
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own child's process group
            self.proc.wait()
            rc = None
        self.reader.join(timeout=10)
        return Run(rc, "".join(self.err), time.perf_counter() - self.start)


def stderr_lines(text: str) -> list[str]:
    """stderr as lines, progress-bar redraws (carriage returns) split too, blank ones dropped."""
    return [x.strip() for x in re.split(r"[\r\n]", text) if x.strip()]


def last_line(text: str) -> str:
    lines = stderr_lines(text)
    return lines[-1] if lines else ""
