"""Checkpoints: resumable training state (torch.distributed.checkpoint) and Hugging Face exports.

    <run>/checkpoints/step_00000042/   .metadata + __<r>_0.distcp (DCP: model and optimizer shards), trainer_state.json
                                       (step, data position, schedulers), rng_rank<r>.json, manifest.json
    <run>/hf/                          the final model as an HF checkpoint (safetensors + tokenizer)

A save refuses a non-finite state, writes `step_N.tmp/` and renames it once every rank is done (a crash leaves the
previous checkpoint the latest complete one). Loading runs no code from the folder: `.metadata` (a pickle) goes
through an unpickler that builds only DCP's metadata types, tensors and DCP's byte entries through
`torch.load(weights_only=True)`, the rest is JSON. Any rank count resumes: DCP reshards (a one-rank run's plain
tensors as well as FSDP2's DTensors), rank r takes saved rank r's RNG or one seeded from (train.seed, r, step).
"Newest" is most recently saved, not highest step.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from rto.parallel import Dist, all_reduce_sum, barrier, full_state_dict

log = logging.getLogger(__name__)

PREFIX = "step_"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
METADATA = ".metadata"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read (the message names the file), or a state that must not be
    saved (it names the tensor)."""


Trainable = dict[str, tuple[nn.Module, torch.optim.Optimizer]]  # name -> (model: FSDP2 or one-rank plain, optimizer)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run (not the `.tmp` of an interrupted save), oldest save first."""

    def saved_at(path: Path) -> tuple[float, str]:
        try:
            return float(json.loads((path / MANIFEST).read_text())["saved_at"]), path.name
        except (OSError, ValueError, KeyError, TypeError):  # the first format (no manifest), or a damaged one
            return ((path / STATE).stat().st_mtime if (path / STATE).is_file() else 0.0), path.name

    found = (run_dir / "checkpoints").glob(f"{PREFIX}*")
    return sorted((p for p in found if p.is_dir() and not p.name.endswith(".tmp")), key=saved_at)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently saved checkpoint that passes `verify_checkpoint`; newer ones skipped are logged, why."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


# The globals torch 2.13's DCP writes into .metadata ("module: names"): its metadata types, the shard index,
# shapes, a layout by name, StorageMeta's checkpoint_id path; dtypes are allowed by value (in find_class).
_ALLOWED_TABLE = """
torch.distributed.checkpoint.metadata: Metadata MetadataIndex StorageMeta TensorProperties TensorStorageMetadata
torch.distributed.checkpoint.metadata: BytesStorageMetadata ChunkStorageMetadata _MEM_FORMAT_ENCODING
torch.distributed.checkpoint.filesystem: _StorageInfo
torch: Size
torch.serialization: _get_layout
pathlib: PosixPath WindowsPath
pathlib._local: PosixPath WindowsPath
collections: OrderedDict
builtins: set frozenset
"""
_ALLOWED = {(m, n) for line in _ALLOWED_TABLE.strip().splitlines() for m, ns in [line.split(": ")] for n in ns.split()}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata: any other global a pickle names is refused before it is looked up."""

    def __init__(self, data: bytes, file: Path):
        super().__init__(io.BytesIO(data))
        self.file = file

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.file}: refusing to load: it asks for {module}.{name}, not DCP metadata")


def read_metadata(file: Path) -> Metadata:
    """A DCP `.metadata` file through the restricted unpickler; CheckpointError naming the file otherwise."""
    try:
        metadata = _MetadataUnpickler(file.read_bytes(), file).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing (an incomplete checkpoint)") from None
    except Exception as e:  # a truncated or malformed pickle fails in many ways; all mean "not readable"
        raise CheckpointError(f"{file}: not readable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: not DCP metadata (it holds a {type(metadata).__name__})")
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo) or Path(info.relative_path).name != info.relative_path:
            raise CheckpointError(f"{file}: a shard entry points outside the checkpoint folder ({info!r})")
    return metadata


class _CheckedReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_metadata` (tensors it reads with weights_only=True)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path) / METADATA)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _CheckedPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries (optimizer hyper-parameters) read with weights_only=True."""

    def __init__(self, where: Path):
        super().__init__()
        self.where = where

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = _load_plain(value)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.where}: refusing to load entry {fqn}: {_refusal(e)}") from None
        set_element(self.original_state_dict, self.mappings[fqn], obj)  # our state dicts are nested: flattened


