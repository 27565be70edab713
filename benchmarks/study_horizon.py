"""The horizon study: RTO vs PPO (and the ablations) on the chain toy world, across answer lengths and world seeds.

Run:  nice -n 15 python benchmarks/study_horizon.py --out /work/study_runs        (runs what is missing, in order;
      start it again beside itself for a second worker: each run, and a world being built, is claimed)
      python benchmarks/study_horizon.py --out /work/study_runs --plan           (list the runs and their state)
      python benchmarks/study_horizon.py --out /work/study_runs --aggregate      (write benchmarks/results/ only)

Per (length L, world seed) one `rto pipeline --recipe toy world.kind=chain` builds the world and trains SFT, the
reward model and DPO (the DPO model of the DPO arms). Each arm is then one `rto ppo` run from them at an equal
rollout budget (STEPS x 32 samples), scored by the world's gold at every step (rollouts) and on the held-out
prompts at 4 points of the budget (checkpoints). Every finished run writes result.json in its folder and is
skipped when the study starts again, so it can run in parts; an interrupted run resumes from its last
checkpoint. The code is frozen into <out>/code at the first start (every run uses the same code; `--refresh-code`
freezes the current one again). The runs come in the order that answers the main question first:
    1. headline: PPO and RTO at the recipe's settings (actor lr 1e-4, DPO scale = clip 0.05), L = 48 and 12,
       three evaluation seeds each, then the other two;
    2. tuning: every arm over its small sweep (actor lr; DPO scale = clip for the DPO arms) on the tuning seeds
       at the tuned lengths (default: L = 48 only; the other lengths take its choices);
    3. every arm at its best setting on the evaluation seeds, L = 48 and 12; 4. the same at L = 96.
Arms: PPO, PPO with lambda = 1, RTO, RS-PPO, DDPO, REINFORCE++, RTO on REINFORCE++, RTO with the support-aware
DPO term (`rewards.dpo_support=0.001`; benchmarks/pilot_support.py) and RTO with lambda = 1 (ARMS). The runs land in
--out (outside the git tree); the aggregate goes to <out>/aggregate after every run and to benchmarks/results/
(horizon_study_chain.{md,json,png}) at the end or with --aggregate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS, CHECKPOINTS = 200, 4  # rollout steps per run (x 32 samples); held-out evaluations (every STEPS / 4)
ARMS = {
    "ppo": ["algo=ppo"],
    "rto": ["algo=rto"],
    "ppo-lam1": ["algo=ppo", "rewards.lam=1.0"],
    "ddpo": ["algo=ddpo"],
    "rs-ppo": ["algo=rs-ppo"],
    "reinforce++": ["algo=ppo", "estimator=reinforce++"],
    "rto-reinforce++": ["algo=rto", "estimator=reinforce++"],
    "rto-support": ["algo=rto", "rewards.dpo_support=0.001"],  # no DPO credit off the reference's support
    "rto-lam1": ["algo=rto", "rewards.lam=1.0"],  # against PPO with lambda = 1: does the DPO term add to it?
}
DPO_ARMS = ("rto", "rs-ppo", "ddpo", "rto-reinforce++", "rto-support", "rto-lam1")
DEFAULT = {"lr": 1e-4, "dpo": 0.05}  # the toy recipe's actor lr and the paper's DPO scale and clip


@dataclass(frozen=True)
class Study:
    """What the study covers (the command line's settings)."""

    out: Path
    eval_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tune_seeds: tuple[int, ...] = (100,)
    lengths: tuple[int, ...] = (48, 12, 96)  # in priority order
    tune_lengths: tuple[int, ...] = (48,)  # a length not swept takes the longest swept length's choices
    lrs: tuple[float, ...] = (1e-4, 3e-4)  # actor lr sweep
    dpo_scales: tuple[float, ...] = (0.05, 0.2)  # DPO scale (= clip) sweep of the DPO arms

    def variants(self, arm: str) -> list[dict]:
        if arm in DPO_ARMS:
            return [{"lr": lr, "dpo": s} for s in self.dpo_scales for lr in self.lrs]
        return [{"lr": lr} for lr in self.lrs]

    def tuned_length(self, L: int) -> int:
        return L if L in self.tune_lengths else max(self.tune_lengths)

    def best_variant(self, L: int, arm: str) -> dict | None:
        """The arm's setting with the highest tuning score at L's swept length (mean over the tuning seeds); None
        while a tuning run is missing."""
        scores = []
        for v in self.variants(arm):
            results = [
                read_json(run_dir(self.out, self.tuned_length(L), s, arm, v) / "result.json") for s in self.tune_seeds
            ]
            if any(r is None for r in results):
                return None
            scores.append((sum(tuning_score(r) for r in results) / len(results), v))
        return max(scores, key=lambda x: x[0])[1]

    def plan(self) -> list[dict]:
        """Every run in priority order: {phase, L, seed, arm, variant} (variant None: waits for tuning)."""
        runs = []
        main = [L for L in self.lengths if L in self.tune_lengths or L <= max(self.tune_lengths)]
        later = [L for L in self.lengths if L not in main]
        half = self.eval_seeds[:3], self.eval_seeds[3:]
        for seeds in half:  # 1: PPO and RTO at the recipe's settings, 3 seeds per length first
            for L in main:
                runs += [self.run("1 headline", L, s, a, default_variant(a)) for s in seeds for a in ("ppo", "rto")]
        for L in self.tune_lengths:  # 2: the sweep
            runs += [self.run("2 tuning", L, s, a, v) for s in self.tune_seeds for a in ARMS for v in self.variants(a)]
        for L in main:  # 3: every arm at its best setting
            best = {a: self.best_variant(L, a) for a in ARMS}
            runs += [self.run("3 tuned", L, s, a, best[a]) for s in self.eval_seeds for a in ARMS]
        for L in later:  # 4: the longest horizon
            runs += [self.run("4 long", L, s, a, default_variant(a)) for s in self.eval_seeds for a in ("ppo", "rto")]
            best = {a: self.best_variant(L, a) for a in ARMS}
            runs += [self.run("4 long", L, s, a, best[a]) for s in self.eval_seeds for a in ARMS]
        seen, unique = set(), []
        for r in runs:  # a tuned setting that equals the recipe's is the headline run itself
            key = (r["L"], r["seed"], r["arm"], variant_name(r["variant"]) if r["variant"] else r["phase"])
            if key not in seen:
                seen.add(key)
                unique.append(r)
        return unique

    @staticmethod
    def run(phase: str, L: int, seed: int, arm: str, variant: dict | None) -> dict:
        return {"phase": phase, "L": L, "seed": seed, "arm": arm, "variant": variant}


def variant_name(v: dict) -> str:
    name = f"lr{v['lr']:g}" + (f"_dpo{v['dpo']:g}" if "dpo" in v else "")
    return name + (f"_support{v['support']:g}" if "support" in v else "")  # rewards.dpo_support (pilot arms)


def default_variant(arm: str) -> dict:
    return dict(DEFAULT) if arm in DPO_ARMS else {"lr": DEFAULT["lr"]}


def world_dir(out: Path, L: int, seed: int) -> Path:
    return out / f"L{L}" / f"s{seed}"


def run_dir(out: Path, L: int, seed: int, arm: str, v: dict) -> Path:
    return world_dir(out, L, seed) / "runs" / f"{arm}__{variant_name(v)}"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def tuning_score(result: dict) -> float:
    """What the sweep maximises: held-out gold, mean of the last two of the 4 points (less noisy than one)."""
    return sum(result["heldout_gold"][-2:]) / 2


CLAIM = "claim.json"  # {"host", "pid"} of the worker running the run (or building the world) in that folder


def _held(folder: Path) -> bool:
    """Whether a live worker on this machine holds `folder` (a claim whose process is gone is stale)."""
    held = read_json(folder / CLAIM)
    if not held or held.get("host") != socket.gethostname():
        return bool(held)  # another machine's claim is respected
    try:
        os.kill(int(held["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def claim(folder: Path) -> bool:
    """Take `folder` for this worker (False when a live worker holds it); release with `release`."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held(folder):
                return False
            (folder / CLAIM).unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
        return True
    return False


def release(folder: Path) -> None:
    held = read_json(folder / CLAIM)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        (folder / CLAIM).unlink(missing_ok=True)


def take(out: Path, r: dict) -> list[Path]:
    """Claims for running `r`: its folder, and its world's while the world is still to be built (two workers
    must not build one world); [] when another worker holds either."""
    world = world_dir(out, r["L"], r["seed"])
    folders = [run_dir(out, r["L"], r["seed"], r["arm"], r["variant"])]
    if not (world / "results.json").is_file():
        folders.append(world)
    taken = []
    for folder in folders:
        if not claim(folder):
            for t in taken:
                release(t)
            return []
        taken.append(folder)
    return taken


def state(out: Path, r: dict) -> str:
    if r["variant"] is None:
        return "waiting for tuning"
    d = run_dir(out, r["L"], r["seed"], r["arm"], r["variant"])
    if (d / "result.json").is_file():
        return "done"
    if (d / CLAIM).is_file() and _held(d):
        return "running"
    failed = read_json(d / "failed.json")
    return f"failed x{failed['attempts']}" if failed else "pending"


def freeze_code(out: Path, refresh: bool) -> Path:
    """Copy the imported rto and rto_kernels packages and the run scripts into <out>/code (once), so every run,
    in whatever session, uses the same code; CODE_SHA256 there names that version (each result.json records it)."""
    code = out / "code"
    if refresh:
        shutil.rmtree(code, ignore_errors=True)
    if not code.is_dir():
        import rto
        import rto_kernels

        tmp = out / "code.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for pkg in (rto, rto_kernels):
            src = Path(pkg.__file__).resolve().parent
            shutil.copytree(src, tmp / pkg.__name__, ignore=shutil.ignore_patterns("__pycache__"))
        for script in ("study_horizon.py", "study_horizon_run.py"):  # what the runs import (not the report)
            shutil.copy(HERE / script, tmp / script)
        digest = hashlib.sha256()
        for f in sorted(tmp.rglob("*.py")):
            digest.update(f.relative_to(tmp).as_posix().encode() + f.read_bytes())
        (tmp / "CODE_SHA256").write_text(digest.hexdigest() + "\n")
        tmp.rename(code)
    return code


def execute(out: Path, r: dict, code: Path, threads: int) -> bool:
    """One run in a fresh process on the frozen code; failures are recorded (with attempts) and skipped."""
    d = run_dir(out, r["L"], r["seed"], r["arm"], r["variant"])
    d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(code / "study_horizon_run.py"), json.dumps({**r, "out": str(out)})]
    t0 = time.time()
    with open(d / "log.txt", "a") as log:
        rc = subprocess.run(cmd, env=env, cwd=out, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc == 0 and (d / "result.json").is_file():
        (d / "failed.json").unlink(missing_ok=True)
        return True
    failed = read_json(d / "failed.json") or {"attempts": 0}
    tail = (d / "log.txt").read_text()[-3000:]
    failed.update(attempts=failed["attempts"] + 1, rc=rc, seconds=time.time() - t0, log_tail=tail)
    (d / "failed.json").write_text(json.dumps(failed, indent=1))
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/work/study_runs"), help="where runs land (outside git)")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=list(Study.eval_seeds))
    p.add_argument("--tune-seeds", type=int, nargs="+", default=list(Study.tune_seeds))
    p.add_argument("--lengths", type=int, nargs="+", default=list(Study.lengths), help="in priority order")
    p.add_argument("--tune-lengths", type=int, nargs="+", default=list(Study.tune_lengths))
    p.add_argument("--lrs", type=float, nargs="+", default=list(Study.lrs))
    p.add_argument("--dpo-scales", type=float, nargs="+", default=list(Study.dpo_scales))
    p.add_argument("--max-attempts", type=int, default=2, help="a run that failed this often is skipped")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--plan", "--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--aggregate", action="store_true", help="aggregate what exists into --results, run nothing")
    p.add_argument("--refresh-code", action="store_true", help="freeze the current code again")
    p.add_argument("--results", type=Path, default=HERE / "results")
    a = p.parse_args()
    study = Study(
        a.out.resolve(),
        tuple(a.eval_seeds),
        tuple(a.tune_seeds),
        tuple(a.lengths),
        tuple(a.tune_lengths),
        tuple(a.lrs),
        tuple(a.dpo_scales),
    )
    from study_horizon_report import write_report

    if a.plan:
        print_plan(study)
        return 0
    if a.aggregate:
        print(write_report(study, a.results))
        return 0
    study.out.mkdir(parents=True, exist_ok=True)
    code = freeze_code(study.out, a.refresh_code)
    while True:
        states = [(r, state(study.out, r)) for r in study.plan()]
        todo = [r for r, st in states if runnable(st, a.max_attempts)]
        if not todo:
            if any(st == "running" for _, st in states):  # other workers' runs may unlock tuned ones
                time.sleep(60)
                continue
            break
        r, taken = next(((r, t) for r in todo if (t := take(study.out, r))), (None, []))
        if r is None:  # every runnable run waits on a world another worker is building
            time.sleep(60)
            continue
        t0 = time.time()
        print(f"== {r['phase']} L={r['L']} seed={r['seed']} {r['arm']} {variant_name(r['variant'])}", flush=True)
        try:
            ok = execute(study.out, r, code, a.threads)
        finally:
            for folder in taken:
                release(folder)
        print(f"   {'done' if ok else 'FAILED'} in {time.time() - t0:.0f} s ({len(todo) - ok} left)", flush=True)
        try:
            write_report(study, study.out / "aggregate")
        except Exception:  # the report must never stop the runs
            traceback.print_exc()
    print(write_report(study, a.results))
    return 0


def runnable(st: str, max_attempts: int) -> bool:
    return st == "pending" or (st.startswith("failed") and int(st.split("x")[1]) < max_attempts)


def print_plan(study: Study) -> None:
    runs = study.plan()
    counts: dict[str, int] = {}
    for i, r in enumerate(runs):
        st = state(study.out, r)
        counts[st.split(" x")[0]] = counts.get(st.split(" x")[0], 0) + 1
        v = variant_name(r["variant"]) if r["variant"] else "(best of tuning)"
        print(f"{i:4d}  {r['phase']:<11} L={r['L']:<3} seed={r['seed']:<4} {r['arm']:<16} {v:<17} {st}")
    print(f"{len(runs)} runs: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    done = [
        read_json(run_dir(study.out, r["L"], r["seed"], r["arm"], r["variant"]) / "result.json")
        for r in runs
        if counts and r["variant"] and state(study.out, r) == "done"
    ]
    for L in sorted({r["L"] for r in done}):
        minutes = [(r["train_seconds"] + r["eval_seconds"]) / 60 for r in done if r["L"] == L]
        print(f"L={L}: {len(minutes)} runs done, {sum(minutes) / len(minutes):.1f} min per run (train + eval)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
