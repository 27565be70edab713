"""`rto eval`: generate for a prompt set, score, compare with a reference model, export for external judges.

Run: rto eval model=<policy> data.path=<prompts> [reference=<SFT model>] [reward=<RM>] [temperature=0.7|0]
- temperature 0.7 is AlpacaEval's setting, temperature 0 (greedy) Arena-Hard's; a response ends at the model's
  first stop token (the tokenizer's EOS, the model's generation_config eos_token_id, and `stop_tokens`);
- scores: the reward model's (when given) and, for toy-world prompts, the gold reward;
- win rate against the reference model's responses to the same prompts (ties count one half), with a 95%
  normal-approximation interval over prompts;
- exports, named after the model (`generator`, default: the model's folder or hub name), in the formats the
  benchmarks' own code reads:
  - `alpaca_eval/model_outputs.json`: a JSON list of {instruction, output, generator[, dataset]}, `instruction`
    being the text of the row's (last) user turn as the dataset holds it, from the column the data code reads
    (rto.formats; AlpacaEval joins model and reference outputs on it; for AlpacaEval's own set,
    `data.prompt_key=instruction`), `dataset` copied from the row when it has one;
  - `arena_hard/<generator>.jsonl`: one answer per question in arena-hard-auto's model_answer format, {uid,
    ans_id, model, messages: [the prompt turns..., {role: assistant, content: {answer}}], tstamp, metadata:
    {token_len, header_count, list_count, bold_count}} (`uid` from the row, else its row index), so the folder
    is a `data/<bench>/model_answer` folder. `token_len` counts the answer in the model's tokens; Arena-Hard's style
    control counts GPT-4o tokens, which its `utils/add_markdown_info.py` recomputes in place.
  Every row must be answered (one answer per question): eval refuses `data.overlong=drop` and skipped rows.
Runs in one process on unsharded models (evaluation sets are small).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rto.config import ConfigError, DataConfig, EvalConfig, ModelConfig
from rto.data import load_data_rows, render, tokenize_prompts
from rto.families import cut_at_stop, stop_token_ids
from rto.formats import columns, data_format, prompt_column, prompt_row
from rto.models import (
    ScalarModel,
    check_model_folder,
    check_same_tokenizers,
    hub_kwargs,
    load_scalar_model,
    load_tokenizer,
    reading_model,
    reward_normalisation,
    scalar_config,
)
from rto.tensors import last_valid, pad_rows

# the last parts of the folders this trainer saves models to (<run>/hf, <run>/hf/actor): not a model's name
SAVE_FOLDERS = {"hf", "actor", "critic"}


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]


def sampling_settings(temperature: float, top_p: float) -> dict:
    """HF generate's sampling arguments; greedy at temperature 0. NaN or a negative temperature is an error:
    NaN fails every comparison, so a `temperature > 0` test alone would turn it into greedy decoding."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be 0 (greedy) or a finite positive number, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}


def check_context(lm, prompts: list[list[int]], max_new_tokens: int, model_path: str) -> None:
    """One line, not a traceback from inside the model, when a prompt plus the response cap exceed the context."""
    context = getattr(lm.config, "max_position_embeddings", None)
    longest = max((len(p) for p in prompts), default=0)
    if context is not None and longest + max_new_tokens > context:
        raise ConfigError(
            f"a prompt has {longest} tokens: with max_new_tokens={max_new_tokens} it exceeds the {context}-token "
            f"context of {model_path} (lower max_new_tokens or data.max_prompt_length with data.overlong=truncate)"
        )


@torch.no_grad()
def generate(
    model_path: str,
    prompts: list[list[int]],
    tok,
    *,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    batch_size: int = 64,
    seed: int = 0,
    device="cpu",
    stop_ids: list[int] | None = None,
    settings: ModelConfig | None = None,
    what: str = "model",
) -> list[Sample]:
    """One response per prompt (greedy at temperature 0), cut after its first stop token: `stop_ids`, by default
    the model's own (tokenizer EOS and generation_config eos_token_id, rto.families.stop_token_ids). `settings`:
    the revision and remote-code settings the model loads under (`hub_kwargs`); `what`: its setting's name."""
    sampling = sampling_settings(temperature, top_p)
    check_model_folder(model_path, what)
    hub = hub_kwargs(settings, model_path, what)
    with reading_model(model_path, what):
        lm = AutoModelForCausalLM.from_pretrained(model_path, **hub).to(device).eval()
    check_context(lm, prompts, max_new_tokens, model_path)
    stops = stop_token_ids(tok, model_path, [], hub["revision"]) if stop_ids is None else list(stop_ids)
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        # left padding: every row's last prompt token sits in the same column, where decoding starts
        ids, valid = pad_rows(chunk, tok.pad_token_id, side="left", device=device)  # [B, P]
        seqs = lm.generate(
            input_ids=ids,
            attention_mask=valid.long(),
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )  # [B, P + new]
        rows = seqs[:, ids.shape[1] :].tolist()
        out += [Sample(p, cut_at_stop(row, stops)[0]) for p, row in zip(chunk, rows)]  # HF pads after a stop
    return out