def _load_plain(source):
    """torch.load restricted to tensors and plain values; its note on unusual pickle protocols (a crafted file's
    tell) is dropped, since the refusal that follows says what matters."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(source, weights_only=True)


def _refusal(e: pickle.UnpicklingError) -> str:
    """What a weights_only refusal says the file asked for (not its advice to load the file unrestricted)."""
    asked = [x.strip() for x in str(e).splitlines() if "unsupported" in x.lower()]
    return "it holds more than plain tensors and numbers" + (f" ({asked[0]})" if asked else "")


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing (an incomplete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return value


def _manifest(path: Path) -> dict:
    """The manifest, or for a checkpoint of the first format (no manifest) one made up from its files."""
    if (path / MANIFEST).exists():
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest.get("world_size"), int) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{path / MANIFEST}: no world_size or files")
        return manifest
    if not (path / STATE).is_file() or not (path / "rng_rank0.pt").is_file():  # nor one of the first format
        raise CheckpointError(f"{path / MANIFEST} is missing (an incomplete checkpoint)")
    return {"world_size": len(list(path.glob("rng_rank*.pt"))), "files": {}}


def verify_checkpoint(path: Path) -> dict:
    """Complete and readable, without loading tensors: the manifest's files at their sizes, `.metadata`, each shard
    entry inside its file, trainer state, every rank's RNG. Returns the manifest; CheckpointError names a bad file."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    manifest = _manifest(path)
    for name, size in manifest["files"].items():
        f = path / name
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise CheckpointError(f"{f} {found}, {MANIFEST} says {size} bytes (an incomplete or damaged checkpoint)")
    for info in read_metadata(path / METADATA).storage_data.values():
        f = path / info.relative_path
        if not f.is_file() or info.offset + info.length > f.stat().st_size:
            raise CheckpointError(f"{f} ends before the shard data that {METADATA} places in it (truncated?)")
    _read_json(path / STATE)
    for rank in range(manifest["world_size"]):
        _read_rng(path, rank)
    return manifest


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"format": FORMAT, "torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _read_rng(path: Path, rank: int) -> dict:
    """Saved rank `rank`'s RNG state, checked on throwaway generators: {"torch", "python", "cuda"?}."""
    file = path / f"rng_rank{rank}.json"
    try:
        if file.is_file():
            raw = _read_json(file)
            state = {k: torch.tensor(raw[k], dtype=torch.uint8) for k in ("torch", "cuda") if k in raw}
            state["python"] = raw["python"]
        else:  # the first format: a torch.save of tensors and a tuple of ints, which weights_only=True can read
            file = path / f"rng_rank{rank}.pt"
            state = _load_plain(file)
        version, internal, gauss = state["python"]
        state["python"] = (int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss))
        random.Random().setstate(state["python"])
        torch.Generator().set_state(state["torch"])
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing (an incomplete checkpoint)") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refusing to load: {_refusal(e)}") from None
    except Exception as e:  # wrong keys, types, lengths or encodings
        raise CheckpointError(f"{file}: not a valid RNG state ({type(e).__name__}: {e})") from None
    return state


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank the checkpoint holds no RNG state for: a function of the run seed, the rank and the
    step, so that it differs from the streams the run started with and from every other rank's."""
    digest = hashlib.sha256(f"rto-rng/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _restore_rng(path: Path, manifest: dict, step: int, d: Dist, seed: int) -> None:
    if d.rank < manifest["world_size"]:
        state = _read_rng(path, d.rank)
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        return
    derived = rank_seed(seed, d.rank, step)
    torch.manual_seed(derived)  # CPU and every CUDA device
    random.seed(derived)
    saved = manifest["world_size"]
    why = "rank %d: %s was saved on %d rank(s), so it holds no RNG state for this rank; seeded it from train.seed=%d"
    log.warning(why + ", the rank and step %d instead", d.rank, path, saved, seed, step)


def _state(trainables: Trainable) -> dict:
    state = {}
    for name, (model, optimizer) in trainables.items():
        state[name], state[f"{name}_optim"] = get_state_dict(model, optimizer)
    return state


def refuse_non_finite(trainables: Trainable, d: Dist, where: Path) -> None:
    """CheckpointError on every rank, naming the first tensor with a NaN or inf on any rank, among the models'
    floating parameters and buffers and their optimizers' state. One all-reduce, one host sync."""
    named = []
    for name, (model, optimizer) in trainables.items():
        param_names = {p: n for n, p in model.named_parameters()}
        named += [(f"{name} weight {n}", t) for n, t in (*model.named_parameters(), *model.named_buffers())]
        for p, slots in optimizer.state.items():
            named += [(f"{name} optimizer {k} of {param_names.get(p, '?')}", t) for k, t in slots.items()]
    local = {n: t.to_local() if isinstance(t, DTensor) else t for n, t in named if torch.is_tensor(t)}
    named = [(n, t.detach()) for n, t in local.items() if t.is_floating_point()]
    if not named:
        return
    bad = torch.stack([~torch.isfinite(t).all().to(d.device) for _, t in named])  # [n] on this rank's shards
    counts = all_reduce_sum(bad, d.device)  # [n] ranks with a bad value
    if bool(counts.any()):  # host sync
        what = named[int(counts.nonzero()[0])][0]
        why = "the last update poisoned it; the last saved checkpoint is left as it was"
        raise CheckpointError(f"refusing to save {where}: {what} holds NaN or inf ({why})")


def _together(d: Dist, what: str, fn: Callable[[], None]) -> None:
    """Run fn here; if it fails on any rank, every rank raises CheckpointError (none waits on one that gave up)."""
    error = None
    try:
        fn()
    except OSError as e:
        error = f"{what}: {e}"
    except CheckpointException as e:
        error = f"{what}: {_first_failure(e)}"
    if all_reduce_sum(float(error is not None), d.device).item() > 0:
        raise CheckpointError(error or f"{what}: failed on another rank")


def _first_failure(e: CheckpointException) -> str:
    for exc, _ in e.failures.values():
        return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return str(e)


def save_checkpoint(
    path: Path, trainables: Trainable, trainer_state: dict, d: Dist, keep_last: int, *, identity: dict | None = None
) -> None:
    """Every rank: save shards, trainer state (step, data position, schedulers), RNG and the manifest (with the
    run's `identity`, see rto.rundir), then prune to `keep_last`. CheckpointError when a tensor is not finite."""
    refuse_non_finite(trainables, d, path)
    tmp = path.with_name(path.name + ".tmp")

    def prepare() -> None:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> None:
        dcp.save(_state(trainables), checkpoint_id=str(tmp))
        (tmp / f"rng_rank{d.rank}.json").write_text(json.dumps(_rng_state()))
        if d.is_main:
            (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))

    def publish() -> None:  # main only: every rank's files are in tmp
        if not d.is_main:
            return
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest = {"format": FORMAT, "step": trainer_state.get("step"), "world_size": d.world_size}
        manifest.update(saved_at=time.time(), files=files, identity=identity)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        _prune(path, keep_last)

    where = f"cannot write checkpoint {path}"
    _together(d, where, prepare)
    _together(d, where, write)
    _together(d, where, publish)


