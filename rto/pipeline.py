"""`rto pipeline --recipe toy`: the whole pipeline on the embedded toy world, ending with a report.

Stages (each an ordinary trainer run under runs/<name>/<stage>/, with its own metrics and HF export):
    world -> sft -> rm (from the SFT model) -> dpo family (from SFT; `dpo` is also RTO's DPO model)
          -> ppo and rto (from SFT, the RM as critic init) -> evaluation on held-out prompts -> report
Stage settings come from the recipe's sft/rm/dpo/ppo sections; `sft.optim.lr=...`-style overrides reach one
stage, other overrides set the pipeline's own settings (`--help-config`). The report (report.md, PNG plots)
shows gold reward against rollout samples for the online methods and a table in the paper's shape.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rto.config import DataConfig, ModelConfig, PipelineConfig, load_config, recipe_path
from rto.evaluate import generate, reward_scores, win_rate
from rto.models import load_tokenizer
from rto.rollout.engine import RolloutBatch

log = logging.getLogger(__name__)
STAGES = ("sft", "rm", "dpo", "ppo")
# A short run (CI): enough steps per stage for each stage's effect to show, in about a minute on 2 cores.
QUICK = {
    "sft": ["train.max_steps=120"],
    "rm": ["train.max_steps=90"],
    "dpo": ["train.max_steps=90"],
    "ppo": ["train.steps=80"],
}
LABELS = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "rdpo": "R-DPO", "simpo": "SimPO", "tdpo": "TDPO", "ppo": "PPO",
          "rto": "RTO", "rs-ppo": "RS-PPO", "ddpo": "DDPO"}  # fmt: skip


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Pipeline overrides, and per-stage ones (`sft.optim.lr=1e-3` -> stage sft gets `optim.lr=1e-3`)."""
    own, stages = [], {s: [] for s in STAGES}
    for o in overrides:
        head, _, rest = o.partition(".")
        if head in stages and rest:
            stages[head].append(rest)
        else:
            own.append(o)
    return own, stages


def gold_metrics(tok):
    """The rollout hook of the PPO loop: the toy gold reward of every sampled response."""
    from rto.toy import response_gold

    def hook(batch: RolloutBatch) -> dict[str, torch.Tensor]:
        golds = []
        for ids, resp, attn in zip(batch.input_ids.tolist(), batch.response_mask.tolist(),
                                   batch.attention_mask.tolist()):  # fmt: skip
            prompt = [t for t, r, a in zip(ids, resp, attn) if a and not r]
            response = [t for t, r in zip(ids, resp) if r]
            golds.append(response_gold(prompt, response, tok))
        return {"gold_reward": torch.tensor(golds)}

    return hook


def run_pipeline(cfg: PipelineConfig, recipe: str, stage_overrides: dict[str, list[str]]) -> dict:
    from rto import toy
    from rto.trainers import dpo, ppo, rm, sft

    root = Path(cfg.output_dir) / cfg.name
    w = cfg.world
    log.info("== building the toy world in %s", root / "world")
    world = toy.build_world(root / "world", seed=cfg.seed, n_sft=w.n_sft, n_pairs=w.n_pairs, n_prompts=w.n_prompts,
                            n_eval=w.n_eval, bt_beta=w.bt_beta, hidden=w.hidden, layers=w.layers)  # fmt: skip

    def stage(command: str, name: str, *extra: str):
        overrides = [*extra, f"run.output_dir={root}", f"run.name={name}", f"train.seed={cfg.seed}",
                     *(QUICK[command] if cfg.quick else []), *stage_overrides[command]]  # fmt: skip
        log.info("== %s (%s)", name, command)
        return load_config(command, recipe, overrides)

    sft.main(stage("sft", "sft", f"model.path={world['base']}", f"data.path={world['sft']}"))
    models = {"sft": str(root / "sft" / "hf")}
    rm.main(stage("rm", "rm", f"model.path={models['sft']}", f"data.path={world['prefs']}",
                  f"data.eval_path={world['prefs_eval']}"))  # fmt: skip
    reward = str(root / "rm" / "hf")
    losses = list(dict.fromkeys(cfg.baselines + (["dpo"] if "rto" in cfg.online else [])))
    for loss in losses:
        dpo.main(stage("dpo", loss, f"loss={loss}", f"model.path={models['sft']}", f"data.path={world['prefs']}",
                       f"data.eval_path={world['prefs_eval']}", *cfg.loss_overrides.get(loss, [])))  # fmt: skip
        if loss in cfg.baselines:
            models[loss] = str(root / loss / "hf")
    tok = load_tokenizer(ModelConfig(path=models["sft"]))
    for algo in cfg.online:
        extra = [f"dpo={root / 'dpo' / 'hf'}"] if algo != "ppo" else []
        ppo.main(stage("ppo", algo, f"algo={algo}", f"actor.path={models['sft']}", f"reward={reward}",
                       f"data.path={world['prompts']}", *extra), rollout_metrics=gold_metrics(tok))  # fmt: skip
        models[algo] = str(root / algo / "hf" / "actor")
    results = evaluate_all(models, reward, world["eval_prompts"], tok, cfg)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    report(root, results, cfg)
    log.info("== report: %s", root / "report.md")
    return results


