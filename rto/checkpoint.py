"""Checkpoints: resumable training state (torch.distributed.checkpoint) and Hugging Face exports.

Layout of a run folder:
    <run>/checkpoints/step_00000042/   model + optimizer shards (DCP), trainer_state.json, rng_rank<r>.pt
    <run>/hf/                          the final model as an HF checkpoint (save_pretrained + tokenizer)
A checkpoint is written to `step_N.tmp/` and renamed once every rank has finished, so a crash during a save
leaves the previous checkpoint as the latest complete one; only the last `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rto.parallel import Dist, barrier, full_state_dict

PREFIX = "step_"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (temporary folders of interrupted saves are ignored)."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


Trainable = dict[str, tuple[nn.Module, torch.optim.Optimizer]]  # name -> (FSDP2 model, its optimizer)


def save_checkpoint(path: Path, trainables: Trainable, trainer_state: dict, d: Dist, keep_last: int) -> None:
    """Save each model's and optimizer's shards, the trainer state (step, data position, schedulers) and each
    rank's RNG."""
    tmp = path.with_name(path.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_state(trainables), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    barrier()
    if d.is_main:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        old = sorted(p for p in path.parent.glob(f"{PREFIX}*") if not p.name.endswith(".tmp"))
        for p in old[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()


def load_checkpoint(path: Path, trainables: Trainable, d: Dist) -> dict:
    """Restore models, optimizers and this rank's RNG from `path`; returns the trainer state."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    state = _state(trainables)
    dcp.load(state, checkpoint_id=str(path))
    for name, (model, optimizer) in trainables.items():
        set_state_dict(model, optimizer, model_state_dict=state[name], optim_state_dict=state[f"{name}_optim"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{path} was saved with fewer ranks: no {rng_file.name} (resume with the same count)")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state_file.read_text())


def _state(trainables: Trainable) -> dict:
    state = {}
    for name, (model, optimizer) in trainables.items():
        state[name], state[f"{name}_optim"] = get_state_dict(model, optimizer)
    return state


def export_hf(hf_model: nn.Module, tokenizer, out_dir: Path, d: Dist) -> None:
    """Write the (possibly sharded) model as an ordinary HF checkpoint with its tokenizer, atomically."""
    state = full_state_dict(hf_model)  # every rank gathers
    if d.is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
