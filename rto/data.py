"""Datasets for the trainers: loading, chat templating and loss masks, length policy, batching.

Rows are read by `rto.formats` (messages, ShareGPT, HH-RLHF, plain strings; which column holds what). SFT
trains every assistant turn (`data.assistant_turns=last`: the last only), like TRL's `assistant_only_loss`;
each turn's tokens are found by rendering the conversation up to it, so the template must render each such
prefix as the start of the whole (checked per turn). A preference row is a prompt and one assistant reply each
for chosen and rejected, with the loss on the reply; a prompt-only row is rendered with the generation prompt.
A bad row is a DataError naming dataset, row and field (`data.bad_rows=skip`: skipped and counted), a bad file
names file and line, and the report logged per dataset says what was read and counts everything.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rto.config import ConfigError, PromptDataConfig
from rto.formats import (
    DataError,
    RowError,
    columns,
    data_format,
    first_difference,
    json_problems,
    last_turn_only,
    load_json,
    pair_columns,
    pair_row,
    prompt_column,
    prompt_row,
    read_turns,
    reason,
    sft_column,
    sft_turns,
    value_of,
)
from rto.models import check_model_path
from rto.tensors import pad_rows

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Example:
    """One tokenised sequence: input_ids and, per token, whether it carries the loss (a trained reply token)."""

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
    """What reading and tokenising a dataset did: what was read, rows kept, counts by reason, turns trained."""

    name: str
    rows: int = 0
    kept: int = 0
    source: str = ""  # which columns were read
    read: Counter = field(default_factory=Counter)  # formats and role mappings, in rows or turns
    counts: Counter = field(default_factory=Counter)  # rows skipped, prompts truncated or dropped, cuts
    turns: int = 0  # assistant turns carrying the loss
    loss_tokens: int = 0

    def summary(self) -> str:
        read = ", ".join(f"{k} ({v})" for k, v in sorted(self.read.items()))
        turns = f"{self.turns} assistant turns, {self.loss_tokens} loss tokens" if self.turns else ""
        counts = [f"{k}: {v}" for k, v in sorted(self.counts.items())]
        parts = [f"{self.name}: {self.kept} of {self.rows} rows kept", self.source, read and f"read {read}", turns]
        return "; ".join(p for p in parts + counts if p)


def require_rows(n: int, needed: int, name: str, setting: str) -> None:
    """For the trainers, before any model loads: enough usable rows (or items) for one batch of `setting`."""
    if n < needed:
        raise DataError(f"{name}: {n} usable rows cannot fill one batch of {setting}={needed}; add rows or lower it")


# ---- loading ----


def load_rows(path: str, split: str, what: str = "data.path", bad_rows: str = "error", subset: str | None = None):
    """A `datasets.Dataset` from a local .json/.jsonl/.parquet file, a folder (saved dataset or data files), or
    a hub id; `subset` (data.subset): the dataset's config name, `datasets.load_dataset(name=...)`, for a hub id or
    a folder of data files (one file or a saved dataset has none: refused). Errors of the library become
    DataErrors naming the file (and line)."""
    import datasets

    p = Path(path).expanduser()
    saved = p.is_dir() and any((p / f).exists() for f in SAVED_MARKERS)
    if subset is not None and (p.is_file() or saved):
        kind = "one file" if p.is_file() else "a saved dataset (save_to_disk)"
        raise ConfigError(
            f"data.subset={subset!r}: {what} {path} is {kind}, so it has no configs; leave data.subset out, or "
            "point the path at a hub dataset or a folder of data files"
        )
    if p.is_file() and p.suffix not in FILE_BUILDERS:
        raise ConfigError(f"{what}: {p} is not a .json, .jsonl or .parquet file")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{what} {p}: the file is empty")
    try:
        if p.is_file() and FILE_BUILDERS[p.suffix] == "json":
            ds = load_json(p, what, bad_rows)
        elif p.is_file():
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        elif saved:
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict) and split not in ds:
                raise DataError(f"{what} {path} has no split {split!r}; its splits: {', '.join(ds)} (set data.split)")
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            check_model_path(path, what)
            ds = datasets.load_dataset(str(p) if p.is_dir() else path, name=subset, split=split)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # pyarrow, datasets, fsspec and OS errors: one line naming the file
        for f in sorted(p.rglob("*.json*")) if p.is_dir() else []:
            problems, _ = json_problems(f)
            if problems:
                at = f" line {problems[0][0]}" if problems[0][0] else ""
                raise DataError(f"{what} {f}{at}: {problems[0][1]}; fix the file") from None
        raise _config_error(e, what, path, subset) or DataError(f"{what} {path}: cannot be loaded ({reason(e)})") from e
    if len(ds) == 0:
        raise DataError(f"{what} {path}: the dataset has no rows")
    return ds


def _config_error(e: BaseException, what: str, path: str, subset: str | None) -> DataError | None:
    """`datasets` refusing the config name (none given for a dataset with several, or an unknown one) as one line
    listing the configs, or None for any other error."""
    text = str(e)
    if not ("Config name is missing" in text or ("BuilderConfig" in text and "not found" in text)):
        return None
    found = re.search(r"(?:available configs|Available): \[([^\]]*)\]", text)
    configs = ", ".join(c.strip(" '\"") for c in found.group(1).split(",")) if found else "(not listed)"
    problem = "has several configs" if subset is None else f"has no config {subset!r}"
    return DataError(f"{what} {path} {problem}; its configs: {configs} (set data.subset)")


def load_data_rows(cfg: PromptDataConfig):
    """The configured training split (data.path, data.split, data.subset), cut to its first data.max_rows rows if
    set."""
    if Path(cfg.path).expanduser().is_file() and cfg.split != "train":
        raise ConfigError(
            f"data.split={cfg.split!r}: {cfg.path} is one file, so it has no splits; leave data.split "
            "out, or point data.path at a folder or hub dataset with splits"
        )
    rows = load_rows(cfg.path, cfg.split, bad_rows=cfg.bad_rows, subset=cfg.subset)
    if cfg.max_rows is not None:
        rows = rows.select(range(min(cfg.max_rows, len(rows))))
    return rows


# ---- tokenisation ----


def render(tokenizer, turns: list[dict], generation_prompt: bool, tokenize: bool = True):
    """The chat template's rendering of `turns`: token ids, or the text (tokenize=False)."""
    try:
        out = tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=tokenize)
    except Exception as e:  # the template's raise_exception (jinja2.TemplateError), or a bug it hits on this row
        roles = ", ".join(t["role"] for t in turns)
        raise RowError(
            f"the chat template refused the turns ({roles}): {reason(e)}; change the row or set model.chat_template"
        ) from e
    if not tokenize:
        return out
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _check_start(tokenizer, head: list[dict], head_ids: list[int], conv: list[dict], ids: list[int], hint: str):
    """The prefix check: the tokens of `head` rendered with the generation prompt (or of a shorter conversation)
    must be the first tokens of the whole conversation, or its reply tokens cannot be told apart."""
    if ids[: len(head_ids)] == head_ids:
        return
    gen = head[-1]["role"] != "assistant"
    a, b = render(tokenizer, head, gen, tokenize=False), render(tokenizer, conv, False, tokenize=False)
    if b.startswith(a):
        k = next((j for j, (x, y) in enumerate(zip(head_ids, ids)) if x != y), len(ids))
        detail = f"the text is its start, but the tokens differ from token {k}"
    else:
        detail = first_difference(a, b)
    raise RowError(
        f"the chat template does not render turns 0-{len(head) - 1} as the start of the conversation "
        f"({detail}), so the trained tokens cannot be told apart; {hint}"
    )


