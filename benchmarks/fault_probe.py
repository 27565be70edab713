"""Fault probe: bad inputs and faults tried against the project's own commands, each judged by what a user sees.

Run:  python benchmarks/fault_probe.py [--jobs 2] [--only NAME ...] [--work DIR]
Output: benchmarks/results/fault_probe_<date>.{md,json}, and the count of cases per outcome on stdout.

This file judges and runs the cases: the shared assets (`build_assets`), the check that a refused command left its
folder as it was (`snapshot`, `untouched`), the judge, running the cases (`run_case`, `run_cases`), writing the
results and the command line. A case's folder and command (`Env`, `base_args`, `merge`) and a command run in its
own process group (`Process`) are benchmarks/fault_env.py's; the cases themselves, `Case` and the table `CASES`
with their set-ups, actions and checks, are in benchmarks/fault_cases.py (both build on fault_env only).

Each case is data: a name, the group of fault it belongs to (the damage, silent-acceptance and ugly lists
of issue 12, or `own`), how to set it up in its own temporary folder, the command (`python -m rto <cmd>` with a
small run's settings plus the case's own), what the error line must name, and for run-folder faults a check of the
folder afterwards. One set of tiny assets (tests/assets.py, plus a few variants and two finished runs to copy) is
shared by all cases; every case really runs the command, with a timeout, at most `--jobs` at a time.

The outcome of a case (`judge`), in the issue's four groups:
- clear: the exit code is the expected one (2 for a refusal; 128 + signum for a signal, which is also how a death
  by that signal counts; 0 for a fault the run survives, whose warning must then appear), no "Traceback"
  anywhere on stderr, and for a non-zero exit the last line of stderr is the only one that starts with
  `rto <cmd>:` and names every item of `names` (ordinary log lines may come before it) and none of the things it
  must not say (a misleading hint). A refusal from the data checks must come before any model loads.
- unclear: a raw traceback, a wrong exit code, no one-line error, or a line that misses what it must name or
  says what it must not.
- silent: exit 0 where a refusal was expected, or a survived fault without its warning.
- damage: the folder check failed: a refused command changed an existing file, left checkpoints, an exported
  model or its lock behind; or a case's own check (resume after a signal, the survivor of two runs) failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: benchmarks.* and tests.assets from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fault_cases import CASES, Case  # noqa: E402
from benchmarks.fault_env import Env, Process, Run, stderr_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUTCOMES = {
    "clear": "handled clearly",
    "unclear": "raw traceback or misleading message",
    "silent": "accepted silently",
    "damage": "damaged a run",
}
MODEL_LOADED = ("Loading weights", "parity probe")  # stderr marks of a model load (transformers, rto.families)


# ---- checks of the case folder afterwards (None: fine, else the damage) ----


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def untouched(env: Env, before: dict[str, str]) -> str | None:
    """A refused command leaves every file as it was and adds no checkpoint, exported model or lock."""
    after = snapshot(env.root)
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        return f"changed or removed {', '.join(sorted(changed)[:3])}"
    added = [k for k in after if k not in before and re.search(r"(^|/)(checkpoints|hf)/|run\.lock$", k)]
    added = [k for k in added if ".tmp/" not in k]  # an unfinished save's folder: never listed, never resumed
    return f"left {', '.join(sorted(added)[:3])}" if added else None


# ---- the shared assets ----


def build_assets(root: Path, full: bool = True) -> dict[str, Path]:
    """tests/assets.py's tiny model and data; with `full`, the RL assets, models that differ in one way (another
    tokenizer, too few embedding rows, a family that cannot pack, two labels) and two finished runs to copy."""
    from rto.config import ModelConfig
    from rto.models import load_scalar_model, tiny_causal_lm, tiny_tokenizer
    from tests.assets import WORDS, make_assets, make_rl_assets

    ready = root / f"assets_{'full' if full else 'small'}.json"  # a --work folder used again keeps its assets
    if ready.is_file():
        return {k: Path(v) for k, v in json.loads(ready.read_text()).items()}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = make_rl_assets(root, n_prompts=64) if full else make_assets(root, n=64)
    paths["hf_home"] = root / "hf-home"
    if not full:
        ready.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
        return paths
    from transformers import AutoConfig, LlamaForSequenceClassification, OPTConfig, OPTForCausalLM

    tok, other = tiny_tokenizer(WORDS), tiny_tokenizer(WORDS[::-1] + ["extra"])
    opt = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4)
    two = AutoConfig.from_pretrained(paths["model"], num_labels=2)
    models = {
        "other_lm": (tiny_causal_lm(len(other), seed=3), other),
        "small_vocab": (tiny_causal_lm(len(tok) - 4), tok),
        "opt": (OPTForCausalLM(opt), tok),
        "two_labels": (LlamaForSequenceClassification(two), tok),
    }
    for name, (model, tokenizer) in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["other_rm"], other_lm = root / "other_rm", str(paths["other_lm"])
    load_scalar_model(other_lm, ModelConfig(path=other_lm)).save_pretrained(paths["other_rm"])
    other.save_pretrained(paths["other_rm"])
    priors = {}
    for command in ("sft", "ppo"):
        env = Env(root / f"prior_{command}", paths)
        env.root.mkdir()
        saves = ["run.name=prior", "train.save_every=1", "run.keep_last=5"]
        priors[command] = (env, Process(env.argv(command, saves), env))
    for command, (env, proc) in priors.items():
        run = proc.finish(900)
        if run.rc != 0:
            raise RuntimeError(f"the prior {command} run failed: {run.stderr[-3000:]}")
        paths[f"prior_{command}"] = env.runs / "prior"
    ready.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


# ---- judging, running, reporting ----


def judge(case: Case, run: Run, names: tuple[str, ...] = (), damage: str | None = None) -> tuple[str, str]:
    """(outcome, why) of one case: see the module docstring. `names` are the case's, filled in for its folder."""
    if damage:
        return "damage", damage
    if run.rc is None:
        return "unclear", f"no exit within {case.timeout:.0f} s"
    if "Traceback (most recent call last)" in run.stderr:
        return "unclear", "a traceback on stderr"
    if run.rc == 0 and case.expect != 0:
        return "silent", "exit 0: accepted"
    if run.rc != case.expect:
        return "unclear", f"exit {run.rc}, expected {case.expect}"
    if case.expect == 0:
        missing = [w for w in case.warns if w not in run.stderr]
        return ("silent", f"no warning {missing[0]!r}") if missing else ("clear", "")
    lines, prefix = stderr_lines(run.stderr), f"rto {case.command}:"
    ours = [x for x in lines if x.startswith(prefix)]
    if len(ours) != 1 or lines[-1] != ours[0]:
        return "unclear", f"{len(ours)} lines start with {prefix!r} and the last line is not one"
    missing = [n for n in names if not n.startswith("!") and not any(alt in lines[-1] for alt in n.split("|"))]
    if missing:
        return "unclear", f"the error does not name {missing[0]!r}"
    wrong = [n[1:] for n in names if n.startswith("!") and n[1:] in lines[-1]]
    if wrong:
        return "unclear", f"misleading: the error says {wrong[0]!r}"
    if case.before_model and any(mark in run.stderr for mark in MODEL_LOADED):
        return "unclear", "refused only after a model loaded"
    return "clear", ""