@torch.no_grad()
def reward_scores(
    rm_path: str, samples: list[Sample], tok, batch_size: int = 64, device="cpu", trust_remote_code: bool = False
) -> list[float]:
    """The reward model's score of each prompt + response (its value at the last token), normalised as its
    checkpoint states (OpenRLHF's mean/std), as PPO's rollouts score it."""
    settings = ModelConfig(path=rm_path, trust_remote_code=trust_remote_code)
    hf = load_scalar_model(rm_path, settings, "reward", scorer=True)
    rm, norm = ScalarModel(hf).to(device).eval(), reward_normalisation(hf)
    mean, std = norm if norm is not None else (0.0, 1.0)
    scores = []
    for i in range(0, len(samples), batch_size):
        chunk = [s.prompt_ids + s.response_ids for s in samples[i : i + batch_size]]
        ids, valid = pad_rows(chunk, tok.pad_token_id, side="right", device=device)  # [B, T]
        score = last_valid(rm(ids, valid.long()), valid)  # [B]
        scores += ((score - mean) / std).tolist()
    return scores


def win_rate(scores: list[float], reference: list[float]) -> tuple[float, float]:
    """Share of prompts where scores beat the reference's (ties: 1/2) and the half-width of its 95% interval."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference)]
    mean = statistics.fmean(outcomes)
    half = 1.96 * statistics.pstdev(outcomes) / math.sqrt(len(outcomes)) if len(outcomes) > 1 else float("nan")
    return mean, half


# ---- what the benchmarks read ----


@dataclass
class Question:
    """A row as the benchmark knows it: its id, its prompt turns as the dataset holds them, its source set."""

    uid: object
    messages: list[dict]
    dataset: str | None = None

    @property
    def instruction(self) -> str:
        """The last user turn's text (the whole prompt of a one-turn row)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def questions_of(rows, prompts: list[list[int]], tok, data: DataConfig, name: str) -> list[Question]:
    """The rows' questions, their prompt turns read as rto.data.tokenize_prompts reads them (rto.formats), and
    checked to be what the model was given: its prompt ids must be the rendered turns (or, after
    data.overlong=truncate, their end), so an export never pairs an answer with another text."""
    keys = (data.chosen_key, data.rejected_key)
    kind, column, _ = prompt_column(columns(rows), data.prompt_key, data.messages_key, keys)
    out = []
    for i, (row, ids) in enumerate(zip(rows, prompts)):
        turns = prompt_row(row, kind, column, keys, data_format(data), Counter())
        rendered = render(tok, turns, generation_prompt=True)
        if rendered[len(rendered) - len(ids) :] != ids:
            raise ConfigError(f"{name} row {i}: the prompt read for the exports is not the one tokenised")
        uid = row.get("uid")
        out.append(Question(str(i) if uid is None else uid, turns, row.get("dataset")))
    return out


def model_name(path: str) -> str:
    """A model's name for the exports: a hub id's last part, or a folder's last part that is not one of this
    trainer's save folders (`runs/rto-llama/hf/actor` -> `rto-llama`)."""
    p = Path(path).expanduser()
    parts = p.resolve().parts if p.exists() else Path(path).parts
    names = [x for x in parts if x not in SAVE_FOLDERS and x != p.anchor]
    return names[-1] if names else "model"


def check_generator(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"generator must be a file name (Arena-Hard names the answer file after it), got {name!r}")
    return name


def markdown_counts(answer: str) -> dict[str, dict[str, int]]:
    """Arena-Hard's style features of an answer, as its utils/add_markdown_info.py counts them (headers, lists,
    bold), code blocks left out. Its removal of code finds the text between ``` fences (the group) and deletes
    that, keeping the fences; the same here, so the counts match theirs exactly."""
    for block in re.findall(r"```([^`]*)```", answer):
        answer = answer.replace(block, "")
    return {
        "header_count": {f"h{n}": len(re.findall(rf"^#{{{n}}}\s", answer, re.MULTILINE)) for n in range(1, 7)},
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", answer, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", answer, re.MULTILINE)),
        },
        "bold_count": {
            "**": len(re.findall(r"\*\*[^*\n]+\*\*", answer)),
            "__": len(re.findall(r"__[^_\n]+__", answer)),
        },
    }


