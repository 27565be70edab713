"""`rto eval`: its exports read back by the benchmarks' own loading rules (AlpacaEval's code, from the package
index; Arena-Hard's answer reader, re-implemented from arena-hard-auto), stop tokens, sampling settings, and the
reward model's score of padded batches."""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from glob import glob
from pathlib import Path

import pytest
import torch

from rto.config import ConfigError, DataConfig, EvalConfig, ModelConfig
from rto.data import tokenize_prompts
from rto.evaluate import Question, Sample, export, generate, model_name, questions_of, reward_scores
from rto.evaluate import evaluate as run_eval
from rto.models import ScalarModel, load_scalar_model, tiny_causal_lm, tiny_tokenizer
from tests.assets import WORDS, write_jsonl

# Texts a templated, decoded prompt cannot reproduce: words outside the tiny vocabulary (<unk>), punctuation,
# a newline, leading and trailing spaces. The export must carry them unchanged.
INSTRUCTIONS = [
    "repeat w1 w2, please.",
    "  Write a haiku about w3\nand w4  ",
    "What is 2 + 2? Answer in one word.",
    "repeat w5 w6 w7",
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny random Llama saved where a training run saves its policy (<run>/hf/actor)."""
    root = tmp_path_factory.mktemp("eval")
    folder = root / "tiny-policy" / "hf" / "actor"
    tok = tiny_tokenizer(WORDS)
    tiny_causal_lm(len(tok), seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def eval_config(policy: Path, path: Path, out: Path, data: dict | None = None, **kw) -> EvalConfig:
    """Greedy, short responses, outputs under out/<name> (default name: eval)."""
    cfg = dict(temperature=0.0, max_new_tokens=8, output_dir=str(out), name="eval")
    return EvalConfig(model=str(policy), data=DataConfig(path=str(path), **(data or {})), **{**cfg, **kw})


# ---- AlpacaEval: its own loading, naming and merge code ----


def import_alpaca_eval():
    """alpaca_eval.main, importable under setuptools >= 81 too: alpaca-eval 0.6.6 imports pkg_resources (which
    those setuptools no longer ship) for two version helpers only, given here from importlib.metadata."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from importlib.metadata import version

        from packaging.version import parse

        shim = types.ModuleType("pkg_resources")
        shim.parse_version = parse
        shim.get_distribution = lambda name: types.SimpleNamespace(version=version(name))
        sys.modules["pkg_resources"] = shim
    main = pytest.importorskip("alpaca_eval.main", reason="alpaca-eval (pip install alpaca-eval) reads the export")
    from alpaca_eval.annotators import PairwiseAnnotator

    return main, PairwiseAnnotator


def alpaca_eval_merge(model_outputs: Path, reference_outputs: Path):
    """AlpacaEval's own evaluate() on our export against a reference file, with a stand-in judge (no LLM) that
    keeps AlpacaEval's default merge keys and prefers our output on every merged row: (leaderboard, merged rows)."""
    main, PairwiseAnnotator = import_alpaca_eval()
    merged = []

    class Judge(PairwiseAnnotator):
        def __init__(self, **_):
            self.input_keys = list(inspect.signature(PairwiseAnnotator.__init__).parameters["input_keys"].default)

        def __call__(self, df, **_):
            merged.append(df)
            return [{**r, "preference": 2.0} for r in df.to_dict("records")]

    board, _ = main.evaluate(
        model_outputs=str(model_outputs),
        reference_outputs=str(reference_outputs),
        Annotator=Judge,
        output_path=None,
        precomputed_leaderboard=None,
        is_return_instead_of_print=True,
        fn_metric="get_winrate",
        sort_by="win_rate",
    )
    return board, merged[0]


def alpaca_reference(instructions: list[str], path: Path) -> Path:
    """AlpacaEval's evaluation set is its reference outputs file: instruction, output, generator, dataset."""
    rows = [
        {"instruction": text, "output": f"reference answer {i}", "generator": "gpt4_turbo", "dataset": "helpful_base"}
        for i, text in enumerate(instructions)
    ]
    path.write_text(json.dumps(rows))
    return path


def check_alpaca_export(export_file: Path, reference: Path, instructions: list[str], model: str, responses: Path):
    """Every reference row merges with ours, under our model's name, with our responses unchanged."""
    board, df = alpaca_eval_merge(export_file, reference)
    assert list(board.index) == [model]  # AlpacaEval names the model from our `generator`
    assert board.loc[model, "n_total"] == len(instructions)  # every row merged
    assert board.loc[model, "win_rate"] == pytest.approx(100.0)
    assert sorted(df["instruction"]) == sorted(instructions)
    assert set(df["generator_2"]) == {model}
    assert list(df["dataset"]) == ["helpful_base"] * len(instructions)  # passed through, equal on both sides
    rows = [json.loads(x) for x in responses.read_text().splitlines()]
    ours = {r["prompt"]: r["response"] for r in rows}
    assert all(ours[r["instruction"]] == r["output_2"] for r in df.to_dict("records"))


def test_alpaca_eval_merges_our_outputs_with_a_reference(policy, tmp_path):
    import_alpaca_eval()
    ref_path = alpaca_reference(INSTRUCTIONS, tmp_path / "alpaca_eval.json")
    result = run_eval(eval_config(policy, ref_path, tmp_path, data={"prompt_key": "instruction"}))
    assert result["generator"] == "tiny-policy"  # the model's name, not the run's ("eval") nor "actor"
    ours = Path(result["exports"]["alpaca_eval"])
    check_alpaca_export(ours, ref_path, INSTRUCTIONS, "tiny-policy", tmp_path / "eval" / "responses.jsonl")


# ---- Arena-Hard: its answer reader ----
# Re-implemented from lmarena/arena-hard-auto at 196f6b8 (the package is not on the index): utils/completion.py
# (load_questions, load_model_answers), gen_judgment.py (an answer's text), show_result.py
# (get_model_style_metadata and the style features) and utils/add_markdown_info.py (the markdown counts).


def arena_load_questions(question_file: str) -> list[dict]:
    with open(question_file) as f:
        return [json.loads(line) for line in f if line]


def arena_load_model_answers(answer_dir: str) -> dict:
    """Dict[model_name (the file's name) -> Dict[uid -> answer]]."""
    model_answers = {}
    for filename in sorted(glob(f"{answer_dir}/*.jsonl")):
        with open(filename) as f:
            model_answers[Path(filename).name[:-6]] = {a["uid"]: a for a in map(json.loads, f)}
    return model_answers


def arena_style_metadata(answer_dir: str) -> dict:
    import pandas as pd

    out = {}
    for file in glob(f"{answer_dir}/*.jsonl"):
        df = pd.read_json(file, lines=True)
        out[df.iloc[0]["model"]] = df.set_index("uid")["metadata"].to_dict()
    return out


def arena_features(metadata: dict) -> list[int]:
    """show_result.py: token_len first (the length feature), then each count summed over its kinds."""
    return [v if isinstance(v, int) else sum(v.values()) for v in metadata.values()]


def arena_count_markdown(answer: str) -> dict:
    for block in re.compile("```([^`]*)```").findall(answer):  # remove_pattern
        answer = answer.replace(block, "")
    return {
        "header_count": {
            "h1": len(re.findall(r"^#{1}\s", answer, re.MULTILINE)),
            "h2": len(re.findall(r"^#{2}\s", answer, re.MULTILINE)),
            "h3": len(re.findall(r"^#{3}\s", answer, re.MULTILINE)),
            "h4": len(re.findall(r"^#{4}\s", answer, re.MULTILINE)),
            "h5": len(re.findall(r"^#{5}\s", answer, re.MULTILINE)),
            "h6": len(re.findall(r"^#{6}\s", answer, re.MULTILINE)),
        },
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", answer, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", answer, re.MULTILINE)),
        },
        "bold_count": {
            "**": len(re.findall(r"\*\*[^*\n]+\*\*", answer)),
            "__": len(re.findall(r"__[^_\n]+__", answer)),
        },
    }


