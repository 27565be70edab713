"""`rto pipeline --recipe toy`: the whole pipeline on the embedded toy world, ending with a report.

Stages (each an ordinary trainer run under runs/<name>/<stage>/, with its own metrics and HF export):
    world -> sft -> rm (from the SFT model) -> dpo family (from SFT; `dpo` is also RTO's DPO model)
          -> ppo and rto (from SFT, the RM as critic init) -> evaluation on held-out prompts -> report
`world.kind=bag|chain` picks the toy world (rto/toy.py; `world.length=L` is the chain world's answer length,
which sets the stages' length limits: WORLD_LIMITS). Stage settings come from the recipe's sft/rm/dpo/ppo
sections; `sft.optim.lr=...`-style overrides reach one stage, other overrides set the pipeline's own settings
(`--help-config`). The report (report.md, PNG plots) shows gold reward against rollout samples for the online
methods and a table in the paper's shape. Every online run also logs the mechanism metrics of `GoldProbe`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

import rto_kernels
from rto.config import DataConfig, ModelConfig, PipelineConfig, load_config, recipe_path
from rto.evaluate import generate, reward_scores, win_rate
from rto.models import load_tokenizer
from rto.rollout.engine import RolloutBatch
from rto.toy import World, out_of_support, response_token_gold, topic_of

log = logging.getLogger(__name__)
STAGES = ("sft", "rm", "dpo", "ppo")
# A short run (CI): enough steps per stage for each stage's effect to show, in about a minute on 2 cores.
QUICK = {
    "sft": ["train.max_steps=120"],
    "rm": ["train.max_steps=90"],
    "dpo": ["train.max_steps=90"],
    "ppo": ["train.steps=80"],
}
LABELS = {
    **{"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "rdpo": "R-DPO", "simpo": "SimPO", "tdpo": "TDPO"},
    **{"ppo": "PPO", "rto": "RTO", "rs-ppo": "RS-PPO", "ddpo": "DDPO"},
}


def world_of(cfg: PipelineConfig) -> World:
    return World(cfg.world.kind, cfg.seed, cfg.world.length)


def response_cap(world: World, cfg: PipelineConfig) -> int:
    """Most new tokens per response, in rollouts and evaluation: twice the answers the writer produces."""
    return cfg.eval_max_new_tokens if world.kind == "bag" else max(cfg.eval_max_new_tokens, 2 * world.length)


def world_limits(world: World, cfg: PipelineConfig) -> dict[str, list[str]]:
    """Length settings per stage that the chain world's answers need (the recipe's fit the bag world's)."""
    if world.kind == "bag":
        return {s: [] for s in STAGES}
    offline = [f"data.max_length={max(96, 64 + 2 * world.length)}"]  # prompts <= 48 tokens, answers <= L + 1
    return {
        "sft": offline,
        "rm": offline,
        "dpo": offline,
        "ppo": [f"rollout.max_new_tokens={response_cap(world, cfg)}"],
    }


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


def masked_corr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """Pearson correlation of x and y [B, T] over the masked entries (0 when either is constant there)."""
    a, b = x[mask].double(), y[mask].double()  # [N]
    a, b = a - a.mean(), b - b.mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else 0.0


