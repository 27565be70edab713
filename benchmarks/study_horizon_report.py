"""Aggregate the horizon study's finished runs (benchmarks/study_horizon.py) into md, json and png.

Whatever exists is aggregated: a table says how many seeds it holds, and a comparison that is not complete yet
says so. Statistics: mean +- sd over world seeds; paired (same-world) differences against PPO with a percentile
bootstrap 95% interval (10,000 resamples of the seeds) and a t interval; the held-out gold curve's area (mean gold
over the budget, trapezoid over SFT and the 4 checkpoints); samples until the smoothed rollout gain over the SFT
policy first reaches 80% of the best arm's final gain at that length.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import statistics
from pathlib import Path

from study_horizon import ARMS, STEPS, Study, default_variant, tuning_score, variant_name

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SMOOTH = 10  # rollout steps in the trailing mean of the sample-efficiency measure
MECHANISM = ("gold_corr_dpo_term", "gold_corr_dpo_logratio", "gold_corr_advantages", "advantages_corr_ppo")


def mean_sd(v: list[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def bootstrap_ci(v: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(v, k=len(v))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def t_ci(v: list[float]) -> tuple[float, float]:
    half = T975.get(len(v) - 1, 1.96) * statistics.stdev(v) / math.sqrt(len(v))
    return statistics.fmean(v) - half, statistics.fmean(v) + half


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """a - b over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "diffs": d, "mean": statistics.fmean(d), "bootstrap95": bootstrap_ci(d), "t95": t_ci(d)}


def summarise(r: dict) -> dict:
    """One run's numbers."""
    per = r["samples_per_step"]
    budget = r["steps"] * per
    xs = [0] + [p["step"] * per for p in r["heldout"]]
    ys = [r["sft_heldout"]["gold_reward"]] + r["heldout_gold"]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])) / budget
    gold = [c["rollout/gold_reward"] for c in r["curve"]]
    smooth = [statistics.fmean(gold[max(0, i - SMOOTH + 1) : i + 1]) for i in range(len(gold))]
    last = r["curve"][-SMOOTH:]
    out = {
        "final_gold": r["heldout_gold"][-1],
        "peak_gold": max(r["heldout_gold"]),
        "heldout_curve": list(zip(xs, ys)),
        "area": area,
        "gain_curve": [(c["step"] * per, g - gold[0]) for c, g in zip(r["curve"], smooth)],
        "final_rollout_gain": smooth[-1] - gold[0],
        "length": r["heldout"][-1]["mean_length"],
        "out_of_support": r["heldout"][-1]["out_of_support_rate"],
        "kl_ref": statistics.fmean(c["rollout/kl_ref_per_sequence"] for c in last),
        "rm_score": r["heldout"][-1].get("rm_score"),
        "good_share": statistics.fmean(c.get("rollout/good_transition_share", float("nan")) for c in last),
        "bad_share": statistics.fmean(c.get("rollout/bad_transition_share", float("nan")) for c in last),
        "minutes": (r["train_seconds"] + r["eval_seconds"]) / 60,
        "tuning_score": tuning_score(r),
    }
    for k in MECHANISM:
        v = [c[f"rollout/{k}"] for c in r["curve"] if f"rollout/{k}" in c]
        out[k] = statistics.fmean(v) if v else None
    return out


def collect(out: Path) -> dict:
    """(L, arm, variant name) -> {seed: summary} over every finished run."""
    runs: dict = {}
    for f in sorted(out.glob("L*/s*/runs/*/result.json")):
        r = json.loads(f.read_text())
        key = (r["L"], r["arm"], variant_name(r["variant"]))
        runs.setdefault(key, {})[r["seed"]] = summarise(r)
    return runs


def reach(summary: dict, target: float) -> int | None:
    return next((x for x, g in summary["gain_curve"] if g >= target), None)


def arm_runs(runs: dict, L: int, arm: str, variant: dict, seeds: list[int]) -> dict:
    per_seed = {s: v for s, v in runs.get((L, arm, variant_name(variant)), {}).items() if s in seeds}
    return {"variant": variant, "seeds": per_seed}