def run_case(case: Case, assets: dict[str, Path], work: Path) -> dict:
    root = work / "cases" / case.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = Env(root, assets)
    run, outcome, why = Run(None, "", 0.0), "error", ""
    try:
        if case.setup is not None:
            case.setup(env)
        argv = env.argv(case.command, list(case.args))
        before = snapshot(root)
        run = case.action(case, env, argv)
        if "problem" in env.notes:  # the probe could not make the fault happen as planned
            why = env.notes["problem"]
        else:
            refused = case.expect == 2 and run.rc != 0 and case.unchanged
            damage = untouched(env, before) if refused else None
            if damage is None and case.check is not None and run.rc is not None:
                damage = case.check(env, run, argv)
            outcome, why = judge(case, run, tuple(env.fmt(n) for n in case.names), damage)
    except Exception as e:  # a fault of the probe itself, reported as such
        why = f"probe error: {type(e).__name__}: {e}"
    finally:
        for cleanup in env.cleanups:
            cleanup()
    shown = [str(root), str(assets["model"].parent)]
    tail = [short(x, shown) for x in stderr_lines(run.stderr)[-8:]]
    return {
        "name": case.name,
        "group": case.group,
        "command": f"rto {case.command} " + " ".join(case.args),
        "expect": case.expect,
        "rc": run.rc,
        "seconds": round(run.seconds, 1),
        "outcome": outcome,
        "why": why,
        "error": tail[-1] if tail else "",
        "tail": tail,
    }


