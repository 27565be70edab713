"""The building blocks of the configuration: the error type, documented fields, the per-setting checks (`Keys`),
the `Section` base class every config section inherits from, and the walk that runs each section's own check.

The sections themselves live in offline.py (shared sections, sft/rm/dpo), ppo.py and tools.py (eval, inspect,
pipeline); rto/config/__init__.py builds and validates a command's config from them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import field
from typing import Any, NoReturn

from omegaconf import MISSING

SEED_LIMIT = 2**32  # numpy's bound; torch and random accept it too
STOP_TOKENS_DOC = (
    "extra tokens that end a response, besides the tokenizer's EOS and the model's generation_config eos_token_id"
)


class ConfigError(ValueError):
    """A bad key, value or combination in the configuration."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries' messages run over several lines)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def doc(default: Any = MISSING, text: str = "", factory: Any = None) -> Any:
    """A dataclass field with a one-line description (shown by `rto <cmd> --help-config`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class Keys:
    """The settings of one section, checked by name; each error names the dotted setting (`at` + name)."""

    def __init__(self, section: Any, at: str):
        self.section, self.at = section, at

    def fail(self, name: str, must: str) -> NoReturn:
        raise ConfigError(f"{self.at}{name} must be {must}, got {getattr(self.section, name)!r}")

    def ints(self, *names: str, low: int = 1, optional: bool = False) -> None:
        for name in names:
            value = getattr(self.section, name)
            if not (value is None and optional) and value < low:
                self.fail(name, f"at least {low}" + _null(optional))

    def seeds(self, *names: str) -> None:
        for name in names:
            if not 0 <= getattr(self.section, name) < SEED_LIMIT:
                self.fail(name, "in [0, 2**32)")

    def real(self, *names: str, optional: bool = False, **bounds: float) -> None:
        """Finite numbers within `bounds` (above, at_least, below, at_most); NaN and +-inf never pass."""
        for name in names:
            value = getattr(self.section, name)
            if value is None and optional:
                continue
            if not (math.isfinite(value) and all(BOUNDS[b][1](value, x) for b, x in bounds.items())):
                limits = " and ".join(f"{BOUNDS[b][0]} {x:g}" for b, x in bounds.items())
                self.fail(name, f"a finite number {limits}".rstrip() + _null(optional))

    def choice(self, name: str, allowed: tuple[str, ...]) -> None:
        if getattr(self.section, name) not in allowed:
            self.fail(name, "one of " + ", ".join(allowed))

    def text(self, *names: str, optional: bool = False) -> None:
        for name in names:
            value = getattr(self.section, name)
            if value == "" or (value is None and not optional):
                self.fail(name, "a non-empty string" + _null(optional))

    def file_name(self, name: str, optional: bool = False) -> None:
        value = getattr(self.section, name)
        if not (value is None and optional) and not is_file_name(value):
            self.fail(name, "a file name (no / or \\, not . or ..)" + _null(optional))

    def texts(self, name: str, allowed: tuple[str, ...] | None = None) -> None:
        """A list of non-empty strings (from `allowed`, if given)."""
        bad = [v for v in getattr(self.section, name) if not v or (allowed is not None and v not in allowed)]
        if bad:
            self.fail(name, "a list of " + (", ".join(allowed) if allowed else "non-empty strings") + f" (bad: {bad})")


BOUNDS = {
    "above": (">", operator.gt),
    "at_least": (">=", operator.ge),
    "below": ("<", operator.lt),
    "at_most": ("<=", operator.le),
}


def is_file_name(name: str) -> bool:
    """A name that can be one file in a folder: the eval exports name a file after the generator."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _null(optional: bool) -> str:
    return " (or null)" if optional else ""


class Section:
    """A config section: `check` validates its own settings; a command's `check_across` the combinations."""

    def check(self, at: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no check")

    def check_across(self, world_size: int) -> None:
        """Checks that need several sections or the world size (commands only)."""


def check_sections(cfg: Section, at: str = "") -> None:
    """Every section's own check, depth first (the sections inside one before the one that holds them)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):  # a section without a check fails here, loudly
            check_sections(value, f"{at}{f.name}.")
    cfg.check(at)