def compare(arms: dict, target: float | None) -> None:
    """Adds each arm's samples to reach `target` (per seed) and its paired differences from PPO."""
    ppo = arms.get("ppo", {"seeds": {}})["seeds"]
    for a in arms.values():
        a["reach80"] = {s: reach(v, target) for s, v in a["seeds"].items()} if target else {}
        for k in ("final_gold", "area"):
            a[f"vs_ppo_{k}"] = paired({s: v[k] for s, v in a["seeds"].items()}, {s: v[k] for s, v in ppo.items()})


def write_report(study: Study, dest: Path) -> str:
    """Aggregate every finished run under study.out into dest/horizon_study_chain.{json,md,png}."""
    runs = collect(study.out)
    lengths = [L for L in study.lengths if any(k[0] == L for k in runs)]
    eval_seeds, tune_seeds = list(study.eval_seeds), list(study.tune_seeds)
    result = {
        "date": dt.date.today().isoformat(),
        "out": str(study.out),
        "eval_seeds": eval_seeds,
        "tune_seeds": tune_seeds,
        "tune_lengths": list(study.tune_lengths),
        "lrs": list(study.lrs),
        "dpo_scales": list(study.dpo_scales),
        "steps": STEPS,
        "lengths": {},
    }
    for L in lengths:
        recipe, tuned = {}, {}
        for arm in ARMS:
            best = study.best_variant(L, arm)
            if arm in ("ppo", "rto"):
                recipe[arm] = arm_runs(runs, L, arm, default_variant(arm), eval_seeds)
            if best is not None:
                tuned[arm] = arm_runs(runs, L, arm, best, eval_seeds)
        gains = [
            statistics.fmean(v["final_rollout_gain"] for v in a["seeds"].values())
            for a in (*recipe.values(), *tuned.values())
            if a["seeds"]
        ]
        target = 0.8 * max(gains) if gains else None
        compare(recipe, target)
        compare(tuned, target)
        tuning = {}  # at the lengths swept
        for (at, arm, name), seeds in runs.items():
            scores = [v["tuning_score"] for s, v in seeds.items() if s in tune_seeds]
            if at == L and scores:
                tuning[f"{arm} {name}"] = statistics.fmean(scores)
        result["lengths"][str(L)] = {"recipe": recipe, "tuned": tuned, "target_gain80": target, "tuning": tuning}
    for r in result["lengths"].values():  # the dense rollout curves stay in the runs' own result.json
        for a in (*r["recipe"].values(), *r["tuned"].values()):
            for v in a["seeds"].values():
                v.pop("gain_curve", None)
    dest.mkdir(parents=True, exist_ok=True)
    stem = dest / "horizon_study_chain"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    figure(result, stem.with_suffix(".png"))
    return str(stem.with_suffix(".md"))


def interval(p: dict | None) -> str:
    if p is None:
        return "-"
    lo, hi = p["bootstrap95"]
    tlo, thi = p["t95"]
    side = "bootstrap excludes 0" if lo > 0 or hi < 0 else "bootstrap includes 0"
    return f"{p['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] ({side}; t: [{tlo:+.2f}, {thi:+.2f}]), n={len(p['seeds'])}"


