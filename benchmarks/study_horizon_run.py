"""One run of the horizon study (benchmarks/study_horizon.py starts it in a fresh process on the frozen code).

Argument: the run as JSON {out, L, seed, arm, variant, phase}. Builds the (L, seed) world first when it is missing
(`rto pipeline --recipe toy world.kind=chain baselines=[dpo] online=[]`: world, SFT, RM, DPO, and the held-out
evaluation of SFT and DPO), then trains the arm with `rto.trainers.ppo.main` and the pipeline's GoldProbe as its
rollout hook, evaluates the checkpoints at each quarter of the budget on the held-out prompts and writes
result.json. The checkpoints are removed once evaluated (the final actor stays in hf/actor).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_horizon import ARMS, CHECKPOINTS, STEPS, run_dir, world_dir  # noqa: E402

log = logging.getLogger("study")


def build_world(out: Path, L: int, seed: int) -> Path:
    """The (L, seed) world and its SFT, RM and DPO models (skipped when they exist)."""
    from rto.cli import main as cli

    root = world_dir(out, L, seed)
    if not (root / "results.json").is_file():
        t0 = time.time()
        args = [
            "pipeline",
            "--recipe",
            "toy",
            "world.kind=chain",
            f"world.length={L}",
            f"seed={seed}",
            "baselines=[dpo]",
            "online=[]",
            f"output_dir={root.parent}",
            f"name={root.name}",
        ]
        if cli(args) != 0:
            raise RuntimeError(f"the world stage failed: rto {' '.join(args)}")
        (root / "world_seconds.json").write_text(json.dumps({"seconds": time.time() - t0}))
    return root


def checkpoint_model(ckpt: Path, sft: Path, dest: Path) -> Path:
    """An HF folder holding the actor of a trainer checkpoint (the SFT model's architecture and tokenizer)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rto.models import PolicyModel

    lm = AutoModelForCausalLM.from_pretrained(sft)
    state = {"actor": PolicyModel(lm).state_dict()}  # the trainer saves the actor as PolicyModel(lm)
    dcp.load(state, checkpoint_id=str(ckpt))  # into these tensors, in place
    lm.save_pretrained(dest)
    AutoTokenizer.from_pretrained(sft).save_pretrained(dest)
    return dest


def code_version() -> str | None:
    """The frozen code's digest (study_horizon.freeze_code writes it next to the packages)."""
    marker = Path(__file__).resolve().parent / "CODE_SHA256"
    return marker.read_text().strip() if marker.is_file() else None


def main(spec: dict) -> None:
    import rto
    from rto.config import load_config
    from rto.data import load_rows, tokenize_prompts
    from rto.models import load_tokenizer
    from rto.pipeline import evaluate_model, gold_metrics, response_cap, world_limits
    from rto.toy import load_world
    from rto.trainers import ppo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("run %s with rto from %s (code %s)", spec, Path(rto.__file__).parent, code_version())
    out, L, seed, arm, v = Path(spec["out"]), spec["L"], spec["seed"], spec["arm"], spec["variant"]
    root = build_world(out, L, seed)
    world = load_world(root / "world")
    pipe = load_config("pipeline", "toy", [f"world.kind={world.kind}", f"world.length={L}", f"seed={seed}"])
    d = run_dir(out, L, seed, arm, v)
    overrides = [
        *ARMS[arm],
        f"actor.path={root / 'sft' / 'hf'}",
        f"reward={root / 'rm' / 'hf'}",
        f"data.path={root / 'world' / 'prompts.jsonl'}",
        f"actor_optim.lr={v['lr']}",
        f"run.output_dir={d.parent}",
        f"run.name={d.name}",
        "run.resume=auto",
        f"run.keep_last={STEPS}",  # all: a preemption's checkpoint must not push out a held-out evaluation point
        "run.progress=false",
        "run.tensorboard=false",
        f"train.seed={seed}",
        f"train.steps={STEPS}",
        f"train.save_every={STEPS // CHECKPOINTS}",
        "train.log_every=1",
        "parallel.single_rank_fsdp=true",  # the one-rank FSDP2 path every run of the study has trained on
        *world_limits(world, pipe)["ppo"],
    ]
    if "dpo" in v:
        overrides += [f"dpo={root / 'dpo' / 'hf'}", f"rewards.dpo_scale={v['dpo']}", f"rewards.dpo_clip={v['dpo']}"]
    if "support" in v:  # the support-aware DPO term
        overrides.append(f"rewards.dpo_support={v['support']}")
    cfg = load_config("ppo", "toy", overrides)
    tok = load_tokenizer(cfg.actor)
    probe = gold_metrics(tok, world)
    t0 = time.time()
    with probe.watching(ppo):
        ppo.main(cfg, rollout_metrics=probe)
    train_s = time.time() - t0

    eval_path = str(root / "world" / "eval_prompts.jsonl")
    prompts, _ = tokenize_prompts(load_rows(eval_path, "train"), tok, cfg.data, eval_path)
    kw = dict(temperature=pipe.eval_temperature, max_new_tokens=response_cap(world, pipe), seed=seed)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(1, CHECKPOINTS + 1):
            step = k * STEPS // CHECKPOINTS
            if k < CHECKPOINTS:
                path = checkpoint_model(d / "checkpoints" / f"step_{step:08d}", root / "sft" / "hf", Path(tmp) / str(k))
            else:
                path = d / "hf" / "actor"
            metrics, _ = evaluate_model(str(path), str(root / "rm" / "hf"), prompts, tok, world, **kw)
            points.append({"step": step, **metrics})
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "rollout/gold_reward" in r}  # a resumed run logs some steps twice
    curve = [{k: r[k] for k in r if k == "step" or k.startswith("rollout/")} for _, r in sorted(by_step.items())]
    samples = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    sft = json.loads((root / "results.json").read_text())["sft"]
    result = {
        **{k: spec[k] for k in ("phase", "L", "seed", "arm", "variant")},
        "overrides": overrides,
        "samples_per_step": samples,
        "steps": STEPS,
        "sft_heldout": sft,
        "heldout": points,
        "heldout_gold": [p["gold_reward"] for p in points],
        "curve": curve,
        "train_seconds": train_s,
        "eval_seconds": time.time() - t0 - train_s,
        "code_sha256": code_version(),
    }
    (d / "result.tmp").write_text(json.dumps(result))
    (d / "result.tmp").rename(d / "result.json")
    shutil.rmtree(d / "checkpoints", ignore_errors=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