class GoldProbe:
    """The rollout hook of the PPO loop on a toy world: per-sequence values [B], logged as their mean.

    Always: the gold reward; the out-of-support token rate (tokens no writer ever used); in the chain world the
    good and bad shares of the transitions between two adjacent topic words. Batch-level rates and correlations
    are returned as a constant [B] vector, so their logged mean is the batch's value (with several ranks, the
    mean over ranks). When the step's scored rollout, advantages and config reach the hook (as arguments, or
    recorded from the trainer by `watching`), also the correlation with the gold per-token share of: the
    advantages, the clipped DPO token term and the raw DPO log-ratio; and, in runs with a DPO model, the
    correlation of the advantages with the PPO advantages of the same rollout (RTO vs PPO)."""

    def __init__(self, tok, world: World):
        self.tok, self.world, self.recorded = tok, world, None

    def rows(self, batch: RolloutBatch) -> list[tuple[str, list[int]]]:
        """(topic, response token ids) of every row."""
        out = []
        for ids, resp, attn in zip(
            batch.input_ids.tolist(), batch.response_mask.tolist(), batch.attention_mask.tolist()
        ):
            prompt = [t for t, r, a in zip(ids, resp, attn) if a and not r]
            topic = topic_of(self.tok.decode(prompt, skip_special_tokens=True))
            out.append((topic, [t for t, r in zip(ids, resp) if r]))
        return out

    def __call__(self, batch: RolloutBatch, scored=None, advantages=None, cfg=None) -> dict[str, torch.Tensor]:
        mask = batch.response_mask.cpu()  # [B, T]
        gold = torch.zeros(mask.shape)  # [B, T]: the gold per-token share at the response tokens
        outside, good, bad, pairs = 0, 0, 0, 0
        for b, (topic, response) in enumerate(self.rows(batch)):
            tokens = self.tok.convert_ids_to_tokens(response)
            gold[b, mask[b]] = torch.tensor(self.world.token_gold(topic, tokens))
            outside += sum(out_of_support(tokens))
            if self.world.kind == "chain":
                g, w, p = self.world.transitions(topic, tokens)
                good, bad, pairs = good + g, bad + w, pairs + p
        rates = {"out_of_support_rate": outside / max(1, int(mask.sum()))}
        if self.world.kind == "chain":
            rates.update(good_transition_share=good / max(pairs, 1), bad_transition_share=bad / max(pairs, 1))
        if scored is None and self.recorded is not None and self.recorded[1] is batch.response_mask:
            scored, _, cfg, advantages = self.recorded
        if scored is not None and advantages is not None and cfg is not None:
            rates.update(self.correlations(batch, gold, scored, advantages, cfg))
        out = {"gold_reward": gold.sum(1)}
        out.update({k: torch.full((mask.shape[0],), float(v)) for k, v in rates.items()})
        return out

    def correlations(self, batch: RolloutBatch, gold: torch.Tensor, scored, advantages, cfg) -> dict[str, float]:
        from rto.advantages import compute_advantages

        mask = batch.response_mask
        gold = gold.to(mask.device)
        out = {"gold_corr_advantages": masked_corr(advantages, gold, mask)}
        if scored.logp_dpo is not None:
            r = cfg.rewards
            term = rto_kernels.dpo_token_reward(scored.logp_dpo, scored.logp_ref, scale=r.dpo_scale, clip=r.dpo_clip)
            out["gold_corr_dpo_term"] = masked_corr(term, gold, mask)
            out["gold_corr_dpo_logratio"] = masked_corr(scored.logp_dpo - scored.logp_ref, gold, mask)
            if cfg.algo != "ppo":
                _, ppo_adv, _ = compute_advantages(scored, mask, dataclasses.replace(cfg, algo="ppo"))
                out["advantages_corr_ppo"] = masked_corr(advantages, ppo_adv, mask)
        return out

    @contextmanager
    def watching(self, trainer_module):
        """Record each step's (scored, mask, cfg, advantages) from the trainer module's `compute_advantages`,
        for the hook call that follows it in the same step; a module without it is left alone."""
        original = getattr(trainer_module, "compute_advantages", None)
        if original is None:
            yield self
            return

        def recording(scored, mask, cfg):
            out = original(scored, mask, cfg)
            self.recorded = (scored, mask, cfg, out[1])
            return out

        trainer_module.compute_advantages = recording
        try:
            yield self
        finally:
            trainer_module.compute_advantages = original
            self.recorded = None


def gold_metrics(tok, world: World | None = None) -> GoldProbe:
    """The rollout hook of the PPO loop for a toy world (the bag world by default)."""
    return GoldProbe(tok, world or World())


def run_pipeline(cfg: PipelineConfig, recipe: str, stage_overrides: dict[str, list[str]]) -> dict:
    from rto import toy
    from rto.trainers import dpo, ppo, rm, sft

    root = Path(cfg.output_dir) / cfg.name
    w = cfg.world
    log.info("== building the toy world (%s) in %s", w.kind, root / "world")
    sizes = {k: getattr(w, k) for k in ("n_sft", "n_pairs", "n_prompts", "n_eval", "bt_beta", "hidden", "layers")}
    files = toy.build_world(root / "world", seed=cfg.seed, kind=w.kind, length=w.length, **sizes)
    limits = world_limits(world_of(cfg), cfg)

    def stage(command: str, name: str, *extra: str):
        quick = QUICK[command] if cfg.quick else []
        common = [f"run.output_dir={root}", f"run.name={name}", f"train.seed={cfg.seed}", *limits[command]]
        log.info("== %s (%s)", name, command)
        return load_config(command, recipe, [*extra, *common, *quick, *stage_overrides[command]])

    prefs = [f"data.path={files['prefs']}", f"data.eval_path={files['prefs_eval']}"]
    sft.main(stage("sft", "sft", f"model.path={files['base']}", f"data.path={files['sft']}"))
    models = {"sft": str(root / "sft" / "hf")}
    rm.main(stage("rm", "rm", f"model.path={models['sft']}", *prefs))
    reward = str(root / "rm" / "hf")
    losses = list(dict.fromkeys(cfg.baselines + (["dpo"] if "rto" in cfg.online else [])))
    for loss in losses:
        dpo.main(
            stage("dpo", loss, f"loss={loss}", f"model.path={models['sft']}", *prefs, *cfg.loss_overrides.get(loss, []))
        )
        if loss in cfg.baselines:
            models[loss] = str(root / loss / "hf")
    tok = load_tokenizer(ModelConfig(path=models["sft"]))
    probe = gold_metrics(tok, world_of(cfg))
    for algo in cfg.online:
        extra = [f"dpo={root / 'dpo' / 'hf'}"] if algo != "ppo" else []
        paths = [f"actor.path={models['sft']}", f"reward={reward}", f"data.path={files['prompts']}", *extra]
        with probe.watching(ppo):
            ppo.main(stage("ppo", algo, f"algo={algo}", *paths), rollout_metrics=probe)
        models[algo] = str(root / algo / "hf" / "actor")
    results = evaluate_all(models, reward, files["eval_prompts"], tok, cfg)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    report(root, results, cfg)
    log.info("== report: %s", root / "report.md")
    return results


