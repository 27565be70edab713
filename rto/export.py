"""`rto export <checkpoint> <out>`: a training checkpoint as Hugging Face folders, in one process.

    <out>/actor, <out>/critic   a PPO/RTO checkpoint (no critic for reinforce++)
    <out>                       an sft, rm or dpo checkpoint

The run folder above `checkpoints/` says what made the checkpoint: `run.json` and the manifest's identity give
the command (and the local model paths, made absolute when the run started), `config.yaml` the settings. The
models are rebuilt from those paths by the trainers' builders (`rto.build`), their weights read from the
checkpoint through the checked readers (`rto.checkpoint.read_state`: no code runs, every tensor must be there;
the optimizer state is not read), and written by `rto.checkpoint.export_hf`, with the run's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# the library is imported inside the functions: building the `rto` parser (which adds these arguments) stays light

# what each command's checkpoint holds: trainable name -> (builder in rto.build, the setting of its path)
OFFLINE = {"sft": ("policy", "model.path"), "rm": ("scalar", "model.path"), "dpo": ("policy", "model.path")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder: <run>/checkpoints/step_XXXXXXXX")
    p.add_argument("out", type=Path, help="where to write: <out> (sft, rm, dpo) or <out>/actor, <out>/critic (ppo)")
    p.add_argument("--overwrite", action="store_true", help="replace <out> when it exists and is not empty")
    p.add_argument("--debug", action="store_true", help="show the traceback of a project error (or RTO_DEBUG=1)")


def main(args: argparse.Namespace) -> int:
    export(args.checkpoint, args.out, overwrite=args.overwrite)
    return 0


def _json(file: Path) -> dict:
    from rto.checkpoint import CheckpointError

    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def read_run(checkpoint: Path):
    """(command, config) of the run that wrote `checkpoint`; the config's model paths are those the identity
    recorded (made absolute) where it recorded one. CheckpointError / ConfigError naming the file."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rto.checkpoint import MANIFEST, METADATA, CheckpointError, verify_checkpoint
    from rto.config import COMMANDS, ConfigError, validate
    from rto.config.base import first_line

    if checkpoint.is_dir() and not (checkpoint / MANIFEST).exists() and not (checkpoint / METADATA).exists():
        where = "a run folder: its checkpoints are in checkpoints/" if (checkpoint / "checkpoints").is_dir() else ""
        raise CheckpointError(f"{checkpoint} is not a checkpoint folder ({where or f'no {MANIFEST}'})")
    manifest = verify_checkpoint(checkpoint)
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints":
        raise CheckpointError(
            f"{checkpoint} is not in a run's checkpoints/ folder, so no config.yaml says what made it"
        )
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        why = "which says which models and settings made it"
        raise CheckpointError(f"{checkpoint}: its run folder {run_dir} holds no config.yaml, {why}")
    recorded = manifest.get("identity") or {}
    identity = {**_json(run_dir / "run.json"), **recorded}
    command = identity.get("command")
    if command not in ("ppo", *OFFLINE):
        raise CheckpointError(f"{checkpoint}: neither its manifest nor {run_dir / 'run.json'} names the command")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(COMMANDS[command]), OmegaConf.load(config_file))
        for key, value in identity.items():  # local model paths as the run resolved them when it started
            if key != "command" and key.endswith(("path", "critic", "reward")) and isinstance(value, str):
                if Path(value).is_absolute():
                    OmegaConf.update(conf, key, value)
        cfg = OmegaConf.to_object(conf)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{config_file}: not a readable {command} config ({first_line(e)})") from None
    validate(cfg)
    return command, cfg


def plan(command: str, cfg) -> list[tuple[str, str, str, str]]:
    """(trainable name, builder, the setting of its path, path) of every model the checkpoint holds; the critic
    starts as cfg.critic_source() says (as in rto.trainers.ppo.build_models)."""
    if command in OFFLINE:
        builder, what = OFFLINE[command]
        return [("model", builder, what, cfg.model.path)]
    models = [("actor", "policy", "actor.path", cfg.actor.path)]
    if (source := cfg.critic_source()) is not None:
        models.append(("critic", "scalar", *source))
    return models


def _check_out(out: Path, checkpoint: Path, overwrite: bool) -> None:
    from rto.config import ConfigError

    c, o = checkpoint.resolve(), out.resolve()
    if o == c or o in c.parents or c in o.parents:
        where = "is inside" if c in o.parents else "holds"
        raise ConfigError(f"{out} {where} the checkpoint {checkpoint} that it would be exported from: export elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")


def export(checkpoint: Path, out: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the checkpoint's models as HF folders under `out` (see the module docstring); returns the folders
    written. Refuses (one-line project errors) a path that is not a checkpoint, a run folder without config.yaml,
    a non-empty `out` (unless overwrite) and model paths that no longer exist."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from rto import build
    from rto.checkpoint import STATE, CheckpointError, export_hf, read_metadata, read_state
    from rto.config import ConfigError
    from rto.models import check_model_folder, load_tokenizer
    from rto.parallel import init_distributed

    checkpoint, out = Path(checkpoint), Path(out)
    command, cfg = read_run(checkpoint)
    _check_out(out, checkpoint, overwrite)
    models = plan(command, cfg)
    held = {key.split(".")[0] for key in read_metadata(checkpoint / ".metadata").state_dict_metadata}
    missing = [name for name, *_ in models if name not in held]
    if missing:
        raise CheckpointError(
            f"{checkpoint} holds no {missing[0]} weights, which a {command} run with its config saves"
        )
    model_cfg = cfg.actor if command == "ppo" else cfg.model
    paths = [(what, path) for _, _, what, path in models]
    if model_cfg.tokenizer:
        paths.append((f"{'actor' if command == 'ppo' else 'model'}.tokenizer", model_cfg.tokenizer))
    for what, path in paths:
        try:
            check_model_folder(path, what, weights=not what.endswith("tokenizer"))
        except ConfigError as e:
            raise ConfigError(f"{e} (export rebuilds {checkpoint}'s models from the run's model paths)") from None

    d = init_distributed(cfg.parallel.timeout_s)
    tokenizer = load_tokenizer(model_cfg)
    built = {}
    for name, builder, what, path in models:
        root, hf = getattr(build, builder)(path, model_cfg, what, cfg.parallel, d.device, tokenizer=tokenizer)
        built[name] = (root, hf)
    state = {name: get_model_state_dict(root) for name, (root, _) in built.items()}
    read_state(checkpoint, state)  # the checked readers; a tensor the models need but the checkpoint lacks: error
    try:
        for name, (root, _) in built.items():
            set_model_state_dict(root, state[name])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot load {checkpoint} into the run's models: {str(e).splitlines()[0]}") from None

    step = json.loads((checkpoint / STATE).read_text()).get("step")
    if command == "ppo" and overwrite and out.is_dir() and d.is_main:
        shutil.rmtree(out)  # nothing of an earlier export is left (a critic a reinforce++ checkpoint lacks)
    written = []
    for name, (_, hf) in built.items():
        where = out / name if command == "ppo" else out
        if d.is_main:
            where.parent.mkdir(parents=True, exist_ok=True)
        export_hf(hf, tokenizer, where, d)
        written.append(where)
        if d.is_main:
            n = sum(p.numel() for p in hf.parameters())
            print(f"rto export: {command} step {step}: {name} ({type(hf).__name__}, {n:,} parameters) -> {where}")
    return written