def test_arena_hard_reads_our_answers_by_question_uid(policy, tmp_path):
    question_file = arena_questions(INSTRUCTIONS, tmp_path / "question.jsonl")
    # a stop word the unconstrained greedy responses produce: the exports must end before it
    tok = tiny_tokenizer(WORDS)
    plain = run_eval(eval_config(policy, question_file, tmp_path, name="plain"))
    texts = [json.loads(x)["response"] for x in (tmp_path / "plain" / "responses.jsonl").read_text().splitlines()]
    stop = next(w for t in texts for w in t.split()[:-1] if w in tok.get_vocab())
    result = run_eval(eval_config(policy, question_file, tmp_path, stop_tokens=[stop]))
    assert plain["mean_length"] > result["mean_length"]

    texts = check_arena_export(Path(result["exports"]["arena_hard"]), question_file, "tiny-policy", tok)
    assert all(stop not in text.split() for text in texts)


def arena_questions(instructions: list[str], path: Path) -> Path:
    questions = [
        {"uid": f"{0xA0 + i:016x}", "category": "hard_prompt", "subcategory": "coding", "prompt": text}
        for i, text in enumerate(instructions)
    ]
    return write_jsonl(path, questions)


def check_arena_export(answer_file: Path, question_file: Path, model: str, tok) -> list[str]:
    """Arena-Hard's reader finds one answer per question uid, under the model named by the file, with the style
    metadata its show_result computes; returns the answers' texts."""
    assert answer_file.name == f"{model}.jsonl"  # Arena-Hard names the model after the file
    answer_dir = str(answer_file.parent)
    answers = arena_load_model_answers(answer_dir)
    assert list(answers) == [model]
    style = arena_style_metadata(answer_dir)
    assert list(style) == [model]  # the `model` field is the file's name too
    texts = []
    for q in arena_load_questions(str(question_file)):
        a = answers[model][q["uid"]]
        assert a["model"] == model and a["ans_id"]
        assert [m["role"] for m in a["messages"]] == ["user", "assistant"]
        assert a["messages"][0]["content"] == q["prompt"]
        text = a["messages"][-1]["content"]["answer"]
        meta = style[model][q["uid"]]
        assert list(meta) == ["token_len", "header_count", "list_count", "bold_count"]
        assert meta["token_len"] == len(tok(text, add_special_tokens=False)["input_ids"])
        assert arena_features(meta)[1:] == arena_features(arena_count_markdown(text))
        texts.append(text)
    return texts


