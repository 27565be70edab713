"""Run folders: who owns one, and one live run at a time.

    <run>/run.json   the identity of the run that owns the folder: the command and the settings a checkpoint
                     can only be continued under (algo, estimator, models, data, what shapes optimiser state)
    <run>/run.lock   the live run (pid, host, process start, boot id), under a kernel lock (flock) while it runs

`claim` runs on every rank at the start of a run, before anything is written to the folder. Rank 0 takes the
lock, refuses a fresh start into a folder that holds an earlier run's checkpoints or final model unless
run.overwrite=true (which deletes them), picks the checkpoint to resume from, and refuses one written under
another identity, naming the field. Every rank gets rank 0's verdict. On resume, metrics.jsonl loses the rows
logged after the checkpoint's step (they are logged again), so no step appears twice.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from rto.checkpoint import STATE, CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint

log = logging.getLogger(__name__)

IDENTITY = "run.json"
LOCK = "run.lock"
METRICS = "metrics.jsonl"
OUTPUTS = ("checkpoints", "hf", METRICS, "tensorboard", "config.yaml", IDENTITY)  # what run.overwrite deletes


class RunDirError(ValueError):
    """A run folder this run may not use as asked: in use, holding another run, or another run's checkpoint."""


def identity_of(command: str, cfg, keys: Sequence[str]) -> dict:
    """{"command": command, key: the value of each dotted setting}; existing local paths are made absolute so
    that one folder named two ways compares equal. A key the config lacks gets None."""
    identity = {"command": command}
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        if isinstance(value, str) and value and Path(value).exists():
            value = str(Path(value).resolve())
        identity[key] = value
    return identity


class RunLock:
    """A claimed run folder: the lock (held by rank 0 only), the identity and `checkpoint`, the folder to resume
    from (None: a fresh start). Released by close(), at the end of a `with`, or at exit."""

    def __init__(self, run_dir: Path, identity: dict):
        self.run_dir, self.identity = run_dir, identity
        self.checkpoint: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _holder(self.run_dir / LOCK).get("pid") == os.getpid():
                (self.run_dir / LOCK).unlink()  # under the kernel lock: nobody can hold it yet
        os.close(self._fd)  # releases the kernel lock
        self._fd = None
        atexit.unregister(self.close)

    def _acquire(self) -> None:
        file = self.run_dir / LOCK
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the file may be unlinked between our open and flock by a run that is ending
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            kernel = _flock(fd)
            if kernel and os.fstat(fd).st_ino != _inode(file):
                os.close(fd)
                continue
            holder = _holder(file)
            alive = _alive(holder) if holder else False
            # refused: the kernel lock is taken, or the holder runs on this host (same pid and start), or it runs
            # elsewhere and this filesystem has no kernel lock to tell
            if kernel is False or alive or (alive is None and kernel is None):
                os.close(fd)
                advice = f"wait for that run to end, or delete {file.name} if it is gone"
                raise RunDirError(f"{self.run_dir} is in use by {_describe(holder)} ({file}); {advice}")
            if holder:
                log.warning("taking over the stale lock %s of %s (that process is gone)", file, _describe(holder))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_me()).encode())
            os.fsync(fd)
            self._fd = fd
            atexit.register(self.close)
            return
        raise RunDirError(f"{file}: could not take the lock (another run keeps replacing it)")