def markdown(res: dict) -> str:
    lines = [
        f"# Horizon study: RTO vs PPO on the chain toy world ({res['date']})",
        "",
        "Command: `nice -n 15 python benchmarks/study_horizon.py --out /work/study_runs` (resumable; "
        "`--plan` lists the runs, `--aggregate` rewrites this file from what has finished).",
        "",
        "Chain world (rto/toy.py): the gold reward lives in transitions between topic words; answers of L words. "
        "Per world seed: its own world, SFT, reward model and DPO model; every arm trains from them for "
        f"{res['steps']} rollout steps x 32 samples and is evaluated on 128 held-out prompts (temperature 0.7) "
        "at 4 points. "
        f"Evaluation seeds {res['eval_seeds']}, tuning seeds {res['tune_seeds']} (the sweep picks each arm's "
        "setting by held-out gold on the tuning seeds only). "
        f"The sweep (actor lr {res['lrs']}; DPO scale = clip {res['dpo_scales']} for the DPO arms) ran at "
        f"L = {res['tune_lengths']} only; the other lengths take its choices. Differences are paired by world seed: "
        "mean, bootstrap 95% interval, and t interval; a difference is called ahead or behind only when both "
        "intervals exclude 0.",
    ]
    for L, r in res["lengths"].items():
        lines += ["", f"## L = {L}"]
        for title, arms in (
            ("At the recipe's settings (actor lr 1e-4; DPO scale = clip 0.05)", r["recipe"]),
            ("Each arm at its best setting of the sweep", r["tuned"]),
        ):
            lines += ["", f"{title}:", ""] + table(arms) if arms else ["", f"{title}: not measured yet."]
        arms = r["tuned"] or r["recipe"]
        lines += [
            "",
            "Mechanism (mean over training steps and seeds; correlations over the response tokens of "
            "each rollout batch, with the gold per-token share):",
            "",
            "| arm | DPO term vs gold | DPO log-ratio vs gold | advantages vs gold | advantages vs PPO's |",
            "|---|---|---|---|---|",
        ]
        for arm, a in arms.items():
            vals = []
            for k in MECHANISM:
                v = [x[k] for x in a["seeds"].values() if x.get(k) is not None]
                vals.append(f"{statistics.fmean(v):.3f}" if v else "-")
            lines.append(f"| {arm} | " + " | ".join(vals) + " |")
        if r["tuning"]:
            lines += [
                "",
                "Tuning (held-out gold, mean of the last two points over the tuning seeds): "
                + "; ".join(f"{k}: {v:.2f}" for k, v in sorted(r["tuning"].items())),
            ]
    lines += ["", "## What the runs show", ""] + verdict(res)
    lines += ["", "![held-out gold vs rollout samples per arm, one panel per horizon](horizon_study_chain.png)", ""]
    return "\n".join(lines)


def table(arms: dict) -> list[str]:
    lines = [
        "| arm | setting | seeds | final gold | vs PPO (final gold) | peak gold | gold area | vs PPO (area) | "
        "samples to 80% | length | KL | out of support | good / bad transitions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        s = a["seeds"]
        if not s:
            lines.append(f"| {arm} | {variant_name(a['variant'])} | 0 | not run yet ||||||||||")
            continue
        reached = [x for x in a["reach80"].values() if x is not None]
        reach = f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(s)})" if reached else f"never (0/{len(s)})"
        col = {k: [v[k] for v in s.values()] for k in next(iter(s.values()))}
        shares = f"{statistics.fmean(col['good_share']):.2f} / {statistics.fmean(col['bad_share']):.2f}"
        vs = {k: interval(a[f"vs_ppo_{k}"]) if arm != "ppo" else "" for k in ("final_gold", "area")}
        lines.append(
            f"| {arm} | {variant_name(a['variant'])} | {len(s)} | {mean_sd(col['final_gold'])} | {vs['final_gold']} "
            f"| {mean_sd(col['peak_gold'])} | {mean_sd(col['area'])} | {vs['area']} | {reach} | "
            f"{mean_sd(col['length'])} | {mean_sd(col['kl_ref'])} | {mean_sd(col['out_of_support'])} | {shares} |"
        )
    return lines


def judge(p: dict, full: int) -> str:
    """'ahead' / 'behind' only when the bootstrap and the t interval both exclude 0; fewer seeds than planned said."""
    (lo, hi), (tlo, thi) = p["bootstrap95"], p["t95"]
    word = "ahead" if lo > 0 and tlo > 0 else "behind" if hi < 0 and thi < 0 else "not distinguishable"
    n = len(p["seeds"])
    return word + (f" (preliminary: {n} of {full} seeds)" if n < full else "")