def trained_spans(tokenizer, conv: list[dict], trained: list[int], hint: str) -> tuple[list[int], list[bool]]:
    """Token ids of `conv` (which ends with an assistant turn) and the loss mask: true on the tokens of each
    assistant turn in `trained` (its text and end-of-turn marker, not the header the generation prompt holds),
    found by rendering the conversation up to that turn."""
    ids = render(tokenizer, conv, generation_prompt=False)
    mask = [False] * len(ids)
    for k in trained:
        start = render(tokenizer, conv[:k], generation_prompt=True)
        _check_start(tokenizer, conv[:k], start, conv, ids, hint)
        end = ids if k == len(conv) - 1 else render(tokenizer, conv[: k + 1], generation_prompt=False)
        _check_start(tokenizer, conv[: k + 1], end, conv, ids, hint)
        if len(end) <= len(start):
            raise RowError(f"assistant turn {k} renders to no tokens")
        mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    return ids, mask


def fit_prompt(prompt_ids: list[int], cfg: PromptDataConfig, report: Report) -> list[int] | None:
    """Apply data.overlong to a prompt: unchanged, truncated (keeping its end: the last turn and the generation
    prompt), None when dropped, or a RowError."""
    if len(prompt_ids) <= cfg.max_prompt_length:
        return prompt_ids
    if cfg.overlong == "error":
        raise RowError(
            f"prompt has {len(prompt_ids)} tokens, over data.max_prompt_length={cfg.max_prompt_length} "
            "(set data.overlong=truncate or drop)"
        )
    done = {"drop": "dropped", "truncate": "truncated"}[cfg.overlong]
    report.counts[f"prompts {done} (over {cfg.max_prompt_length} tokens)"] += 1
    return None if cfg.overlong == "drop" else prompt_ids[-cfg.max_prompt_length :]


def fit(ids: list[int], mask: list[bool], cfg: PromptDataConfig, report: Report) -> Example | None:
    """The length policy on a tokenised conversation: data.overlong on what precedes the first trained token,
    then the whole cut at data.max_length (counted). None when the row is dropped."""
    n_prompt = mask.index(True)
    head = fit_prompt(ids[:n_prompt], cfg, report)
    if head is None:
        return None
    ids, mask = head + ids[n_prompt:], mask[n_prompt - len(head) :]
    if len(ids) > cfg.max_length:
        report.counts[f"responses cut at data.max_length={cfg.max_length}"] += 1
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
    report.loss_tokens += sum(mask)
    return Example(ids, mask)


