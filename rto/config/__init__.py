"""Typed run configuration: dataclasses, YAML recipes, dotted command-line overrides, one validation pass.

A command's config is built as: the dataclass defaults, then the recipe's section for that command
(`rto/recipes/<name>.yaml`, or any YAML path), then `key=value` overrides. OmegaConf checks names and types
(an unknown key or a value of the wrong type is an error naming the key). Then every section checks its own
settings (signs, ranges, finiteness, choices: `Section.check`), and the command checks what needs several
sections or the world size (`Section.check_across`), all before any model or dataset is loaded. A bad value
raises ConfigError naming the dotted setting; nothing is rewritten.

The sections are spread over base.py (ConfigError, Keys, Section), offline.py (shared sections, sft/rm/dpo),
ppo.py and tools.py (eval, inspect, pipeline); every public name is re-exported here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rto.config.base import (
    BOUNDS,
    SEED_LIMIT,
    STOP_TOKENS_DOC,
    ConfigError,
    Keys,
    Section,
    check_sections,
    doc,
    first_line,
    is_file_name,
)
from rto.config.offline import (
    DPO_LOSSES,
    DataConfig,
    DPOConfig,
    ModelConfig,
    OfflineConfig,
    OptimConfig,
    ParallelConfig,
    PromptDataConfig,
    RMConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)
from rto.config.ppo import PPOConfig, PPOTrainConfig, RewardConfig, RolloutConfig
from rto.config.tools import EvalConfig, InspectConfig, PipelineConfig, ToyWorldConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # rto/recipes

__all__ = [  # the names `from rto.config import X` has always given
    "BOUNDS",
    "COMMANDS",
    "DPO_LOSSES",
    "RECIPES",
    "SEED_LIMIT",
    "STOP_TOKENS_DOC",
    "ConfigError",
    "DataConfig",
    "DPOConfig",
    "EvalConfig",
    "InspectConfig",
    "Keys",
    "ModelConfig",
    "OfflineConfig",
    "OptimConfig",
    "ParallelConfig",
    "PipelineConfig",
    "PPOConfig",
    "PromptDataConfig",
    "PPOTrainConfig",
    "RewardConfig",
    "RMConfig",
    "RolloutConfig",
    "RunConfig",
    "Section",
    "SFTConfig",
    "ToyWorldConfig",
    "TrainConfig",
    "check_sections",
    "describe",
    "doc",
    "is_file_name",
    "load_config",
    "recipe_path",
    "to_yaml",
    "validate",
    "validate_tools",
]

COMMANDS: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "eval": EvalConfig,
    "inspect": InspectConfig,
    "pipeline": PipelineConfig,
}


def recipe_path(recipe: str) -> Path:
    """A recipe name (a file in rto/recipes) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    p = RECIPES / f"{recipe}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES.glob("*.yaml")))
        raise ConfigError(f"unknown recipe {recipe!r}: known recipes are {known}, or give a path to a .yaml file")
    return p


def load_config(command: str, recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults <- recipe section `command` <- `key=value` overrides, type-checked and validated."""
    schema = COMMANDS[command]
    try:
        cfg = OmegaConf.structured(schema)
        if recipe is not None:
            path = recipe_path(recipe)
            try:
                sections = OmegaConf.load(path)
            except (OSError, ValueError, yaml.YAMLError) as e:  # yaml's errors are not ValueErrors
                raise ConfigError(f"recipe {path} is not readable YAML: {first_line(e)}") from None
            if not isinstance(sections, DictConfig):
                raise ConfigError(f"recipe {path} must map command names to their settings")
            if command not in sections:
                raise ConfigError(f"recipe {path} has no '{command}:' section (it has: {', '.join(sections)})")
            cfg = OmegaConf.merge(cfg, sections[command])
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"required settings are missing: {', '.join(missing)} (set them as key=value)")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + _key_hint(e)) from None
    validate(obj)
    return obj


def _key_hint(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    return f" (key: {key})" if key else ""


def validate(cfg: Section, world_size: int = 1) -> None:
    """Each section's checks, then the command's cross-section ones. Raises ConfigError naming the setting."""
    check_sections(cfg)
    cfg.check_across(world_size)


def validate_tools(cfg: Section) -> None:
    """The eval, inspect and pipeline configs: the same per-section checks (kept as an entry point)."""
    validate(cfg)


def describe(schema: Any, prefix: str = "") -> list[str]:
    """One line per setting: dotted key, default, description (of a command's class or of a section's defaults)."""
    defaults = schema() if isinstance(schema, type) else schema  # required settings hold MISSING ("???")
    lines = []
    for f in dataclasses.fields(defaults):
        key, value = prefix + f.name, getattr(defaults, f.name)
        if isinstance(value, Section):
            lines += describe(value, key + ".")
            continue
        shown = "(required)" if value == MISSING else repr(value)
        lines.append(f"{key} = {shown}  # {f.metadata.get('doc', '')}")
    return lines


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
