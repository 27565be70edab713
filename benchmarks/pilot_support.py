"""Pilot: does the support-aware DPO term (`rewards.dpo_support`) remove the out-of-support hack of a large DPO
scale on the chain world? One world per (L, seed), the horizon study's worlds and run script, the current code.

Run:  nice -n 15 python benchmarks/pilot_support.py --study /work/study_runs --out /work/pilot_support
Arms (each 200 steps x 32 samples, held-out gold at 4 points): RTO at the paper's DPO scale = clip 0.05, RTO at
0.5 (where the hack appears), and each with `rewards.dpo_support` (no DPO credit where the reference gives the
token a probability below it). Finished runs are skipped; the table goes to benchmarks/results/pilot_support_chain.*.
A pilot: one seed per length, no interval; it says whether the option deserves an arm in the study.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = [
    {"lr": 1e-4, "dpo": 0.05},
    {"lr": 1e-4, "dpo": 0.05, "support": 1e-3},
    {"lr": 1e-4, "dpo": 0.5},
    {"lr": 1e-4, "dpo": 0.5, "support": 1e-3},
]
WORLD = ("world", "sft", "rm", "dpo", "results.json")  # what a built study world holds


def link_world(study: Path, out: Path, L: int, seed: int) -> None:
    """The pilot's world folder points at the study's built world (its runs stay apart)."""
    src, dst = study / f"L{L}" / f"s{seed}", out / f"L{L}" / f"s{seed}"
    if not (src / "results.json").is_file():
        raise SystemExit(f"{src}: the study has not built this world yet (run benchmarks/study_horizon.py)")
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORLD:
        if not (dst / name).exists():
            (dst / name).symlink_to(src / name)


def summary(result: dict) -> dict:
    last = result["heldout"][-1]
    tail = result["curve"][-20:]
    mean = lambda k: sum(r.get(k, 0.0) for r in tail) / len(tail)  # noqa: E731
    return {
        "heldout_gold": [round(g, 3) for g in result["heldout_gold"]],
        "final_gold": last["gold_reward"],
        "final_oos_rate": last["out_of_support_rate"],
        "final_length": last["mean_length"],
        "rollout_oos_rate_last20": mean("rollout/out_of_support_rate"),
        "dpo_unsupported_last20": mean("rollout/dpo_unsupported_fraction"),
        "kl_per_token_last20": mean("rollout/kl_ref_per_token"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, default=Path("/work/study_runs"))
    p.add_argument("--out", type=Path, default=Path("/work/pilot_support"))
    p.add_argument("--lengths", type=int, nargs="+", default=[12, 48])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    from study_horizon import run_dir, variant_name

    rows = []
    for L in a.lengths:
        link_world(a.study.resolve(), a.out.resolve(), L, a.seed)
        for v in VARIANTS:
            d = run_dir(a.out.resolve(), L, a.seed, "rto", v)
            if not (d / "result.json").is_file():
                print(f"== L={L} seed={a.seed} rto {variant_name(v)}", flush=True)
                d.mkdir(parents=True, exist_ok=True)
                spec = {"phase": "pilot", "L": L, "seed": a.seed, "arm": "rto", "variant": v, "out": str(a.out)}
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
                with open(d / "log.txt", "a") as log:
                    cmd = [sys.executable, str(HERE / "study_horizon_run.py"), json.dumps(spec)]
                    if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                        print(f"   FAILED: see {d / 'log.txt'}", flush=True)
                        continue
            rows.append(
                {
                    "L": L,
                    "seed": a.seed,
                    "variant": variant_name(v),
                    **summary(json.loads((d / "result.json").read_text())),
                }
            )
    results = HERE / "results"
    (results / "pilot_support_chain.json").write_text(json.dumps(rows, indent=1))
    head = "| L | variant | held-out gold at 50/100/150/200 steps | out-of-support rate | no-DPO-credit tokens "
    head += "| KL/token | length |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        gold = " / ".join(f"{g:.2f}" for g in r["heldout_gold"])
        lines.append(
            f"| {r['L']} | {r['variant']} | {gold} | {r['final_oos_rate']:.3f} | {r['dpo_unsupported_last20']:.3f} "
            f"| {r['kl_per_token_last20']:.3f} | {r['final_length']:.1f} |"
        )
    command = "nice -n 15 python benchmarks/pilot_support.py --study /work/study_runs --out /work/pilot_support"
    text = (
        f"# Pilot: the support-aware DPO term on the chain world (seed {a.seed}, one run per cell)\n\n`{command}`\n\n"
    )
    (results / "pilot_support_chain.md").write_text(text + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
