"""The paper's comparison on the toy world: PPO vs RTO (and RS-PPO, DDPO) at equal rollout budgets, over seeds.

Run:  python benchmarks/reproduce_toy.py --seeds 0 1 2          (each seed: `rto pipeline --recipe toy seed=S`)
      python benchmarks/reproduce_toy.py --seeds 0 1 2 --aggregate-only   (re-read finished runs)
A seed whose results.json exists is skipped, so an interrupted reproduction goes on where it stopped.

Each seed builds its own world and trains its own SFT, RM and DPO models, then every method from them, so the
spread covers the whole pipeline. Results: benchmarks/results/toy_reproduction_<date>.{json,md,png}. The claims
tested: RTO ends above PPO (held-out gold reward, win rate vs SFT), and RTO reaches PPO's final rollout gold
reward with a fraction of the samples. Nothing is tuned per seed; the report says what the runs show.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

from study_horizon_report import t_ci  # benchmarks/ is on the path: this file runs as a script

RESULTS = Path(__file__).resolve().parent / "results"
ONLINE = ["ppo", "rto", "rs-ppo", "ddpo"]
LABELS = {
    **{"sft": "SFT", "dpo": "DPO", "rdpo": "R-DPO", "simpo": "SimPO", "tdpo": "TDPO"},
    **{"ppo": "PPO", "rto": "RTO", "rs-ppo": "RS-PPO", "ddpo": "DDPO"},
}


def run_seed(seed: int, out: Path) -> None:
    """One seed's whole pipeline; a seed whose results.json exists is finished and skipped (so the reproduction
    can be run in parts)."""
    if (out / f"seed{seed}" / "results.json").exists():
        print(f"seed {seed}: finished ({out / f'seed{seed}' / 'results.json'}), skipped", flush=True)
        return
    settings = [f"seed={seed}", f"name=seed{seed}", f"output_dir={out}", f"online=[{','.join(ONLINE)}]"]
    cmd = [sys.executable, "-m", "rto", "pipeline", "--recipe", "toy", *settings]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    from rto.pipeline import curves

    x, gold, _ = curves(run_dir)
    return x, gold


def smooth(y: list[float], k: int = 3) -> list[float]:
    return [statistics.fmean(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]


def samples_to_reach(x: list[int], y: list[float], target: float) -> int | None:
    """First sample count at which the smoothed curve reaches target (None: never)."""
    for xi, yi in zip(x, smooth(y)):
        if yi >= target:
            return xi
    return None


def mean_sd(v: list[float]) -> str:
    return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def aggregate(seeds: list[int], out: Path) -> dict:
    per_seed = {s: json.loads((out / f"seed{s}" / "results.json").read_text()) for s in seeds}
    methods = list(per_seed[seeds[0]])
    table = {m: {k: [per_seed[s][m][k] for s in seeds] for k in per_seed[seeds[0]][m]} for m in methods}
    curves_ = {a: {s: curve(out / f"seed{s}" / a) for s in seeds} for a in ONLINE}
    # sample efficiency: samples RTO needs to reach PPO's final (smoothed) rollout gold reward, per seed
    reach = {}
    for s in seeds:
        px, py = curves_["ppo"][s]
        target = smooth(py)[-1]
        rx, ry = curves_["rto"][s]
        # control: when PPO itself first reached its own final value (a plateau makes both numbers small)
        reach[s] = {
            "ppo_final_gold": target,
            "ppo_samples": px[-1],
            "rto_samples_to_reach": samples_to_reach(rx, ry, target),
            "ppo_samples_to_reach": samples_to_reach(px, py, target),
        }
    from omegaconf import OmegaConf

    from rto.pipeline import samples_per_step

    run = out / f"seed{seeds[0]}" / "ppo"
    steps, prompts = OmegaConf.load(run / "config.yaml").train.steps, samples_per_step(run)
    budget = f"{steps} rollout steps x {prompts} samples ({steps * prompts} samples)"
    final = {a: [smooth(curves_[a][s][1])[-1] for s in seeds] for a in ONLINE}
    curves_json = {a: {str(s): curves_[a][s] for s in seeds} for a in ONLINE}
    return {
        "seeds": seeds,
        "table": table,
        "reach": reach,
        "budget": budget,
        "final_rollout_gold": final,
        "curves": curves_json,
    }


def write(result: dict, out: Path, command: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    date = dt.date.today().isoformat()
    stem = RESULTS / f"toy_reproduction_{date}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    seeds = result["seeds"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a in ONLINE:
        xs = result["curves"][a][str(seeds[0])][0]
        ys = [statistics.fmean(result["curves"][a][str(s)][1][i] for s in seeds) for i in range(len(xs))]
        ax.plot(xs, smooth(ys), label=LABELS[a])
    ylabel = "gold reward of rollouts (mean over seeds, smoothed)"
    ax.set(xlabel="rollout samples", ylabel=ylabel, title=f"toy world, {len(seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)

    t = result["table"]
    lines = [
        f"# Toy-world reproduction: PPO vs RTO, {len(seeds)} seeds ({date})",
        "",
        f"Command: `{command}`",
        "",
        "Each seed builds its own world and trains SFT, RM, DPO and every method from them; mean ± standard "
        "deviation over seeds. Held-out evaluation: 128 prompts, temperature 0.7; gold reward is the toy "
        "world's known judgement, win rate is against the SFT model under the gold reward, RM score is the "
        f"learned reward model's. Online methods: {result['budget']} each.",
        "",
        "| model | gold reward | win rate vs SFT (gold) | RM score | mean length |",
        "|---|---|---|---|---|",
    ]
    for m, r in t.items():
        cells = [mean_sd(r[k]) for k in ("gold_reward", "win_rate_vs_sft", "rm_score", "mean_length")]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Held-out gold reward against PPO, paired by seed (the same world): per-seed differences, their mean and "
        f"95% t interval ({len(seeds)} seeds, so the interval is wide):",
        "",
    ]
    for m in t:
        if m != "ppo" and len(seeds) > 1:
            d = [a - b for a, b in zip(t[m]["gold_reward"], t["ppo"]["gold_reward"])]
            lo, hi = t_ci(d)
            side = "includes 0" if lo <= 0 <= hi else "excludes 0"
            cells = ", ".join(f"{x:+.3f}" for x in d)
            lines.append(
                f"- {LABELS.get(m, m)} - PPO: {cells}; mean {statistics.fmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}] ({side})"
            )
    lines += ["", "Final rollout gold reward (smoothed over the last 3 logged steps) per seed:", ""]
    for a, v in result["final_rollout_gold"].items():
        lines.append(f"- {LABELS[a]}: {', '.join(f'{x:.2f}' for x in v)} (mean {statistics.fmean(v):.2f})")
    lines += [
        "",
        "Samples RTO needs to reach PPO's final rollout gold reward (smoothed), with PPO's own first arrival "
        "at that value as the control:",
        "",
    ]
    for s, r in result["reach"].items():
        got = r["rto_samples_to_reach"]
        frac = f"{got / r['ppo_samples']:.2f} of PPO's {r['ppo_samples']}" if got else "not reached"
        own = r["ppo_samples_to_reach"]
        lines.append(
            f"- seed {s}: PPO final {r['ppo_final_gold']:.2f}; RTO reached it after {got} samples ({frac}); "
            f"PPO itself first reached it after {own} samples ({own / r['ppo_samples']:.2f})"
        )
    lines += ["", f"![gold reward vs samples]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return stem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduction"))
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()
    if not args.aggregate_only:
        for s in args.seeds:
            run_seed(s, args.out)
    command = f"python benchmarks/reproduce_toy.py --seeds {' '.join(map(str, args.seeds))}"
    stem = write(aggregate(args.seeds, args.out), args.out, command)
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