def test_arena_hard_markdown_counts_match_theirs(tmp_path):
    answers = [
        "## Plan\n\n1. first\n2. **second**\n- a\n* b\n\n```\n# not a header\n- not a list\n```\n__done__",
        "# Title\n### Sub\n+ item\n  3. nested **bold** and **more**",
        "plain text, no markdown",
    ]
    questions = [Question(str(i), [{"role": "user", "content": f"question {i}"}]) for i in range(3)]
    paths = export(tmp_path, "m", questions, answers, [5, 6, 7])
    rows = [json.loads(x) for x in Path(paths["arena_hard"]).read_text().splitlines()]
    for row, answer, n in zip(rows, answers, [5, 6, 7]):
        assert row["metadata"] == {"token_len": n, **arena_count_markdown(answer)}
    # by hand: the code block's header and list item do not count
    assert arena_features(rows[0]["metadata"]) == [5, 1, 4, 2]
    assert arena_features(rows[1]["metadata"]) == [6, 2, 2, 2]


# ---- generation and scoring ----


def prompt_ids(tok, n: int = 4) -> list[list[int]]:
    """Ragged templated prompts (3 to 3 + n - 1 words), so batches need padding."""
    msgs = [[{"role": "user", "content": "repeat " + " ".join(WORDS[: 2 + i])}] for i in range(n)]
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"] for m in msgs]


def test_generate_cuts_each_row_at_its_first_stop_token(policy):
    tok = tiny_tokenizer(WORDS)
    prompts = prompt_ids(tok)
    eos = [tok.eos_token_id]
    free = generate(str(policy), prompts, tok, temperature=0, max_new_tokens=10, stop_ids=eos)
    stop = next(t for s in free for t in s.response_ids[1:-1] if t not in eos)  # produced mid-response
    cut = generate(str(policy), prompts, tok, temperature=0, max_new_tokens=10, stop_ids=eos + [stop])
    for a, b in zip(free, cut):
        # greedy decoding: the row with the extra stop is the free row up to its first stop token
        ends = [j for j, t in enumerate(a.response_ids) if t == stop or t in eos]
        assert b.response_ids == (a.response_ids[: ends[0] + 1] if ends else a.response_ids)
    assert sum(len(b.response_ids) < len(a.response_ids) for a, b in zip(free, cut)) >= 1