def export(
    out_dir: Path, generator: str, questions: list[Question], answers: list[str], token_lens: list[int]
) -> dict[str, str]:
    """AlpacaEval model outputs and Arena-Hard answers (formats in the module docstring)."""
    check_generator(generator)
    alpaca = out_dir / "alpaca_eval" / "model_outputs.json"
    alpaca.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for q, a in zip(questions, answers):
        source = {} if q.dataset is None else {"dataset": q.dataset}
        records.append({"instruction": q.instruction, "output": a, "generator": generator, **source})
    alpaca.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    arena = out_dir / "arena_hard" / f"{generator}.jsonl"
    arena.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    with arena.open("w", encoding="utf-8") as f:
        for q, a, n in zip(questions, answers, token_lens):
            turns = q.messages + [{"role": "assistant", "content": {"answer": a}}]
            metadata = {"token_len": n, **markdown_counts(a)}  # token_len first: Arena-Hard reads it by position
            row = {"uid": q.uid, "ans_id": uuid.uuid4().hex, "model": generator, "messages": turns, "tstamp": now}
            f.write(json.dumps({**row, "metadata": metadata}, ensure_ascii=False) + "\n")
    return {"alpaca_eval": str(alpaca), "arena_hard": str(arena)}


def answer_ids(sample: Sample, stop_ids: list[int]) -> list[int]:
    """A response's tokens without the stop token that ended it."""
    ids = sample.response_ids
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def model_settings(cfg) -> ModelConfig:
    """The model settings of eval's (or inspect's) `model`: its revision, chat template, pad token and remote-code
    setting; the other models it loads take the remote-code setting and their default branch (`hub_kwargs`)."""
    return ModelConfig(
        path=cfg.model,
        chat_template=cfg.chat_template,
        pad_token=cfg.pad_token,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, score and compare; writes results.json, responses.jsonl and the exports under the run folder."""
    settings = model_settings(cfg)
    tok = load_tokenizer(settings, "")
    rows = load_data_rows(cfg.data)
    name = f"{cfg.data.path}[{cfg.data.split}]"
    prompts, report = tokenize_prompts(rows, tok, cfg.data, name)
    if report.kept != report.rows:
        fix = "use data.overlong=truncate or fix the rows"
        raise ConfigError(f"eval answers every question, but {report.summary()}: {fix}")
    questions = questions_of(rows, prompts, tok, cfg.data, name)
    kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    stops = stop_token_ids(tok, cfg.model, cfg.stop_tokens, cfg.revision)
    scorers = {"reference": cfg.reference, "reward": cfg.reward}
    check_same_tokenizers(tok, scorers, "the model's", settings)  # they score its ids
    if cfg.reward:  # before any generation: a reward model without its head is refused now, not after
        scalar_config(
            cfg.reward, ModelConfig(path=cfg.reward, trust_remote_code=cfg.trust_remote_code), "reward", scorer=True
        )
    samples = generate(cfg.model, prompts, tok, stop_ids=stops, settings=settings, **kw)
    lengths = statistics.fmean(len(s.response_ids) for s in samples)
    result: dict = {"model": cfg.model, "n": len(samples), "temperature": cfg.temperature, "mean_length": lengths}
    ref_samples = None
    if cfg.reference:
        ref_stops = stop_token_ids(tok, cfg.reference, cfg.stop_tokens)
        ref_kw = dict(stop_ids=ref_stops, settings=settings, what="reference")
        ref_samples = generate(cfg.reference, prompts, tok, **ref_kw, **kw)
    metrics = {}
    if cfg.reward:
        remote = dict(trust_remote_code=cfg.trust_remote_code)
        metrics["rm_score"] = reward_scores(cfg.reward, samples, tok, **remote)
        if ref_samples:
            metrics["ref_rm_score"] = reward_scores(cfg.reward, ref_samples, tok, **remote)
    if cfg.gold:
        from rto.toy import response_gold

        try:
            metrics["gold"] = [response_gold(s.prompt_ids, s.response_ids, tok) for s in samples]
        except ValueError as e:
            raise ConfigError(f"gold=true: {e}; the gold reward exists for the toy world's prompts only") from None
        if ref_samples:
            metrics["ref_gold"] = [response_gold(s.prompt_ids, s.response_ids, tok) for s in ref_samples]
    for k, v in metrics.items():
        result[k] = statistics.fmean(v)
    for judge in ("gold", "rm_score"):
        if judge in metrics and f"ref_{judge}" in metrics:
            rate, half = win_rate(metrics[judge], metrics[f"ref_{judge}"])
            result[f"win_rate_vs_reference_{judge}"] = rate
            result[f"win_rate_vs_reference_{judge}_ci95"] = half
    out_dir = Path(cfg.output_dir) / cfg.name
    kept = [answer_ids(s, stops) for s in samples]
    answers = [tok.decode(ids, skip_special_tokens=True).strip() for ids in kept]
    generator = cfg.generator or model_name(cfg.model)  # the model's name in both exports
    result["generator"] = generator
    # Arena-Hard's token_len counts the answer's text (in GPT-4o tokens there; in the model's own tokens here)
    token_lens = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    result["exports"] = export(out_dir, generator, questions, answers, token_lens)
    with (out_dir / "responses.jsonl").open("w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(zip(questions, answers)):
            row = {"uid": q.uid, "prompt": q.instruction, "response": a, **{k: v[i] for k, v in metrics.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    return result
