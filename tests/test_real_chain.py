"""The paper's chain on data shaped like the real thing: SFT -> RM -> DPO -> RTO -> eval, through the `rto`
commands, on UltraFeedback binarized as published (its six splits and seven columns, saved as a dataset folder the
way `datasets` stores a hub download), with a tiny model and the reward model in each format people publish
(a sequence-classification checkpoint, OpenRLHF's `RewardModel` with its value head named `value_head` or `score`
and its normalisation statistics). The two eval exports are read back by AlpacaEval's own code and by Arena-Hard's
reader (tests/test_evaluate.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file, save_file

from rto.cli import main as cli
from rto.models import tiny_tokenizer
from tests.assets import WORDS, make_assets
from tests.test_evaluate import (
    alpaca_reference,
    arena_questions,
    check_alpaca_export,
    check_arena_export,
    import_alpaca_eval,
)

QUIET = ["run.progress=false", "run.tensorboard=false"]
SPLITS = {"train_prefs": 96, "test_prefs": 16, "train_sft": 96, "test_sft": 16, "train_gen": 32, "test_gen": 8}
MEAN, STD = 0.25, 2.0  # the OpenRLHF reward models' stated normalisation


def ultrafeedback(root: Path, seed: int = 0) -> Path:
    """HuggingFaceH4/ultrafeedback_binarized's layout: prompt, prompt_id (sha256 of the prompt), chosen and rejected
    conversations, messages (= chosen), score_chosen, score_rejected; here the task is to repeat the prompt's words."""
    rng = random.Random(seed)
    splits = {}
    for split, n in SPLITS.items():
        rows = []
        for _ in range(n):
            words = rng.sample(WORDS[:-1], rng.randint(2, 4))
            prompt = "repeat " + " ".join(words)
            user = {"role": "user", "content": prompt}
            chosen = [user, {"role": "assistant", "content": " ".join(words)}]
            rejected = [user, {"role": "assistant", "content": " ".join(rng.sample(WORDS[:-1], len(words)))}]
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                    "chosen": chosen,
                    "rejected": rejected,
                    "messages": chosen,
                    "score_chosen": 8.0,
                    "score_rejected": float(rng.choice([2, 3, 4])),
                }
            )
        splits[split] = datasets.Dataset.from_list(rows)
    folder = root / "ultrafeedback_binarized"
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def openrlhf_format(seq_cls: Path, out: Path, prefix: str) -> Path:
    """Our sequence-classification RM rewritten as OpenRLHF saves a `RewardModel`: the same backbone weights, the
    head under `prefix`, `architectures: ["RewardModel"]`, and the normalisation statistics in config.json."""
    out.mkdir(parents=True)
    state = load_file(seq_cls / "model.safetensors")
    state[f"{prefix}.weight"] = state.pop("score.weight")
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((seq_cls / "config.json").read_text())
    config.pop("id2label", None), config.pop("label2id", None)
    extra = dict(architectures=["RewardModel"], value_head_prefix=prefix, normalize_reward=True, mean=MEAN, std=STD)
    (out / "config.json").write_text(json.dumps({**config, **extra}))
    for f in seq_cls.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def run(*args: str) -> None:
    assert cli(list(args)) == 0, args


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """SFT, RM and DPO on the UltraFeedback-shaped folder, each from the split the paper's recipe uses."""
    root = tmp_path_factory.mktemp("chain")
    uf, base = ultrafeedback(root), make_assets(root, n=4)["model"]
    runs = root / "runs"
    common = ["data.max_length=64", "data.max_prompt_length=32", "train.global_batch_size=16"]
    common += ["train.micro_batch_size=16", f"run.output_dir={runs}", *QUIET]
    offline = [f"data.path={uf}", *common]
    run(
        "sft",
        f"model.path={base}",
        *offline,
        "data.split=train_sft",
        "data.eval_split=test_sft",
        "optim.lr=1e-2",
        "train.max_steps=12",
        "run.name=sft",
    )
    sft = runs / "sft" / "hf"
    prefs = [f"model.path={sft}", *offline, "data.split=train_prefs", "data.eval_split=test_prefs"]
    run("rm", *prefs, "optim.lr=2e-3", "train.max_steps=6", "run.name=rm")
    run("dpo", *prefs, "optim.lr=1e-3", "train.max_steps=6", "run.name=dpo")
    rms = {"seq-cls": runs / "rm" / "hf"}
    for prefix in ("value_head", "score"):
        rms[f"openrlhf-{prefix}"] = openrlhf_format(rms["seq-cls"], root / f"rm-openrlhf-{prefix}", prefix)
    return dict(root=root, uf=uf, runs=runs, sft=sft, dpo=runs / "dpo" / "hf", rms=rms)


