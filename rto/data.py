"""Datasets for the trainers: loading, row validation, chat templating, length policy, batching, collation.

Schemas (column names configurable in `data.*`):
- SFT: `messages`, a list of {role, content}; the last assistant turn is the response (earlier turns are
  context, not trained on).
- Preference pairs (UltraFeedback-binarized style): `prompt` (a string or a list of messages), `chosen` and
  `rejected` (lists of messages, which may repeat the prompt turns first, as UltraFeedback does).
- Prompt-only (RL): `messages`, or `prompt`.
Loss masks cover response tokens only. A malformed row raises a DataError naming the dataset, the row index
and the field, or with `data.bad_rows=skip` is skipped and counted; over-long prompts follow
`data.overlong`; every count is reported.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rto.config import ConfigError, DataConfig
from rto.models import check_model_path

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A row of a dataset that cannot be used as it is."""


@dataclass
class Example:
    """One tokenised sequence: input_ids and, per token, whether it is a response token."""

    input_ids: list[int]
    loss_mask: list[bool]

    @property
    def n_response(self) -> int:
        return sum(self.loss_mask)


@dataclass
class Pair:
    chosen: Example
    rejected: Example


@dataclass
class Report:
    """What tokenising a dataset did: rows kept, skipped (by reason), truncated, dropped."""

    name: str
    rows: int = 0
    kept: int = 0
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        extra = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"{self.name}: {self.kept} of {self.rows} rows kept" + (f" ({extra})" if extra else "")


# ---- loading ----


def load_rows(path: str, split: str, what: str = "data.path"):
    """A `datasets.Dataset` from a local .json/.jsonl/.parquet file, a folder (saved dataset or data files), or
    a hub id."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_file():
            builder = FILE_BUILDERS.get(p.suffix)
            if builder is None:
                raise ConfigError(f"{what}: {p} is not a .json, .jsonl or .parquet file")
            return datasets.load_dataset(builder, data_files=str(p), split="train")
        if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        check_model_path(path, what)
        return datasets.load_dataset(str(p) if p.is_dir() else path, split=split)
    except ValueError as e:  # e.g. an unknown split
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{what}: cannot load split {split!r} of {path}: {e}") from None


def load_data_rows(cfg: DataConfig):
    """The configured training split (data.path, data.split), cut to its first data.max_rows rows if set."""
    rows = load_rows(cfg.path, cfg.split)
    if cfg.max_rows is not None:
        rows = rows.select(range(min(cfg.max_rows, len(rows))))
    return rows


# ---- row validation ----


def _messages(value, name: str, row: int, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{name} row {row}: field '{key}' must be a non-empty list of messages, got "
                        f"{type(value).__name__}")  # fmt: skip
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{name} row {row}: field '{key}' message {j} must be {{role: str, content: str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _field(row: Mapping, key: str, name: str, i: int):
    if key not in row or row[key] is None:
        raise DataError(f"{name} row {i}: missing field '{key}'")
    return row[key]


def prompt_messages(row: Mapping, key: str, name: str, i: int) -> list[dict]:
    value = _field(row, key, name, i)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{name} row {i}: field '{key}' is an empty prompt")
        return [{"role": "user", "content": value}]
    return _messages(value, name, i, key)


def response_messages(row: Mapping, key: str, prompt: list[dict], name: str, i: int) -> list[dict]:
    """The response turns of `row[key]`, after the prompt turns when the conversation repeats them."""
    conv = _messages(_field(row, key, name, i), name, i, key)
    if conv[: len(prompt)] == prompt:
        conv = conv[len(prompt) :]
    if not conv or conv[-1]["role"] != "assistant":
        raise DataError(f"{name} row {i}: field '{key}' has no assistant response after the prompt")
    if not conv[-1]["content"].strip():
        raise DataError(f"{name} row {i}: field '{key}' has an empty response")
    return conv


# ---- tokenisation ----


def template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def fit_prompt(prompt_ids: list[int], cfg: DataConfig, report: Report, i: int) -> list[int] | None:
    """Apply data.overlong to a prompt: unchanged, truncated (keeping its end: the last turn and the generation
    prompt), None when dropped, or a DataError."""
    if len(prompt_ids) <= cfg.max_prompt_length:
        return prompt_ids
    if cfg.overlong == "error":
        raise DataError(f"{report.name} row {i}: prompt has {len(prompt_ids)} tokens, over data.max_prompt_length"
                        f"={cfg.max_prompt_length} (set data.overlong=truncate or drop)")  # fmt: skip
    done = {"drop": "dropped", "truncate": "truncated"}[cfg.overlong]
    report.counts[f"prompts {done} (over {cfg.max_prompt_length} tokens)"] += 1
    return None if cfg.overlong == "drop" else prompt_ids[-cfg.max_prompt_length :]


def encode(tokenizer, prompt: list[dict], response: list[dict], cfg: DataConfig, report: Report, i: int):
    """Prompt + response as token ids with the loss on the response; None when the row is dropped."""
    prompt_ids = template_ids(tokenizer, prompt, generation_prompt=True)
    full = template_ids(tokenizer, prompt + response, generation_prompt=False)
    if full[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"{report.name} row {i}: the chat template does not render the prompt as a prefix of the "
                        "conversation, so response tokens cannot be told apart")  # fmt: skip
    resp = full[len(prompt_ids) :]
    if not resp:
        raise DataError(f"{report.name} row {i}: the response renders to no tokens")
    prompt_ids = fit_prompt(prompt_ids, cfg, report, i)
    if prompt_ids is None:
        return None
    room = cfg.max_length - len(prompt_ids)
    if len(resp) > room:
        report.counts[f"responses cut at data.max_length={cfg.max_length}"] += 1
        resp = resp[:room]
    return Example(prompt_ids + resp, [False] * len(prompt_ids) + [True] * len(resp))


def _tokenize(rows, name: str, cfg: DataConfig, one_row, progress: bool):
    from tqdm.auto import tqdm

    report = Report(name=name, rows=len(rows))
    out = []
    for i, row in enumerate(tqdm(rows, desc=f"tokenising {name}", disable=not progress, leave=False)):
        try:
            item = one_row(row, i, report)
        except DataError as e:
            if cfg.bad_rows == "error":
                raise
            report.counts[f"skipped: {str(e).split(': ', 1)[1]}"] += 1
            continue
        if item is not None:
            out.append(item)
    report.kept = len(out)
    log.info(report.summary())
    return out, report


def tokenize_sft(rows, tokenizer, cfg: DataConfig, name: str, progress: bool = False):
    def one_row(row, i, report):
        conv = _messages(_field(row, cfg.messages_key, name, i), name, i, cfg.messages_key)
        last = max((j for j, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(f"{name} row {i}: field '{cfg.messages_key}' needs a prompt turn and an assistant turn")
        if not conv[last]["content"].strip():
            raise DataError(f"{name} row {i}: field '{cfg.messages_key}' has an empty response")
        return encode(tokenizer, conv[:last], conv[last : last + 1], cfg, report, i)

    return _tokenize(rows, name, cfg, one_row, progress)


def tokenize_pairs(rows, tokenizer, cfg: DataConfig, name: str, progress: bool = False):
    def one_row(row, i, report):
        prompt = prompt_messages(row, cfg.prompt_key, name, i)
        chosen = encode(tokenizer, prompt, response_messages(row, cfg.chosen_key, prompt, name, i), cfg, report, i)
        rejected = encode(tokenizer, prompt, response_messages(row, cfg.rejected_key, prompt, name, i), cfg, report,
                          i)  # fmt: skip
        return None if chosen is None or rejected is None else Pair(chosen, rejected)

    return _tokenize(rows, name, cfg, one_row, progress)


def tokenize_prompts(rows, tokenizer, cfg: DataConfig, name: str, progress: bool = False):
    """Prompt-only rows (RL): the `messages` column (ending with a user turn) or the `prompt` column, rendered
    with the generation prompt. Items are lists of token ids."""

    def one_row(row, i, report):
        if cfg.messages_key in row and row[cfg.messages_key] is not None:
            prompt = _messages(row[cfg.messages_key], name, i, cfg.messages_key)
            if prompt[-1]["role"] == "assistant":
                raise DataError(f"{name} row {i}: field '{cfg.messages_key}' ends with an assistant turn; a prompt "
                                "ends with the turn to answer")  # fmt: skip
        else:
            prompt = prompt_messages(row, cfg.prompt_key, name, i)
        return fit_prompt(template_ids(tokenizer, prompt, generation_prompt=True), cfg, report, i)

    return _tokenize(rows, name, cfg, one_row, progress)


# ---- batching ----


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation cut into full batches (the remainder is left out
    of this epoch; `leftover` says how many)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [perm[i : i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]


def leftover(n: int, global_batch: int) -> int:
    return n % global_batch


def rank_micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's share of a global batch, cut into micro-batches."""
    per_rank = len(batch) // world
    mine = batch[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, T] long; loss_mask [B, T] bool; seq_id [B, T] (the row,
    -1 at padding)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    loss = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        attn[b, :n] = 1
        loss[b, :n] = torch.tensor(e.loss_mask)
    seq_id = torch.where(attn.bool(), torch.arange(B).unsqueeze(1), -1)  # -1 at padding
    out = dict(input_ids=ids, attention_mask=attn, loss_mask=loss, seq_id=seq_id)
    return {k: v.to(device) for k, v in out.items()}