def evaluate_all(models: dict[str, str], reward: str, prompts_path: str, tok, cfg: PipelineConfig) -> dict:
    """Every model on the held-out prompts: gold reward, win rate against SFT under gold, RM score, length."""
    from rto.data import load_rows, tokenize_prompts
    from rto.toy import response_gold

    prompts, _ = tokenize_prompts(load_rows(prompts_path, "train"), tok, DataConfig(path=prompts_path), prompts_path)
    kw = dict(temperature=cfg.eval_temperature, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
    out = {}
    sft_gold = None
    for name, path in models.items():
        samples = generate(path, prompts, tok, **kw)
        gold = [response_gold(s.prompt_ids, s.response_ids, tok) for s in samples]
        sft_gold = gold if name == "sft" else sft_gold
        rate, half = win_rate(gold, sft_gold)
        out[name] = {"gold_reward": statistics.fmean(gold), "win_rate_vs_sft": rate, "win_rate_ci95": half,
                     "rm_score": statistics.fmean(reward_scores(reward, samples, tok)),
                     "mean_length": statistics.fmean(len(s.response_ids) for s in samples)}  # fmt: skip
        log.info("eval %s: %s", name, out[name])
    return out


def samples_per_step(run_dir: Path) -> int:
    """Rollout samples per step of an online run, from the config.yaml it wrote."""
    rollout = OmegaConf.load(run_dir / "config.yaml").rollout
    return rollout.prompts_per_step * rollout.samples_per_prompt


def curves(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """Rollout samples seen, gold reward and RM score per logged step of an online run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = samples_per_step(run_dir)
    rows = [r for r in rows if "rollout/gold_reward" in r]
    return ([r["step"] * per_step for r in rows], [r["rollout/gold_reward"] for r in rows],
            [r["rollout/score"] for r in rows])  # fmt: skip


def report(root: Path, results: dict, cfg: PipelineConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for algo in cfg.online:
        x, gold, score = curves(root / algo)
        axes[0].plot(x, gold, label=LABELS[algo])
        axes[1].plot(x, score, label=LABELS[algo])
    # the first points are the SFT model's own rollouts (same sampling settings as every later point)
    axes[0].set(xlabel="rollout samples", ylabel="gold reward (rollouts)", title="gold reward vs samples")
    axes[1].set(xlabel="rollout samples", ylabel="reward-model score (rollouts)", title="RM score vs samples")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "gold_reward.png", dpi=120)
    plt.close(fig)

    lines = [f"# Toy-world report: {cfg.name}", "",
             f"Seed {cfg.seed}; {cfg.world.n_eval} held-out prompts, sampled at temperature {cfg.eval_temperature}"
             f"{' (short run: rto/pipeline.py QUICK steps per stage)' if cfg.quick else ''}. Gold reward is the toy "
             "world's known judgement; win rate is against the SFT model's responses to the same prompts under the "
             "gold reward (ties count one half; 95% interval over prompts); RM score is the learned reward model's.",
             "", "| model | gold reward | win rate vs SFT (gold) | RM score | mean length (tokens) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {LABELS.get(name, name)} | {r['gold_reward']:.3f} | {r['win_rate_vs_sft']:.3f} "
                     f"± {r['win_rate_ci95']:.3f} | {r['rm_score']:.3f} | {r['mean_length']:.1f} |")  # fmt: skip
    lines += ["", "![gold reward and RM score of the online runs' rollouts](gold_reward.png)", ""]
    (root / "report.md").write_text("\n".join(lines))


def main(cfg: PipelineConfig, recipe: str, stage_overrides: dict[str, list[str]]) -> dict:
    recipe_path(recipe)  # a bad recipe name fails before anything runs
    required = {"ppo": ["actor.path=x", "reward=x", "dpo=x", "data.path=x"]}
    for command, extra in stage_overrides.items():  # stage overrides are checked before the world is built
        if extra:
            load_config(command, recipe, required.get(command, ["model.path=x", "data.path=x"]) + extra)
    return run_pipeline(cfg, recipe, stage_overrides)