def _flock(fd: int) -> bool | None:
    """True: the kernel lock is ours; False: another process holds it; None: this filesystem has none."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _inode(file: Path) -> int | None:
    try:
        return file.stat().st_ino
    except FileNotFoundError:
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), which tells a reused pid from the holder."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _me() -> dict:
    pid = os.getpid()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_id(), "start": _start_ticks(pid), "since": since}


def _holder(file: Path) -> dict:
    try:
        holder = json.loads(file.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict) -> bool | None:
    """Whether the process that wrote the lock still runs (None: it is on another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot") and holder["boot"] != _boot_id():
        return False  # the host rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    start = _start_ticks(pid)
    return start is None or holder.get("start") is None or start == holder["start"]


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def claim(run_dir: Path, identity: dict, *, resume: str | None, overwrite: bool, is_main: bool) -> RunLock:
    """Every rank, at the start of a run, before writing to `run_dir`. Rank 0: lock, check and prepare the folder
    (see the module docstring), record `identity`. Returns the lock with `.checkpoint` set on every rank; raises
    RunDirError or CheckpointError (one line) on every rank when the run may not go ahead."""
    identity = json.loads(json.dumps(identity))  # as it reads back from run.json: lists, not tuples
    lock = RunLock(run_dir, identity)
    verdict = ["", "", ""]  # error class, message, checkpoint
    if is_main:
        try:
            lock._acquire()
            checkpoint = _admit(run_dir, identity, resume, overwrite)
            verdict[2] = str(checkpoint or "")
        except (RunDirError, CheckpointError, OSError) as e:
            lock.close()
            kind = type(e).__name__ if isinstance(e, RunDirError | CheckpointError) else "RunDirError"
            message = str(e) if kind == type(e).__name__ else f"cannot use run folder {run_dir}: {e}"
            verdict[:2] = [kind, message]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    kind, message, checkpoint = verdict
    if kind:
        raise (CheckpointError if kind == "CheckpointError" else RunDirError)(message)
    lock.checkpoint = Path(checkpoint) if checkpoint else None
    return lock


def _admit(run_dir: Path, identity: dict, resume: str | None, overwrite: bool) -> Path | None:
    """Rank 0, holding the lock: prepare the folder; the checkpoint to resume from, or None."""
    if overwrite and resume is not None:
        raise RunDirError(f"run.overwrite=true starts the run over: it cannot go with run.resume={resume}")
    checkpoints = list_checkpoints(run_dir)
    if resume is None or (resume == "auto" and not checkpoints):
        _start_fresh(run_dir, bool(checkpoints), overwrite, resume)
        _write_identity(run_dir, identity)
        return None
    if resume == "auto":
        path = latest_checkpoint(run_dir)  # logs each damaged one it skips
        if path is None:
            where = run_dir / "checkpoints"
            advice = "start over with run.overwrite=true and no run.resume"
            raise RunDirError(f"run.resume=auto: none of the {len(checkpoints)} checkpoints in {where} loads; {advice}")
    else:
        path = Path(resume)
        if not path.is_dir():
            raise RunDirError(f"run.resume: no checkpoint folder at {path}")
    manifest = verify_checkpoint(path)
    sources = {f"{path / 'manifest.json'}": manifest.get("identity"), str(run_dir / IDENTITY): _read(run_dir)}
    if path.parent.name == "checkpoints":
        sources[str(path.parent.parent / IDENTITY)] = _read(path.parent.parent)
    for source, stored in sources.items():
        _compare(stored, identity, source)
    step = json.loads((path / STATE).read_text()).get("step")
    if isinstance(step, int):
        rewind_metrics(run_dir, step)
    _write_identity(run_dir, identity)
    return path


def _start_fresh(run_dir: Path, has_checkpoints: bool, overwrite: bool, resume: str | None) -> None:
    held = ["checkpoints"] if has_checkpoints else []
    held += ["a final model (hf/)"] if (run_dir / "hf").exists() else []
    if held and not overwrite:
        what = f"{run_dir} holds {' and '.join(held)} of an earlier run"
        if resume == "auto":  # nothing to resume, but a finished run's model
            advice = "start over with run.overwrite=true and no run.resume, or use another run.name"
            raise RunDirError(f"{what} but no checkpoint to resume; {advice}")
        advice = "continue it with run.resume=auto, or start over with run.overwrite=true (deletes them)"
        raise RunDirError(f"{what}: {advice}")
    if overwrite:
        removed = [name for name in OUTPUTS if (run_dir / name).exists()]
        for name in removed:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        if removed:
            log.warning("run.overwrite=true: deleted %s in %s", ", ".join(removed), run_dir)
    elif (run_dir / METRICS).exists():  # an attempt that saved nothing: keep its log, out of the new run's way
        n = 1
        while (run_dir / f"{METRICS}.{n}").exists():
            n += 1
        (run_dir / METRICS).rename(run_dir / f"{METRICS}.{n}")
        log.info("%s: the metrics of an earlier attempt that saved no checkpoint are now %s.%d", run_dir, METRICS, n)


def _read(run_dir: Path) -> dict | None:
    file = run_dir / IDENTITY
    if not file.exists():
        return None
    try:
        identity = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunDirError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(identity, dict):
        raise RunDirError(f"{file}: expected a JSON object")
    return identity


def _compare(stored: dict | None, identity: dict, source: str) -> None:
    """RunDirError naming the first field recorded in both with different values (fields recorded in only
    one are not compared: a run folder of an older version of RTO records fewer)."""
    for key, value in identity.items():
        if stored is not None and key in stored and stored[key] != value:
            mismatch = f"{source} records {key}={stored[key]!r}, this run has {key}={value!r}"
            raise RunDirError(f"cannot resume: {mismatch} (a different run: give it another run.name)")


def _write_identity(run_dir: Path, identity: dict) -> None:
    tmp = run_dir / f"{IDENTITY}.tmp"
    tmp.write_text(json.dumps(identity, indent=1), encoding="utf-8")
    tmp.replace(run_dir / IDENTITY)


def rewind_metrics(run_dir: Path, step: int) -> int:
    """Drop the metrics.jsonl rows logged after `step` (and a line torn by a kill); returns how many went."""
    file = run_dir / METRICS
    if not file.is_file():
        return 0
    lines = file.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and not (isinstance(row.get("step"), int) and row["step"] > step):
                kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        tmp.replace(file)
        log.info("%s: dropped %d rows logged after step %d (those steps run again)", file, dropped, step)
    return dropped