def test_the_published_splits_feed_each_stage(chain):
    for stage in ("sft", "rm", "dpo"):
        assert (chain["runs"] / stage / "hf" / "model.safetensors").is_file(), stage
    # SFT held out test_sft and trained on its assistant turns: each reply's words and its end-of-turn token
    test_sft = datasets.load_from_disk(str(chain["uf"]))["test_sft"]
    replies = sum(len(row["messages"][-1]["content"].split()) + 1 for row in test_sft)
    sft_eval = [r for r in metrics(chain["runs"] / "sft") if "eval/tokens" in r]
    assert sft_eval and sft_eval[-1]["eval/tokens"] == replies
    # the RM and DPO held out test_prefs: accuracies over its 16 pairs
    for stage, key in (("rm", "eval/accuracy"), ("dpo", "eval/reward_accuracy")):
        rows = [r for r in metrics(chain["runs"] / stage) if key in r]
        assert rows and (rows[-1][key] * SPLITS["test_prefs"]).is_integer(), stage


def test_rto_with_every_reward_model_format_then_both_exports_read_back(chain, tmp_path):
    import_alpaca_eval()  # skips visibly (before any training) when alpaca-eval is not installed
    first = {}
    for fmt, rm in chain["rms"].items():
        run(
            "ppo",
            "--recipe",
            "toy",
            "algo=rto",
            f"actor.path={chain['sft']}",
            f"reward={rm}",
            f"dpo={chain['dpo']}",
            f"data.path={chain['uf']}",
            "data.split=train_gen",
            "rollout.prompts_per_step=8",
            "rollout.max_new_tokens=8",
            "train.steps=2",
            "train.train_batch_size=8",
            "train.micro_batch_size=8",
            "train.log_every=1",
            f"run.output_dir={tmp_path}",
            f"run.name=rto-{fmt}",
            *QUIET,
        )
        first[fmt] = next(r for r in metrics(tmp_path / f"rto-{fmt}") if "rollout/score" in r)
        assert (tmp_path / f"rto-{fmt}" / "hf" / "actor" / "model.safetensors").is_file()
    # Same seed, same actor, same prompts: the same first rollout. The RM's raw score (rollout/score) is the same
    # head's in every format (a random head, the old failure, would differ); the OpenRLHF files state
    # (score - mean) / std, which the rewards carry: the DPO and KL terms are equal across the runs, so the rewards
    # differ by exactly the normalisation.
    seq = first["seq-cls"]
    for prefix in ("value_head", "score"):
        other = first[f"openrlhf-{prefix}"]
        assert other["rollout/score"] == pytest.approx(seq["rollout/score"], abs=1e-5)
        assert other["rollout/dpo_reward_per_sequence"] == pytest.approx(seq["rollout/dpo_reward_per_sequence"])
        shift = (seq["rollout/score"] - MEAN) / STD - seq["rollout/score"]
        got = other["rollout/reward_per_sequence"] - seq["rollout/reward_per_sequence"]
        assert got == pytest.approx(shift, abs=1e-5)

    tok = tiny_tokenizer(WORDS)
    instructions = ["repeat w1 w2", "repeat w3 w4 w5", "  repeat w6, w7!\n", "what is w8?"]
    actor = tmp_path / "rto-seq-cls" / "hf" / "actor"
    reference = alpaca_reference(instructions, tmp_path / "alpaca_eval.json")
    out = tmp_path / "eval"
    greedy = ["temperature=0", "max_new_tokens=8", f"output_dir={out}", "generator=tiny-rto"]
    scores = {}
    for fmt, rm in chain["rms"].items():
        run(
            "eval",
            f"model={actor}",
            f"data.path={reference}",
            "data.prompt_key=instruction",
            f"reward={rm}",
            *greedy,
            f"name=alpaca-{fmt}",
        )
        result = json.loads((out / f"alpaca-{fmt}" / "results.json").read_text())
        scores[fmt] = result["rm_score"]
    for prefix in ("value_head", "score"):
        assert scores[f"openrlhf-{prefix}"] == pytest.approx((scores["seq-cls"] - MEAN) / STD, abs=1e-5)
    alpaca = out / "alpaca-seq-cls"
    result = json.loads((alpaca / "results.json").read_text())
    check_alpaca_export(
        Path(result["exports"]["alpaca_eval"]), reference, instructions, "tiny-rto", alpaca / "responses.jsonl"
    )

    questions = arena_questions(instructions, tmp_path / "question.jsonl")
    run("eval", f"model={actor}", f"data.path={questions}", *greedy, "name=arena")
    result = json.loads((out / "arena" / "results.json").read_text())
    texts = check_arena_export(Path(result["exports"]["arena_hard"]), questions, "tiny-rto", tok)
    assert len(texts) == len(instructions)