def short(text: str, folders: list[str]) -> str:
    for folder, name in zip(folders, ("{case}", "{assets}")):
        text = text.replace(folder, name)
    return text


def run_cases(cases: list[Case], assets: dict[str, Path], work: Path, jobs: int = 2) -> list[dict]:
    # a probe started in the background (`cmd &` without job control) ignores SIGINT, and its commands would
    # inherit that: give them a terminal's default instead (a Python handler is reset to the default by exec)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_case, case, assets, work) for case in cases]
        results = []
        for case, future in zip(cases, futures):
            results.append(future.result())
            r = results[-1]
            print(f"{r['outcome']:>7}  {case.name}  ({r['seconds']} s)  {r['why']}", flush=True)
    return results


def write_results(results: list[dict], out: Path, wall_s: float, jobs: int = 2) -> tuple[Path, Path]:
    stamp = dt.date.today().isoformat()
    counts = Counter(r["outcome"] for r in results)
    by_group = Counter((r["group"], r["outcome"]) for r in results)
    out.mkdir(parents=True, exist_ok=True)
    data = {"date": stamp, "wall_s": round(wall_s), "jobs": jobs, "counts": dict(counts), "cases": results}
    json_file = out / f"fault_probe_{stamp}.json"
    json_file.write_text(json.dumps(data, indent=1))
    outcomes = [*OUTCOMES, "error"]
    md = [
        f"# Fault probe, {stamp}",
        "",
        f"`python benchmarks/fault_probe.py`: {len(results)} faults and bad inputs, each a real `python -m rto` "
        f"command in its own folder, {jobs} at a time on 2 shared CPU cores, {wall_s / 60:.1f} min in all. How a case "
        "is judged: the docstring of benchmarks/fault_probe.py.",
        "",
        "| outcome | cases |",
        "|---|---|",
        *[
            f"| {OUTCOMES.get(o, 'the probe could not run it')} | {counts[o]} |"
            for o in outcomes
            if counts[o] or o != "error"
        ],
        "",
        "| group | " + " | ".join(outcomes[:4]) + " |",
        "|---|---|---|---|---|",
        *[
            f"| {g} | " + " | ".join(str(by_group[g, o]) for o in outcomes[:4]) + " |"
            for g in ("damage", "silent", "ugly", "own")
        ],
        "",
        "| case | group | command | outcome | the error line (or why not clear) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        shown = r["error"] if r["outcome"] == "clear" else f"{r['why']}; last: {r['error']}"
        cells = [r["name"], r["group"], f"`{r['command'].strip()}`", r["outcome"], shown[:400]]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    md_file = json_file.with_suffix(".md")
    md_file.write_text("\n".join(md) + "\n")
    return md_file, json_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases at a time")
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--work", help="folder for assets and case folders (default: a new temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the md and json results")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    work = Path(args.work or tempfile.mkdtemp(prefix="fault_probe_"))
    start = time.perf_counter()
    assets = build_assets(work / "assets")
    print(f"assets in {work / 'assets'} ({time.perf_counter() - start:.0f} s); {len(cases)} cases", flush=True)
    results = run_cases(cases, assets, work, args.jobs)
    wall = time.perf_counter() - start
    md_file, _ = write_results(results, Path(args.out), wall, args.jobs)
    counts = Counter(r["outcome"] for r in results)
    print(
        f"{len(results)} cases in {wall / 60:.1f} min: "
        + ", ".join(f"{OUTCOMES.get(k, k)} {counts[k]}" for k in [*OUTCOMES, "error"])
    )
    print(f"wrote {md_file} and its .json; case folders in {work / 'cases'}")
    return 0 if counts["clear"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
