"""The shapes datasets come in, read into one form: a list of turns {role, content}, roles system/user/assistant.

A conversation field holds (recognised per value, or fixed with `data.format`): `messages`, a list of {role,
content}; `sharegpt`, a list of {from, value}; `hh`, an HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ...";
or `plain`, a string that is one turn (a prompt's user turn, or the reply of chosen/rejected). Roles are read
case-insensitively, human/gpt as user/assistant (each mapping counted); any other role is refused by name. A
string that looks like a transcript but is not HH-RLHF's is refused in `auto` (`data.format=plain` reads it).

The columns, chosen per dataset and logged: SFT reads `data.messages_key`, else a ShareGPT `conversations`.
Preference rows take the prompt from `data.prompt_key` when that column exists, else the turns chosen and
rejected share (TRL's implicit prompt; HH-RLHF); after it each holds one assistant reply. Prompts (RL, eval)
come from `data.prompt_key`, else `data.messages_key` less a final assistant turn, else the shared turns of
chosen and rejected; a key set to `none` leaves its column out. Problems raise RowError naming field and turn.
Files: a JSON-lines file that datasets cannot read is scanned for its first bad line (see `load_json`).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from rto.config import ConfigError

FORMATS = ("auto", "messages", "sharegpt", "hh", "plain")
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
SHAREGPT_COLUMN = "conversations"
HH_EXAMPLE = "'\\n\\nHuman: ...\\n\\nAssistant: ...'"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_SPEAKER_LINE = re.compile(r"(?:^|\n)[ \t#]*(?:Human|Assistant|HUMAN|ASSISTANT)[ \t]*:")

Turn = dict[str, str]

log = logging.getLogger(__name__)


def _a(role: str) -> str:
    return f"{'an' if role == 'assistant' else 'a'} {role} turn"


class DataError(ValueError):
    """A dataset, or a row of one, that cannot be used as it is."""


class RowError(DataError):
    """A problem in one row: the message names the field (and turn); the caller adds the dataset and row."""


def data_format(cfg) -> str:
    # getattr until DataConfig has the field (a default of "auto" reads every format this module knows)
    fmt = getattr(cfg, "format", "auto")
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}: must be one of {', '.join(FORMATS)}")
    return fmt


def last_turn_only(cfg) -> bool:
    turns = getattr(cfg, "assistant_turns", "all")  # getattr until DataConfig has the field
    if turns not in ("all", "last"):
        raise ConfigError(f"data.assistant_turns={turns!r}: must be all or last")
    return turns == "last"


# ---- files ----


def reason(e: BaseException) -> str:
    """The innermost message of a library exception's chain, on one line."""
    while (e.__cause__ or e.__context__) is not None and str(e.__cause__ or e.__context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _row_problem(line: bytes) -> str | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"is not UTF-8 (byte {line[e.start]:#x} at column {e.start + 1})"
    except json.JSONDecodeError as e:
        return f"is not valid JSON ({e.msg}, column {e.colno})"
    return None if isinstance(value, dict) else f"is a JSON {type(value).__name__}, not an object (a row)"


def json_problems(path: Path) -> tuple[list[tuple[int, str]], int]:
    """The lines of a JSON-lines file that are not UTF-8, not JSON or not an object, and the number of good ones.
    A file holding one JSON document (an array) is checked as a whole: its problem (line 0) cannot be skipped."""
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":
        try:
            return [], len(json.loads(raw))
        except ValueError as e:  # UnicodeDecodeError, json.JSONDecodeError (which names the line)
            return [(0, f"is not a UTF-8 JSON document ({e})")], 0
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    problems = [(n, why) for n, line in lines if (why := _row_problem(line)) is not None]
    return problems, len(lines) - len(problems)


def load_json(path: Path, what: str, bad_rows: str):
    """A .json/.jsonl file through datasets; when that fails, the first bad line named, or (data.bad_rows=skip)
    the bad lines left out, counted and logged."""
    import datasets

    try:
        path.read_bytes().decode("utf-8")  # pyarrow would keep bad bytes, for a row's read to fail on them later
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # DatasetGenerationError, UnicodeDecodeError, StopIteration (empty), ValueError, ...
        problems, good = json_problems(path)
        if not problems:
            if good == 0:
                raise DataError(f"{what} {path}: the file holds no rows") from None
            raise DataError(f"{what} {path}: cannot be read as a dataset: {reason(e)}") from e
        line, why = problems[0]
        if line == 0:
            raise DataError(f"{what} {path}: {why}; fix the file") from None
        if bad_rows == "error" or good == 0:
            more = f" ({len(problems)} bad lines in all)" if len(problems) > 1 else ""
            fix = "fix the line, or set data.bad_rows=skip to leave such lines out" if good else "fix the file"
            raise DataError(f"{what} {path} line {line}: {why}{more}; {fix}") from None
    bad = {n for n, _ in problems}
    lines = path.read_bytes().split(b"\n")
    listed = "; ".join(f"line {n} {why}" for n, why in problems[:5])
    log.warning("%s %s: %d bad lines left out (data.bad_rows=skip): %s", what, path, len(problems), listed)
    with tempfile.TemporaryDirectory() as tmp:  # datasets copies the rows into its cache, so the copy can go
        clean = Path(tmp) / path.name
        clean.write_bytes(b"\n".join(x for n, x in enumerate(lines, 1) if n not in bad))
        return datasets.load_dataset("json", data_files=str(clean), split="train")


# ---- one field ----


def read_turns(value, key: str, fmt: str, notes: Counter, string_role: str | None) -> list[Turn]:
    """A field as turns. `string_role` is the role a plain string takes (user for a prompt, assistant for a
    reply), or None where a string must be an HH-RLHF transcript (an SFT conversation)."""
    if isinstance(value, str):
        return _string_turns(value, key, fmt, notes, string_role)
    if not isinstance(value, Sequence) or not value:
        raise RowError(f"field '{key}' must be a non-empty list of messages or a string, got {_kind(value)}")
    if fmt in ("hh", "plain"):
        raise RowError(f"field '{key}' is a list of turns, but data.format={fmt} reads strings (set data.format=auto)")
    return [_turn(m, key, j, fmt, notes) for j, m in enumerate(value)]


def _kind(value) -> str:
    return "an empty list" if isinstance(value, Sequence) and not value else type(value).__name__


def _turn(message, key: str, j: int, fmt: str, notes: Counter) -> Turn:
    where = f"field '{key}' turn {j}"
    if not isinstance(message, Mapping):
        raise RowError(f"{where} must be a {{role, content}} message, got {_kind(message)}")
    sharegpt = message.get("role") is None and message.get("from") is not None
    if fmt == "messages" and sharegpt or fmt == "sharegpt" and not sharegpt:
        raise RowError(f"{where} is not a data.format={fmt} turn (set data.format=auto)")
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    role, text = message.get(role_key), message.get(text_key)
    if not isinstance(role, str) or not isinstance(text, str):
        raise RowError(f"{where} must be {{{role_key}: str, {text_key}: str}}")
    if j == 0:
        notes[f"'{key}' as {'ShareGPT turns' if sharegpt else 'messages'}"] += 1
    return {"role": read_role(role, where, notes), "content": text}


def read_role(raw: str, where: str, notes: Counter) -> str:
    """system/user/assistant, read case-insensitively, with human/gpt mapped (counted in `notes`)."""
    role = ROLE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if role not in ROLES:
        raise RowError(
            f"{where} has role {raw!r}: the roles are system, user and assistant (human/gpt and capitalised "
            "names are read as these); rename it in the data"
        )
    if role != raw:
        notes[f"role {raw!r} read as {role!r}"] += 1
    return role


def _string_turns(text: str, key: str, fmt: str, notes: Counter, string_role: str | None) -> list[Turn]:
    if fmt in ("messages", "sharegpt"):
        raise RowError(f"field '{key}' is a string, but data.format={fmt} reads lists of turns (set data.format=auto)")
    if fmt == "hh" or fmt == "auto" and is_transcript(text):
        notes[f"'{key}' as HH-RLHF transcripts"] += 1
        return parse_transcript(text, key)
    if string_role is None:
        raise RowError(
            f"field '{key}' is a string; a conversation is a list of {{role, content}} messages, of ShareGPT "
            f"{{from, value}} turns, or an HH-RLHF transcript {HH_EXAMPLE}"
        )
    if fmt == "auto" and _SPEAKER_LINE.search(text):
        raise RowError(
            f"field '{key}' looks like a transcript but is not an HH-RLHF one {HH_EXAMPLE}; set data.format=plain "
            f"to read it as one {string_role} turn"
        )
    if not text.strip():
        raise RowError(f"field '{key}' is empty")
    notes[f"'{key}' as plain text"] += 1
    return [{"role": string_role, "content": text}]


def is_transcript(text: str) -> bool:
    """An HH-RLHF transcript: it starts with a Human turn and holds an Assistant turn."""
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def parse_transcript(text: str, key: str) -> list[Turn]:
    """'\\n\\nHuman: q\\n\\nAssistant: a ...' -> turns. A final empty 'Assistant:' (a prompt ready for its reply)
    is left out."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())  # ['', speaker, text, speaker, text, ...]
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"field '{key}' is not an HH-RLHF transcript {HH_EXAMPLE}")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[who], "content": body.strip()} for who, body in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns


# ---- whole conversations ----


def first_difference(a: str, b: str) -> str:
    """Where two texts first differ, with a few characters of each around that point."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 10)
    return f"first difference at character {i}: {a[lo : i + 10]!r} vs {b[lo : i + 10]!r}"


def sft_turns(conv: list[Turn], key: str, counts: Counter, last_only: bool) -> tuple[list[Turn], list[int]]:
    """An SFT conversation cut after its last assistant turn, and the turns to train: every assistant turn, or
    the last one. Turns after the last reply carry no loss: they are left out and counted."""
    if conv[0]["role"] == "assistant":
        raise RowError(f"field '{key}' starts with an assistant turn; a conversation starts with a system or user turn")
    replies = [j for j, t in enumerate(conv) if t["role"] == "assistant"]
    if not replies:
        raise RowError(f"field '{key}' has no assistant turn to train on")
    trained = replies[-1:] if last_only else replies
    empty = [j for j in trained if not conv[j]["content"].strip()]
    if empty:
        raise RowError(f"field '{key}' turn {empty[0]} is an empty assistant turn")
    if replies[-1] < len(conv) - 1:
        counts["conversations ending after their last assistant turn (the later turns left out)"] += 1
    return conv[: replies[-1] + 1], trained


def check_prompt(prompt: list[Turn], what: str) -> list[Turn]:
    """A prompt ends with the user turn to answer."""
    if prompt[-1]["role"] != "user":
        raise RowError(f"{what} ends with {_a(prompt[-1]['role'])}; a prompt ends with the user turn to answer")
    return prompt


def one_reply(rest: list[Turn], key: str, offset: int) -> list[Turn]:
    """The turns after the prompt (starting at turn `offset` of the field) must be one assistant reply."""
    if not rest:
        raise RowError(f"field '{key}' has no assistant reply after the prompt")
    if rest[0]["role"] != "assistant":
        raise RowError(f"field '{key}' turn {offset} is {_a(rest[0]['role'])} where the assistant's reply belongs")
    if len(rest) > 1:
        raise RowError(
            f"field '{key}' goes on past the reply (turn {offset + 1} is {_a(rest[1]['role'])}); a preference "
            "response is one assistant reply: move the earlier turns into the prompt, or end the row at the reply"
        )
    if not rest[0]["content"].strip():
        raise RowError(f"field '{key}' has an empty reply")
    return rest


def reply_after(conv: list[Turn], prompt: list[Turn], key: str) -> list[Turn]:
    """The reply in `conv`: what follows the prompt when `conv` repeats it, else `conv` itself (the reply alone)."""
    n = len(prompt)
    if conv[:n] == prompt:
        return one_reply(conv[n:], key, n)
    if all(t["role"] == "assistant" for t in conv):
        return one_reply(conv, key, 0)
    j = next((k for k, (a, b) in enumerate(zip(conv, prompt)) if a != b), min(len(conv), n))
    roles = [_a(x[j]["role"]) if j < len(x) else "no turn" for x in (conv, prompt)]
    detail = f"turn {j} is {roles[0]} where the prompt has {roles[1]}"
    if roles[0] == roles[1]:
        detail = f"turn {j} differs from the prompt's, {first_difference(conv[j]['content'], prompt[j]['content'])}"
    raise RowError(
        f"field '{key}' does not repeat the prompt: {detail}; repeat the prompt turns exactly or give the reply alone"
    )


def shared_prompt(chosen: list[Turn], rejected: list[Turn], keys: tuple[str, str]) -> tuple[list[Turn], ...]:
    """The implicit prompt (the turns both conversations share) and each one's reply after it."""
    n = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if n == len(chosen) == len(rejected):
        raise RowError(f"fields '{keys[0]}' and '{keys[1]}' are identical: the pair carries no preference")
    if n == 0:
        raise RowError(
            f"fields '{keys[0]}' and '{keys[1]}' share no prompt turns; with no prompt column they must repeat the "
            "prompt before their replies (or set data.prompt_key)"
        )
    prompt = check_prompt(chosen[:n], f"the turns '{keys[0]}' and '{keys[1]}' share")
    return prompt, one_reply(chosen[n:], keys[0], n), one_reply(rejected[n:], keys[1], n)


# ---- columns ----


def columns(rows) -> list[str]:
    """The column names of a `datasets.Dataset`, or the keys of a list of dict rows."""
    names = getattr(rows, "column_names", None)
    return list(names) if names is not None else list(dict.fromkeys(k for r in rows for k in r))


def present(key: str | None, cols: list[str]) -> str | None:
    """`key` when it names one of `cols` (a key set to none names nothing)."""
    return key if key and key.lower() != "none" and key in cols else None


def sft_column(cols: list[str], messages_key: str) -> tuple[str, str]:
    """The conversation column and how it was chosen."""
    if present(messages_key, cols):
        return messages_key, f"conversations from column '{messages_key}'"
    if present(SHAREGPT_COLUMN, cols):
        return SHAREGPT_COLUMN, f"conversations from column '{SHAREGPT_COLUMN}' (ShareGPT; no '{messages_key}')"
    raise DataError(
        f"no conversation column: '{messages_key}' is not among the columns ({', '.join(cols)}); set "
        "data.messages_key to the column of messages, ShareGPT turns or HH-RLHF transcripts (such as 'chosen')"
    )


def pair_columns(cols: list[str], prompt_key: str, keys: tuple[str, str]) -> tuple[str | None, str]:
    """The prompt column of preference rows (None: the implicit prompt), and a note for the log."""
    missing = [k for k in keys if not present(k, cols)]
    if missing:
        setting = "chosen_key" if missing[0] == keys[0] else "rejected_key"
        raise DataError(f"no column '{missing[0]}' among ({', '.join(cols)}); set data.{setting}")
    if present(prompt_key, cols):
        return prompt_key, f"prompts from column '{prompt_key}'"
    return None, f"prompts from the turns '{keys[0]}' and '{keys[1]}' share (no '{prompt_key}' column)"


def prompt_column(cols: list[str], prompt_key: str, messages_key: str, pair_keys: tuple[str, str]):
    """Where RL prompts come from, as (kind, column, note for the log): ("prompt", prompt_key), else
    ("messages", messages_key), else ("pairs", "") for the prompt the pair columns share."""
    if present(prompt_key, cols):
        others = [k for k in (messages_key, *pair_keys) if present(k, cols)]
        unused = f" (not {', '.join(others)}: data.prompt_key=none reads those)" if others else ""
        return "prompt", prompt_key, f"prompts from column '{prompt_key}'{unused}"
    if present(messages_key, cols):
        return "messages", messages_key, f"prompts from column '{messages_key}' less a final assistant turn"
    if all(present(k, cols) for k in pair_keys):
        return "pairs", "", f"prompts from the turns '{pair_keys[0]}' and '{pair_keys[1]}' share"
    raise DataError(
        f"no prompt column: none of '{prompt_key}', '{messages_key}' or '{pair_keys[0]}'/'{pair_keys[1]}' is among "
        f"the columns ({', '.join(cols)}); set data.prompt_key or data.messages_key"
    )


# ---- rows ----


def value_of(row: Mapping, key: str):
    if row.get(key) is None:
        raise RowError(f"missing field '{key}'")
    return row[key]


def pair_row(row: Mapping, prompt_key: str | None, keys: tuple[str, str], fmt: str, notes: Counter):
    """(prompt, chosen reply, rejected reply) of a preference row; the implicit prompt when `prompt_key` is None."""
    chosen, rejected = (read_turns(value_of(row, k), k, fmt, notes, "assistant") for k in keys)
    if prompt_key is None:
        return shared_prompt(chosen, rejected, keys)
    prompt = read_turns(value_of(row, prompt_key), prompt_key, fmt, notes, "user")
    check_prompt(prompt, f"field '{prompt_key}'")
    replies = reply_after(chosen, prompt, keys[0]), reply_after(rejected, prompt, keys[1])
    if replies[0] == replies[1]:
        raise RowError(f"fields '{keys[0]}' and '{keys[1]}' hold the same reply: the pair carries no preference")
    return prompt, *replies


def prompt_row(row: Mapping, kind: str, source: str, keys: tuple[str, str], fmt: str, notes: Counter) -> list[Turn]:
    """The prompt turns of a row, from the column `prompt_column` chose."""
    if kind == "pairs":
        return pair_row(row, None, keys, fmt, notes)[0]
    if kind == "prompt":
        return check_prompt(read_turns(value_of(row, source), source, fmt, notes, "user"), f"field '{source}'")
    turns = read_turns(value_of(row, source), source, fmt, notes, None)
    if turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns:
        raise RowError(f"field '{source}' holds only an assistant turn, no prompt")
    return check_prompt(turns, f"field '{source}' (less a final assistant turn)")
