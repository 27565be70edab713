"""Checks on a model path before and while loading: one clear line for each wrong kind of path.

A local path must be a Hugging Face model folder (config.json and weights), not a file, an empty folder or a run
folder (whose model is in `hf/`); a hub id is resolved by `from_pretrained`, whose errors (offline, truncated
safetensors, a bad config) become one line naming the setting and the path. `check_vocabulary` refuses a model
with fewer embedding rows than its tokenizer has tokens before a forward could index past them. `hub_kwargs` gives
every `from_pretrained` of a model its `model.revision` and `model.trust_remote_code`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoTokenizer

from rto.config import ConfigError, ModelConfig
from rto.config.base import first_line


def hub_kwargs(cfg: ModelConfig | None, path: str, what: str = "model.path") -> dict:
    """The keywords of every `from_pretrained` of `path` (tokenizer, config, weights) under the model settings
    `cfg`: `trust_remote_code` for any path, `revision` for `cfg.path` itself (the other models a command loads,
    PPO's ref, dpo, reward and critic or a separate tokenizer, take their default branch). A revision with a local
    folder is refused: from_pretrained would ignore it. No settings (`cfg` None): the defaults."""
    if cfg is None:
        return {"revision": None, "trust_remote_code": False}
    revision = cfg.revision if path == cfg.path else None
    if revision is not None and Path(path).expanduser().exists():
        setting = what.removesuffix("path") + "revision" if what.endswith(".path") else "revision"
        raise ConfigError(
            f"{what}: {path} is a local folder, but {setting}={revision!r} names a branch, tag or commit of a hub "
            "model (from_pretrained would ignore it): unset it, or give the hub id"
        )
    return {"revision": revision, "trust_remote_code": cfg.trust_remote_code}


def check_model_path(path: str, what: str = "model.path") -> None:
    """A local file or folder must exist; anything else must look like a hub id ("org/name" or "name")."""
    p = Path(path).expanduser()
    if p.exists():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ConfigError(f"{what}: no such file or folder: {path}")


def check_model_folder(path: str, what: str = "model.path", *, weights: bool = True) -> None:
    """A local path must be a Hugging Face model folder (config.json, and weight files when `weights`), not a
    file, an empty folder or a run folder; a hub id is left to from_pretrained (errors wrapped in `reading_model`).
    Each wrong kind of path gets its own one-line error."""
    check_model_path(path, what)
    p = Path(path).expanduser()
    if not p.exists():
        return
    if not p.is_dir():
        raise ConfigError(f"{what}: {path} is a file; give the folder of a Hugging Face model (config.json, weights)")
    if not (p / "config.json").is_file():
        if (p / "hf" / "config.json").is_file() or (p / "hf" / "actor" / "config.json").is_file():
            inner = p / "hf" if (p / "hf" / "config.json").is_file() else p / "hf" / "actor"
            raise ConfigError(f"{what}: {path} is a run folder; its model is {inner}")
        raise ConfigError(f"{what}: {path} holds no config.json: not a Hugging Face model folder")
    found = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")]
    if weights and not found:
        raise ConfigError(f"{what}: {path} holds no weights (model.safetensors or pytorch_model.bin)")


@contextmanager
def reading_model(path: str, what: str):
    """Library errors while reading a model (a truncated safetensors file, a hub id offline, a bad config)
    re-raised as one line naming the setting and the path."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if isinstance(e, ConfigError):
            raise
        unsupported = re.match(r"(\w+) does not support an attention implementation through (\S+?) yet", str(e))
        if unsupported:  # transformers' advice names its own keyword; ours is a setting
            cls, backend = unsupported.groups()
            backend = "sdpa" if "scaled_dot_product" in backend else backend
            hint = "set attn_implementation=eager (model.attn_implementation; actor.attn_implementation for ppo)"
            raise ConfigError(f"{what}: {path}: {cls} cannot run attention through {backend}; {hint}") from e
        where = _unreadable_weights(path) if isinstance(e, SafetensorError) else None
        where = f"{where} is unreadable" if where else f"cannot load the model at {path}"
        raise ConfigError(f"{what}: {where}: {first_line(e)}") from e


def _unreadable_weights(path: str) -> Path | None:
    """The first safetensors file in a local model folder whose header does not read (truncated, not safetensors)."""
    folder = Path(path).expanduser()
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError):
            return file
    return None


def check_vocabulary(model: nn.Module, tokenizer, what: str) -> None:
    """The model must have an embedding row for every token id the tokenizer can produce."""
    rows, n = model.get_input_embeddings().num_embeddings, len(tokenizer)
    if rows < n:
        raise ConfigError(
            f"{what}: the model has {rows} embedding rows but its tokenizer has {n} tokens; resize the embeddings "
            "(model.resize_token_embeddings) or use the model's own tokenizer"
        )


def check_same_tokenizers(
    tok, paths: dict[str, str | None], whose: str = "the actor's", cfg: ModelConfig | None = None
) -> None:
    """`check_same_tokenizer` for each {setting: path} given (None: a model the command does not use)."""
    for what, path in paths.items():
        if path is not None:
            check_same_tokenizer(tok, path, what, whose, cfg)


def check_same_tokenizer(
    actor_tok, path: str, what: str, whose: str = "the actor's", cfg: ModelConfig | None = None
) -> None:
    """A model that scores another model's token ids (DPO model, reward model, critic, reference) must share its
    vocabulary and EOS; `cfg`: the model settings its tokenizer loads under (`hub_kwargs`)."""
    check_model_path(path, what)
    kwargs = hub_kwargs(cfg, path, what)
    with reading_model(path, what):
        other = AutoTokenizer.from_pretrained(path, **kwargs)
    a, b = actor_tok.get_vocab(), other.get_vocab()
    if a != b or actor_tok.eos_token_id != other.eos_token_id:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ConfigError(
            f"the tokenizer of {what} ({path}) differs from {whose} ({len(b)} vs {len(a)} tokens, EOS "
            f"{other.eos_token_id} vs {actor_tok.eos_token_id}; e.g. {diff}): {what} must share {whose} "
            "tokenizer, because it scores those token ids directly"
        )