def verdict(res: dict) -> list[str]:
    """The issue's criteria (for the paper: RTO ahead of the best-tuned PPO at the long horizon, a gap growing with
    L and near 0 at the short one, RS-PPO close to RTO; against it: no gap although the DPO term tracks gold, DDPO
    matching RTO, the gap vanishing against PPO with lambda = 1), each said as measured or as not measured yet."""
    out, full = [], len(res["eval_seeds"])

    def arms_at(L: str) -> tuple[dict, str]:
        r = res["lengths"][L]
        done = {a: v for a, v in r["tuned"].items() if len(v["seeds"]) >= 2}
        if "rto" in done and "ppo" in done:
            return r["tuned"], "each arm at its best setting"
        return r["recipe"], "at the recipe's settings"

    def diff(arms: dict, a: str, b: str) -> dict | None:
        if a not in arms or b not in arms:
            return None
        return paired(*({s: v["final_gold"] for s, v in arms[x]["seeds"].items()} for x in (a, b)))

    for L in res["lengths"]:
        arms, which = arms_at(L)
        p = diff(arms, "rto", "ppo")
        if p is None:
            out.append(f"- L = {L}: RTO vs PPO not measured yet (needs 2+ paired seeds).")
            continue
        out.append(f"- L = {L}, {which}: RTO - PPO on final held-out gold {interval(p)}: {judge(p, full)}.")
        for arm, what in (
            ("rs-ppo", "RS-PPO (the DPO term as shaping only)"),
            ("ddpo", "DDPO (the same DPO information, paid at the last token)"),
            ("ppo-lam1", "PPO with lambda = 1"),
            ("rto-support", "RTO with the support-aware DPO term"),
        ):
            q = diff(arms, "rto", arm)
            if q is not None:
                out.append(f"  - RTO - {what}: {interval(q)}: RTO {judge(q, full)}.")
        q = diff(arms, "rto-lam1", "ppo-lam1")
        if q is not None:
            out.append(f"  - RTO with lambda = 1 - PPO with lambda = 1: {interval(q)}: {judge(q, full)}.")
        recipe = res["lengths"][L]["recipe"]
        if arms is not recipe and len(recipe.get("rto", {}).get("seeds", {})) >= 2:
            # one tuning seed picks each setting: RTO at the recipe's settings is the other estimate of RTO
            both = {**arms, "rto (recipe)": recipe["rto"]}
            for arm in ("ppo", "ppo-lam1", "rs-ppo", "ddpo", "rto-support"):
                q = diff(both, "rto (recipe)", arm)
                if q is not None:
                    out.append(f"  - RTO at the recipe's settings - {arm} (its best): {interval(q)}: {judge(q, full)}.")
        corr = [v.get("gold_corr_dpo_term") for v in arms["rto"]["seeds"].values()]
        corr = [c for c in corr if c is not None]
        if corr:
            c = statistics.fmean(corr)
            out.append(f"  - RTO's DPO token term vs the gold per-token share: correlation {c:.3f}.")
    for kind, title in (("recipe", "at the recipe's settings"), ("tuned", "each at its best setting")):
        gaps = {L: diff(res["lengths"][L][kind], "rto", "ppo") for L in res["lengths"]}
        gaps = {L: g for L, g in gaps.items() if g is not None}
        if len(gaps) > 1:
            out.append(
                f"- RTO - PPO by horizon, {title} (different worlds per L, so not paired across L): "
                + "; ".join(f"L = {L}: {g['mean']:+.2f}" for L, g in sorted(gaps.items(), key=lambda x: int(x[0])))
                + "."
            )
    return out or ["- nothing has finished yet."]


def figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(res["lengths"]))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    for ax, (L, r) in zip(axes[0], res["lengths"].items()):
        arms = dict(r["tuned"] or r["recipe"])
        recipe_rto = r["recipe"].get("rto")
        if r["tuned"] and recipe_rto and recipe_rto["variant"] != arms.get("rto", {}).get("variant"):
            arms["rto at the recipe's settings"] = recipe_rto  # the tuning seed chose another RTO setting
        for arm, a in arms.items():
            if not a["seeds"]:
                continue
            curves = [v["heldout_curve"] for v in a["seeds"].values()]
            xs = [x for x, _ in curves[0]]
            ys = [[c[i][1] for c in curves] for i in range(len(xs))]
            err = [
                T975.get(len(y) - 1, 1.96) * statistics.stdev(y) / math.sqrt(len(y)) if len(y) > 1 else 0 for y in ys
            ]
            ax.errorbar(
                xs,
                [statistics.fmean(y) for y in ys],
                yerr=err,
                marker="o",
                ms=3,
                capsize=2,
                ls="--" if arm.startswith("rto at") else "-",
                label=f"{arm} (n={len(curves)})",
            )
        title = f"chain world, L = {L} (mean, 95% t interval over seeds)"
        ax.set(xlabel="rollout samples", ylabel="held-out gold reward", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