def collate_packed(examples: list[Example], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Padding-free batch [1, total]: sequences end to end, position_ids restarting at each, cu_seqlens [S+1],
    seq_id [1, total] (which sequence a token belongs to). For flash-attention's varlen path."""
    lengths = [len(e.input_ids) for e in examples]
    ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)
    loss = torch.tensor([m for e in examples for m in e.loss_mask]).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    seq_id = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)]).unsqueeze(0)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = dict(input_ids=ids, position_ids=pos, loss_mask=loss, seq_id=seq_id, cu_seqlens=cu)
    return {k: v.to(device) for k, v in out.items()}


def make_batch(examples: list[Example], packing: bool, pad_id: int, device) -> dict[str, torch.Tensor]:
    """A packed batch (data.packing) or a padded one; both carry input_ids, loss_mask and seq_id."""
    return collate_packed(examples, device) if packing else collate(examples, pad_id, device)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """What a model's forward takes from either kind of batch."""
    return {k: batch.get(k) for k in ("input_ids", "attention_mask", "position_ids")}


def per_sequence_sum(values: torch.Tensor, loss_mask: torch.Tensor, seq_id: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Sum of values [B, T] over each sequence's response tokens -> [n_seq]; works for padded and packed batches."""
    sel = loss_mask.bool()
    return values.new_zeros(n_seq).index_add(0, seq_id[sel], values[sel])


def last_token_index(seq_id: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Flat index (into the [B*T] view) of each sequence's last token (seq_id is -1 at padding), for padded and
    packed batches alike."""
    flat = seq_id.reshape(-1)
    pos = torch.arange(flat.numel(), device=flat.device)
    valid = flat >= 0
    return torch.full((n_seq,), -1, device=flat.device, dtype=torch.long).scatter_reduce(
        0, flat[valid], pos[valid], reduce="amax"
    )