def encode(tokenizer, prompt: list[dict], reply: list[dict], cfg: PromptDataConfig, report: Report) -> Example | None:
    """A prompt and its one assistant reply, with the loss on the reply; None when the row is dropped."""
    conv = prompt + reply
    ids, mask = trained_spans(tokenizer, conv, [len(prompt)], "fix model.chat_template")
    example = fit(ids, mask, cfg, report)
    report.turns += example is not None
    return example


def _tokenize(rows, name: str, cfg: PromptDataConfig, one_row, report: Report, progress: bool):
    from tqdm.auto import tqdm

    report.rows = len(rows)
    out = []
    for i, row in enumerate(tqdm(rows, desc=f"tokenising {name}", disable=not progress, leave=False)):
        try:
            item = one_row(row, report)
        except RowError as e:
            if cfg.bad_rows == "error":
                raise DataError(f"{name} row {i}: {e}") from e.__cause__
            report.counts[f"skipped: {e}"] += 1
            continue
        if item is not None:
            out.append(item)
    report.kept = len(out)
    log.info(report.summary())
    if not out:
        raise DataError(f"{report.summary()}: no usable rows")
    return out, report


def _columns(rows, name: str, choose, *args):
    try:
        return choose(columns(rows), *args)
    except DataError as e:
        raise DataError(f"{name}: {e}") from None


def tokenize_sft(rows, tokenizer, cfg: PromptDataConfig, name: str, progress: bool = False):
    """Conversations, with the loss on every assistant turn (or the last, data.assistant_turns=last)."""
    fmt, last_only = data_format(cfg), last_turn_only(cfg)
    key, source = _columns(rows, name, sft_column, cfg.messages_key)
    hint = "fix model.chat_template" if last_only else "set data.assistant_turns=last or fix model.chat_template"

    def one_row(row, report):
        turns = read_turns(value_of(row, key), key, fmt, report.read, None)
        conv, trained = sft_turns(turns, key, report.counts, last_only)
        example = fit(*trained_spans(tokenizer, conv, trained, hint), cfg, report)
        report.turns += len(trained) if example is not None else 0
        return example

    return _tokenize(rows, name, cfg, one_row, Report(name, source=source), progress)


def tokenize_pairs(rows, tokenizer, cfg: PromptDataConfig, name: str, progress: bool = False):
    """Preference pairs: a prompt and one assistant reply each for chosen and rejected (see rto.formats)."""
    fmt, keys = data_format(cfg), (cfg.chosen_key, cfg.rejected_key)
    prompt_key, source = _columns(rows, name, pair_columns, cfg.prompt_key, keys)

    def one_row(row, report):
        prompt, chosen, rejected = pair_row(row, prompt_key, keys, fmt, report.read)
        pair = [encode(tokenizer, prompt, reply, cfg, report) for reply in (chosen, rejected)]
        return None if None in pair else Pair(*pair)

    return _tokenize(rows, name, cfg, one_row, Report(name, source=source), progress)


def tokenize_prompts(rows, tokenizer, cfg: PromptDataConfig, name: str, progress: bool = False):
    """Prompt-only rows (RL, eval), from the column `rto.formats.prompt_column` chooses, each ending with the user
    turn to answer, rendered with the generation prompt. Items are lists of token ids."""
    fmt, keys = data_format(cfg), (cfg.chosen_key, cfg.rejected_key)
    kind, column, source = _columns(rows, name, prompt_column, cfg.prompt_key, cfg.messages_key, keys)

    def one_row(row, report):
        prompt = prompt_row(row, kind, column, keys, fmt, report.read)
        return fit_prompt(render(tokenizer, prompt, generation_prompt=True), cfg, report)

    return _tokenize(rows, name, cfg, one_row, Report(name, source=source), progress)


def prompt_turns(rows, cfg: PromptDataConfig, name: str) -> list[list[dict]]:
    """Every row's prompt turns as `tokenize_prompts` reads them (same column, format and checks; no skipping)."""
    fmt, keys = data_format(cfg), (cfg.chosen_key, cfg.rejected_key)
    kind, column, _ = _columns(rows, name, prompt_column, cfg.prompt_key, cfg.messages_key, keys)
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(prompt_row(row, kind, column, keys, fmt, Counter()))
        except RowError as e:
            raise DataError(f"{name} row {i}: {e}") from None
    return out


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
    ids, valid = pad_rows([e.input_ids for e in examples], pad_id, device=device)  # [B, T]
    loss, _ = pad_rows([e.loss_mask for e in examples], False, dtype=torch.bool, device=device)  # [B, T]
    rows = torch.arange(len(examples), device=ids.device).unsqueeze(1)  # [B, 1]
    seq_id = torch.where(valid, rows, -1)  # [B, T], -1 at padding
    return dict(input_ids=ids, attention_mask=valid.long(), loss_mask=loss, seq_id=seq_id)


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