def evaluate_model(
    path: str,
    reward: str | None,
    prompts: list[list[int]],
    tok,
    world: World,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> tuple[dict, list[float]]:
    """One model on prompts: mean gold reward, RM score (when `reward` is given), length and out-of-support
    token rate; also the per-prompt gold rewards (for win rates)."""
    samples = generate(path, prompts, tok, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    gold = [sum(response_token_gold(s.prompt_ids, s.response_ids, tok, world)) for s in samples]
    tokens = [tok.convert_ids_to_tokens(s.response_ids) for s in samples]
    outside = sum(sum(out_of_support(t)) for t in tokens)
    out = {
        "gold_reward": statistics.fmean(gold),
        "mean_length": statistics.fmean(len(t) for t in tokens),
        "out_of_support_rate": outside / max(1, sum(len(t) for t in tokens)),
    }
    if reward is not None:
        out["rm_score"] = statistics.fmean(reward_scores(reward, samples, tok))
    return out, gold


def evaluate_all(models: dict[str, str], reward: str, prompts_path: str, tok, cfg: PipelineConfig) -> dict:
    """Every model on the held-out prompts: gold reward, win rate against SFT under gold, RM score, length."""
    from rto.data import load_rows, tokenize_prompts

    prompts, _ = tokenize_prompts(load_rows(prompts_path, "train"), tok, DataConfig(path=prompts_path), prompts_path)
    world = world_of(cfg)
    kw = dict(temperature=cfg.eval_temperature, max_new_tokens=response_cap(world, cfg), seed=cfg.seed)
    out = {}
    sft_gold = None
    for name, path in models.items():
        out[name], gold = evaluate_model(path, reward, prompts, tok, world, **kw)
        sft_gold = gold if name == "sft" else sft_gold
        out[name]["win_rate_vs_sft"], out[name]["win_rate_ci95"] = win_rate(gold, sft_gold)
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
    samples = [r["step"] * per_step for r in rows]
    return samples, [r["rollout/gold_reward"] for r in rows], [r["rollout/score"] for r in rows]


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

    w = cfg.world
    world = "bag world" if w.kind == "bag" else f"chain world, answers of L = {w.length} words"
    short = " (short run: rto/pipeline.py QUICK steps per stage)" if cfg.quick else ""
    lines = [
        f"# Toy-world report: {cfg.name}",
        "",
        f"Seed {cfg.seed}, {world}; {w.n_eval} held-out prompts, sampled at temperature {cfg.eval_temperature}"
        f"{short}. Gold reward is the toy world's known judgement; win rate is against the SFT model's responses "
        "to the same prompts under the gold reward (ties count one half; 95% interval over prompts); RM score is "
        "the learned reward model's; out of support: the share of response tokens no writer ever used.",
        "",
        "| model | gold reward | win rate vs SFT (gold) | RM score | mean length (tokens) | out of support |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        win = f"{r['win_rate_vs_sft']:.3f} ± {r['win_rate_ci95']:.3f}"
        lines.append(
            f"| {LABELS.get(name, name)} | {r['gold_reward']:.3f} | {win} | {r['rm_score']:.3f} | "
            f"{r['mean_length']:.1f} | {r['out_of_support_rate']:.3f} |"
        )
    lines += ["", "![gold reward and RM score of the online runs' rollouts](gold_reward.png)", ""]
    (root / "report.md").write_text("\n".join(lines))


def main(cfg: PipelineConfig, recipe: str, stage_overrides: dict[str, list[str]]) -> dict:
    recipe_path(recipe)  # a bad recipe name fails before anything runs
    world_of(cfg)  # a bad world.kind or world.length fails before anything runs
    required = {"ppo": ["actor.path=x", "reward=x", "dpo=x", "data.path=x"]}
    for command, extra in stage_overrides.items():  # stage overrides are checked before the world is built
        if extra:
            load_config(command, recipe, required.get(command, ["model.path=x", "data.path=x"]) + extra)
    return run_pipeline(cfg, recipe, stage_overrides)