def _prune(kept: Path, keep_last: int) -> None:
    """Delete all but the `keep_last` most recently saved checkpoints (`kept`, just written, stays). They are all
    this run's: rundir.claim refuses a fresh run into a folder holding checkpoints, or clears them (overwrite)."""
    done = [p for p in list_checkpoints(kept.parent.parent) if p != kept]
    for p in done[: max(0, len(done) - max(1, keep_last) + 1)]:
        shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path, state: dict) -> None:
    """Fill `state` (nested dicts of tensors, e.g. {"actor": model.state_dict()}) in place from a checkpoint's
    shards, through the checked readers (resharding as DCP does). CheckpointError naming the file otherwise."""
    try:
        dcp.load(state, storage_reader=_CheckedReader(str(path)), planner=_CheckedPlanner(path))
    except CheckpointException as e:
        failure = _first_failure(e)
        raise CheckpointError(failure if str(path) in failure else f"cannot load {path}: {failure}") from None


def load_checkpoint(path: Path, trainables: Trainable, d: Dist, *, seed: int = 0) -> dict:
    """Restore models, optimizers (resharded to this rank count) and this rank's RNG (`seed`, train.seed, seeds
    ranks the save did not have); returns the trainer state. A bad or refused file: CheckpointError naming it."""
    manifest = verify_checkpoint(path)
    state = _state(trainables)
    read_state(path, state)
    try:
        for name, (model, optimizer) in trainables.items():
            set_state_dict(model, optimizer, model_state_dict=state[name], optim_state_dict=state[f"{name}_optim"])
    except (RuntimeError, KeyError, ValueError) as e:  # shapes or keys that do not fit these models
        raise CheckpointError(f"cannot load {path} into this run's models: {str(e).splitlines()[0]}") from None
    trainer_state = _read_json(path / STATE)
    _restore_rng(path, manifest, int(trainer_state.get("step", 0)), d, seed)
    if d.is_main and manifest["world_size"] != d.world_size:
        saved = manifest["world_size"]
        log.info("%s was saved on %d rank(s), resumed on %d: model and optimizer resharded", path, saved, d.world_size)
    return trainer_state


def export_hf(hf_model: nn.Module, tokenizer, out_dir: Path, d: Dist) -> None:
    """Write the (possibly sharded) model as an HF checkpoint (safetensors) with its tokenizer, atomically."""
    state = full_state_dict(hf_model)  # every rank gathers
    if d.is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    barrier()