@pytest.mark.parametrize("temperature", [float("nan"), -0.5, float("inf")])
def test_bad_temperature_is_refused_not_turned_greedy(policy, temperature):
    tok = tiny_tokenizer(WORDS)
    with pytest.raises(ConfigError, match="temperature"):
        generate(str(policy), prompt_ids(tok, 1), tok, temperature=temperature, max_new_tokens=2)


def test_reward_score_of_a_padded_batch_is_each_rows_last_token(policy, tmp_path):
    tok = tiny_tokenizer(WORDS)
    rm_dir = tmp_path / "rm"
    load_scalar_model(str(policy), ModelConfig(path=str(policy))).save_pretrained(rm_dir)
    samples = [Sample(p, [tok.convert_tokens_to_ids(w) for w in WORDS[: 1 + i]]) for i, p in enumerate(prompt_ids(tok))]
    batched = reward_scores(str(rm_dir), samples, tok, batch_size=len(samples))
    rm = ScalarModel(load_scalar_model(str(rm_dir), ModelConfig(path=str(rm_dir)))).eval()
    with torch.no_grad():
        alone = [rm(torch.tensor([s.prompt_ids + s.response_ids]))[0, -1].item() for s in samples]
    assert batched == pytest.approx(alone, abs=1e-5)
    # a checkpoint that states its normalisation (OpenRLHF's config.json) is scored as PPO scores it
    config = json.loads((rm_dir / "config.json").read_text())
    (rm_dir / "config.json").write_text(json.dumps({**config, "normalize_reward": True, "mean": 2.0, "std": 4.0}))
    normalised = reward_scores(str(rm_dir), samples, tok, batch_size=len(samples))
    assert normalised == pytest.approx([(a - 2.0) / 4.0 for a in alone], abs=1e-5)


# ---- names and rows ----


def test_model_name_skips_the_trainers_save_folders(policy):
    assert model_name(str(policy)) == "tiny-policy"
    assert model_name("meta-llama/Meta-Llama-3-8B-Instruct") == "Meta-Llama-3-8B-Instruct"
    with pytest.raises(ConfigError, match="generator"):
        export(Path("unused"), "org/model", [], [], [])


def test_eval_refuses_to_drop_questions(policy, tmp_path):
    rows = [{"prompt": "repeat w1"}, {"prompt": "repeat " + " ".join(WORDS * 4)}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    cfg = eval_config(policy, data, tmp_path, data={"max_prompt_length": 16, "overlong": "drop"})
    with pytest.raises(ConfigError, match="1 of 2 rows kept"):
        run_eval(cfg)


def test_exported_prompt_must_be_the_tokenised_one():
    tok = tiny_tokenizer(WORDS)
    rows = [{"prompt": "repeat w1", "messages": [{"role": "user", "content": "repeat w2"}]}]
    data = DataConfig(path="x")
    prompts, _ = tokenize_prompts(rows, tok, data, "q")
    assert [q.instruction for q in questions_of(rows, prompts, tok, data, "q")] == ["repeat w1"]
    with pytest.raises(ConfigError, match="row 0"):
        questions_of(rows, prompt_ids(tok, 1), tok, data, "q")  # "repeat w0 w1": not the row's text


def test_a_reward_without_a_scalar_head_is_refused_before_it_scores(policy, tmp_path, monkeypatch):
    """eval's reward scores: a causal LM would get a random head, so it is refused naming the setting, before
    any response is generated."""
    import rto.evaluate
    from rto.families import ModelError

    def no_generation(*args, **kw):
        raise AssertionError("generated before the reward model was checked")

    monkeypatch.setattr(rto.evaluate, "generate", no_generation)
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "repeat w1"}])
    with pytest.raises(ModelError, match=r"^reward: .* is not a reward model: it has no scalar head"):
        run_eval(eval_config(policy, data, tmp_path, reward=str(policy)))
    assert not (tmp_path / "eval" / "results.json").exists()
