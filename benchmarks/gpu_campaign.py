"""The first GPU minutes in one command: GPU tests, kernel and step benchmarks, the compile table on the device.

    python benchmarks/gpu_campaign.py                   # one H100/H200: about 9 minutes, every step time-boxed
    python benchmarks/gpu_campaign.py --dry-run         # anywhere (CI): the same control flow, each step rehearsed
    python benchmarks/gpu_campaign.py --steps kernels   # some steps again

Every result file is named with the device and the date, beside one summary (campaign_<device>_<date>_summary.md)
and each step's log, in --out: benchmarks/results/ by default; with $OUT set (the device machine's return folder,
which takes back a few files only), a staging folder packed into $OUT/campaign_<device>_<date>.tar.gz, the summary
copied beside it. Nothing is downloaded: the working tree is put on every step's path (no install needed), and
`--wheels DIR` (default `.whl` when it exists) adds carried wheels (liger-kernel, omegaconf, ...). A step whose
modules are missing is skipped with the reason, never failed; one that fails or runs out of time is recorded and the
campaign goes on. The rehearsal runs each step at its smallest: the GPU tests collected, not run (they need a
device); the kernel benchmark's --quick; the step benchmark's GPU arguments checked by its parser (its CPU smoke run
is tests/test_cli_and_bench.py's); one compile for sm_90.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OPTIONAL = ("liger_kernel", "flash_attn", "vllm")  # reported; their absence only narrows what a step compares


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    argv: tuple[str, ...]  # after the interpreter; {out} {tag} {date} filled in
    rehearsal: tuple[str, ...] | None  # --dry-run's argv; None: argv + --help (the parser checks every argument)
    timeout_s: int
    needs: tuple[str, ...] = ("torch", "triton")
    rehearsal_env: dict = field(default_factory=dict)
    read: Callable[[Path, Path, float], list[str]] | None = None  # (out, log, start time) -> summary lines
    env: dict = field(default_factory=dict)  # added to the environment of the real run


def static_estimate(N: int = 16384, H: int = 4096, V: int = 128256) -> dict:
    """FLOPs, fewest bytes and floor times of the fused bf16 log-prob head, written down before any GPU run.

    At the default shape: forward 17.21 TFLOP (2NHV) and 1.185 GB (hidden and weight read once, targets, logp and
    the log-sum-exp written), so compute-bound: 21.57 ms at the H100's measured 798 TFLOP/s (the 65% target is
    33.2 ms) and 21.79 ms at the H200's ~790 (memory 0.40 and 0.25 ms at 3.0 and 4.8 TB/s); 2.10 G exponentials.
    Backward 51.64 TFLOP (recompute, dW, dH): 64.7 and 65.4 ms; its dz chunks add 12.6 GB (written once, read by
    both matmuls), 4.2 and 2.6 ms of traffic, under the compute."""
    matmul = 2 * N * H * V  # one multiply-add per (row, column, k)
    fwd_bytes = 2 * (N * H + V * H) + 8 * N + 4 * 3 * N  # bf16 inputs once; int64 targets; fp32 logp + [2, N] stats
    dz_bytes = 3 * 2 * N * V
    rates = {
        "H100 (798 TFLOP/s, 3.0 TB/s measured)": (798e12, 3.0e12),
        "H200 (~790 TFLOP/s, 4.8 TB/s)": (790e12, 4.8e12),
    }
    out = dict(N=N, H=H, V=V, fwd_tflop=matmul / 1e12, fwd_gb=fwd_bytes / 1e9, bwd_tflop=3 * matmul / 1e12)
    out.update(dz_gb=dz_bytes / 1e9, exp_g=N * V / 1e9, rates={})
    for name, (flops, bw) in rates.items():
        fwd_ms, mem_ms = matmul / flops * 1e3, fwd_bytes / bw * 1e3
        out["rates"][name] = dict(fwd_ms=fwd_ms, fwd_memory_ms=mem_ms, fwd_target_ms=fwd_ms / 0.65)
        out["rates"][name].update(bwd_ms=3 * fwd_ms, dz_ms=dz_bytes / bw * 1e3)
    return out


def _newest(folder: Path, pattern: str, since: float) -> Path | None:
    found = [p for p in folder.glob(pattern) if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def read_tests(out: Path, log: Path, since: float) -> list[str]:
    xml = _newest(out, "campaign_*_tests.xml", since)
    if xml is None:
        tail = [line for line in log.read_text().splitlines() if "collected" in line or "passed" in line]
        return [f"- {tail[-1].strip()}" if tail else "- no test report"]
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    lines = [f"- {counts['tests']} tests: {failed}"]
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"  - FAILED {case.get('classname')}::{case.get('name')}")
    return lines


_AUTOTUNED = re.compile(
    r"Triton autotuning for function (\w+)(?:,\s*with key as (.*?),)?\s*finished after ([\d.]+)\s*s[,;]\s*"
    r"best config selected: (.*?);",
    re.DOTALL,
)


def autotune_choices(text: str) -> list[dict]:
    """The configs the autotuner chose, as Triton prints them with TRITON_PRINT_AUTOTUNING=1 (its 3.x formats)."""
    out = []
    for kernel, key, seconds, config in _AUTOTUNED.findall(text):
        fields = [f.strip() for f in config.split(",")]
        kept = [f for f in fields if f not in ("num_ctas: 1", "maxnreg: None", "ir_override: None")]
        out.append(dict(kernel=kernel, key=" ".join(key.split()), seconds=float(seconds), config=", ".join(kept)))
    return out


def read_kernels(out: Path, log: Path, since: float) -> list[str]:
    estimate = static_estimate()
    choices = autotune_choices(log.read_text(errors="replace")) if log.exists() else []
    tuned = ["", "Autotune choices (rto_kernels._autotune; key: shape and flag values, then the dtypes):", ""]
    tuned += ["| kernel | key | config chosen | tuning s |", "|---|---|---|---|"]
    tuned += [f"| {c['kernel']} | `{c['key']}` | {c['config']} | {c['seconds']:.2f} |" for c in choices]
    if not choices:
        tuned = ["", "- autotune: no choice printed (no compiled log-prob launch, or RTO_AUTOTUNE=0)"]
    path = _newest(out, "kernels_*.json", since)
    if path is None:
        return ["- no kernel benchmark result", *tuned]
    data = json.loads(path.read_text())
    peak = data["meta"].get("peaks", {}).get("matmul_bf16_tflops")
    lines = [f"- {path.name}; measured bf16 matmul {peak:.0f} TFLOP/s" if peak else f"- {path.name}"]
    lines += [
        "",
        "| shape | head | variant | mode | ms | % of matmul peak | extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["op"] == "linear_logprobs" and "ms" in r:
            pct = f"{r['pct_of_peak']:.0f}%" if "pct_of_peak" in r else ""
            mib = "" if r.get("extra_peak_mib") is None else f"{r['extra_peak_mib']:.0f}"
            lines.append(
                f"| {r['shape']} | {r['head']} | {r['variant']} | {r['mode']} | {r['ms']:.3f} | {pct} | {mib} |"
            )
    ours = [r for r in data["rows"] if r.get("variant") == "rto (ours)" and r.get("mode") == "fwd" and "ms" in r]
    full = [r for r in ours if r["shape"].startswith(f"N={estimate['N']} H={estimate['H']} V={estimate['V']}")]
    if peak and full:
        floor = estimate["fwd_tflop"] / peak * 1e3  # ms at this device's measured rate
        lines += ["", f"- fused forward ({full[0]['head']}): {full[0]['ms']:.2f} ms against a floor of {floor:.2f} ms "]
        lines[-1] += f"at the measured rate: {100 * floor / full[0]['ms']:.0f}% (target >= 65%)"
    return lines + tuned


def read_step(out: Path, log: Path, since: float) -> list[str]:
    path = _newest(out, "step_*.json", since)
    if path is None:
        return ["- no step benchmark result (the rehearsal checks its arguments only)"]
    runs = json.loads(path.read_text())["runs"]
    ours, peer = runs["ours"], runs["peer"]
    lines = [
        f"- {path.name}",
        "",
        "| phase | ours s | peer s | ours/peer time | ours/peer peak |",
        "|---|---|---|---|---|",
    ]
    for phase, t in ours["times"].items():
        mem = ours["peak_mib"][phase] / peer["peak_mib"][phase] if peer["peak_mib"][phase] > 1 else float("nan")
        lines.append(f"| {phase} | {t:.3f} | {peer['times'][phase]:.3f} | {t / peer['times'][phase]:.2f} | {mem:.2f} |")
    lines += ["", f"- update MFU: ours {ours['update_mfu']:.1%}, peer {peer['update_mfu']:.1%} (target >= 40%)"]
    return lines


def read_compile(out: Path, log: Path, since: float) -> list[str]:
    path = _newest(out, "compile_table_*.json", since)
    if path is None:
        return ["- no compile table"]
    rows = json.loads(path.read_text())["rows"]
    bad = [r for r in rows if r["status"] != "ok"]
    lines = [f"- {path.name}: {len(rows)} compiles, {len(rows) - len(bad)} ok"]
    lines += [f"  - {r['target']} {r['kernel']} {r['dtype']} [{r['flags']}]: {r['status']}" for r in bad[:20]]
    return lines


_PYTEST = ("-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors")
_KERNELS = ("benchmarks/bench_kernels.py", "--out", "{out}")
_COMPILE = ("benchmarks/compile_check.py", "--out", "{out}", "--tag", "{tag}")
STEPS = (
    Step(
        name="tests",
        what="GPU-marked tests",
        argv=(*_PYTEST, "--junitxml", "{out}/campaign_{tag}_{date}_tests.xml"),
        rehearsal=(*_PYTEST, "--collect-only"),
        timeout_s=70,
        needs=("torch", "triton", "pytest"),
        rehearsal_env={"TRITON_INTERPRET": "1"},
        read=read_tests,  # tests/kernels collects only with the interpreter or a GPU
    ),
    Step(
        name="kernels",
        what="kernel benchmark (Liger if importable)",
        argv=(*_KERNELS, "--heads", "plain,bias+scale+softcap"),
        rehearsal=(*_KERNELS, "--quick", "--heads", "plain"),
        timeout_s=180,  # the first launch of each autotune key compiles and times every config
        read=read_kernels,
        env={"TRITON_PRINT_AUTOTUNING": "1"},  # the choices, into the log: the summary lists them
    ),
    Step(
        name="step",
        what="step benchmark at the 1B shape",
        argv=("benchmarks/bench_step.py", "--shape", "1b", "--batch", "64", "--out", "{out}"),
        rehearsal=None,
        timeout_s=160,
        needs=("torch", "triton", "transformers", "omegaconf"),
        read=read_step,
    ),
    Step(
        name="compile",
        what="compile table on the device (the driver's register counts)",
        argv=(*_COMPILE, "--device"),
        rehearsal=(*_COMPILE, "--subset", "smoke", "--targets", "sm_90", "--jobs", "1"),
        timeout_s=120,  # every autotune config of every variant
        read=read_compile,
    ),
)

PROBE = r"""
import importlib, importlib.util, json, os, platform, sys
out = dict(python=sys.version.split()[0], cpus=os.cpu_count(), machine=platform.machine(), imports={})
out["modules"] = {m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}
for name in ("rto_kernels", "rto.config"):
    try:
        importlib.import_module(name)
        out["imports"][name] = "ok"
    except Exception as exc:
        out["imports"][name] = f"{type(exc).__name__}: {exc}"
try:
    import torch, triton
    out.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.cuda.is_available())
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        out.update(memory_gib=round(p.total_memory / 2**30, 1))
except Exception as exc:
    out.update(cuda=False, torch_error=f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def device_slug(probe: dict) -> str:
    name = probe.get("device") or f"cpu-{probe['cpus']}cores-{probe['machine']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def child_env(tmp: Path, wheels: Path | None) -> tuple[dict, str]:
    """The steps' environment: the working tree importable as `rto` and `rto_kernels` (kernels/ under its package
    name: a link in tmp/pkgs), carried wheels first (installed into tmp/site); and a note on the wheels."""
    pkgs, site = tmp / "pkgs", tmp / "site"
    pkgs.mkdir()
    (pkgs / "rto_kernels").symlink_to(REPO / "kernels", target_is_directory=True)
    paths, note = [str(pkgs), str(REPO)], "no wheels carried"
    if wheels is not None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target"]
        proc = subprocess.run(
            [*cmd, str(site), *map(str, sorted(wheels.glob("*.whl")))], capture_output=True, text=True
        )
        note = f"wheels from {wheels}: " + ("installed" if proc.returncode == 0 else proc.stderr.strip()[-300:])
        paths.insert(0, str(site))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)  # compiled kernels; a step that needs the interpreter sets it itself
    return env, note


def run_step(step: Step, argv: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run one step in its own process group, its output in `log`; on timeout the whole group is killed."""
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: the step and its children
            proc.wait()
            status = f"timeout after {timeout:.0f} s"
    return dict(step=step.name, status=status, seconds=round(time.monotonic() - t0, 1), command=shlex.join(argv))


def probe_environment(env: dict) -> dict:
    """Versions, the device, which modules the steps can import (the probe's JSON is its last line)."""
    mods = ("torch", "triton", "pytest", "transformers", "omegaconf", "datasets", *OPTIONAL)
    proc = subprocess.run([sys.executable, "-c", PROBE, *mods], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"gpu_campaign: the environment probe failed: {proc.stderr.strip()[-500:]}")
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
    smi_out = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True) if smi else None
    probe["nvidia_smi"] = smi_out.stdout.strip() if smi_out and smi_out.returncode == 0 else "not available"
    return probe


def run_steps(steps: list[Step], probe: dict, env: dict, fill: dict, budget: float, dry_run: bool):
    """Each step in turn within the budget: skipped when a module it needs is missing or no time is left, else
    run and its results read. Returns (one result per step, summary sections)."""
    out, t_start = Path(fill["out"]), time.monotonic()
    results, readouts = [], {}
    for n, step in enumerate(steps):
        gpu_cmd = [sys.executable, *(a.format(**fill) for a in step.argv)]
        rehearsal = gpu_cmd + ["--help"] if step.rehearsal is None else [sys.executable, *step.rehearsal]
        cmd = [a.format(**fill) for a in rehearsal] if dry_run else gpu_cmd
        missing = [m for m in step.needs if not probe["modules"].get(m)]
        left, since = budget - (time.monotonic() - t_start), time.time()
        if missing or left < 15:
            why = f"{', '.join(missing)} missing (carry wheels: --wheels)" if missing else "out of time"
            results.append(dict(step=step.name, status=f"skipped: {why}", seconds=0, command=shlex.join(cmd)))
            continue
        later = sum(s.timeout_s for s in steps[n + 1 :])  # kept for the steps after; time a step saves flows on
        log = out / "campaign_{tag}_{date}_{name}.log".format(**fill, name=step.name)
        step_env = env | (step.rehearsal_env if dry_run else step.env)
        results.append(run_step(step, cmd, step_env, log, min(left, max(step.timeout_s, left - later))))
        print(f"gpu_campaign: {step.name}: {results[-1]['status']} ({results[-1]['seconds']} s)", file=sys.stderr)
        try:
            readouts[f"{step.name}: {step.what}"] = step.read(out, log, since)
        except (KeyError, ValueError, TypeError, ET.ParseError) as exc:  # a result of another shape: say so
            readouts[f"{step.name}: {step.what}"] = [f"- could not read the result: {type(exc).__name__}: {exc}"]
    return results, readouts


def summary(meta: dict, probe: dict, results: list[dict], readouts: dict) -> str:
    kind = "DRY RUN (a rehearsal on this machine; the GPU commands are below)" if meta["dry_run"] else "GPU run"
    lines = [f"# GPU campaign: {meta['tag']}, {meta['date']}", "", f"{kind}. Command: `{meta['command']}`", ""]
    found = ", ".join(f"{m} {'yes' if probe['modules'].get(m) else 'no'}" for m in OPTIONAL)
    lines.append(f"- python {probe['python']}, torch {probe.get('torch')}, triton {probe.get('triton')}; {found}")
    gpu = "{device} (sm {capability}, {sms} SMs, {memory_gib} GiB)".format(**probe) if probe["cuda"] else "no GPU"
    lines += [f"- device: {gpu}; nvidia-smi: {probe['nvidia_smi']}", f"- imports: {probe['imports']}; {meta['wheels']}"]
    lines += ["", "| step | status | s | command |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | `{r['command']}` |" for r in results]
    if meta["dry_run"]:
        lines += ["", "On a GPU the steps run:", ""] + [f"- {s}: `{c}`" for s, c in meta["gpu_commands"].items()]
    for name, body in readouts.items():
        lines += ["", f"## {name}", "", *body]
    written = inspect.cleandoc(static_estimate.__doc__).split("\n\n", 1)[1]
    lines += ["", "## Static estimate (written before the run)", "", written, ""]
    lines += [
        "| rates | fwd ms | fwd memory ms | 65% target ms | bwd ms | dz traffic ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in static_estimate()["rates"].items():
        fwd = f"{t['fwd_ms']:.2f} | {t['fwd_memory_ms']:.3f} | {t['fwd_target_ms']:.1f}"
        lines.append(f"| {name} | {fwd} | {t['bwd_ms']:.1f} | {t['dz_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="rehearse every step at its smallest (no GPU)")
    names = ",".join(s.name for s in STEPS)
    parser.add_argument("--steps", default=names, help=f"comma-separated, of {names} (run in that order)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/, or $OUT packed)")
    parser.add_argument("--wheels", type=Path, help="folder of carried wheels (default .whl when it exists)")
    parser.add_argument("--budget", type=float, default=sum(s.timeout_s for s in STEPS), help="seconds, all steps")
    args = parser.parse_args(argv)
    steps = [s for s in STEPS if s.name in args.steps.split(",")]
    unknown = set(args.steps.split(",")) - {s.name for s in STEPS}
    if unknown:
        parser.error(f"--steps: unknown step {sorted(unknown)[0]!r}; choose from {names}")
    wheels = args.wheels or (REPO / ".whl" if (REPO / ".whl").is_dir() else None)
    packed = args.out is None and bool(os.environ.get("OUT"))
    out = args.out or (Path(tempfile.mkdtemp(prefix="rto_campaign_")) if packed or args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        env, wheel_note = child_env(Path(tmp), wheels)
        probe = probe_environment(env)
        if not args.dry_run and not probe["cuda"]:
            print("gpu_campaign: no CUDA device here; rehearse with --dry-run", file=sys.stderr)
            return 2
        fill = dict(out=str(out), tag=device_slug(probe), date=dt.date.today().isoformat())
        results, readouts = run_steps(steps, probe, env, fill, args.budget, args.dry_run)
    meta = dict(tag=fill["tag"], date=fill["date"], dry_run=args.dry_run, wheels=wheel_note)
    meta["gpu_commands"] = {s.name: shlex.join(["python", *(a.format(**fill) for a in s.argv)]) for s in STEPS}
    meta["command"] = shlex.join(["python", "benchmarks/gpu_campaign.py", *(sys.argv[1:] if argv is None else argv)])
    meta["seconds"] = round(time.monotonic() - t_start, 1)
    stem = out / "campaign_{tag}_{date}_summary".format(**fill)
    stem.with_suffix(".md").write_text(summary(meta, probe, results, readouts))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, probe=probe, steps=results), indent=1) + "\n")
    if packed:  # the device machine returns a few files only: one archive and the summary
        dest, name = Path(os.environ["OUT"]), "campaign_{tag}_{date}".format(**fill)
        with tarfile.open(dest / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(out, arcname=name)
        shutil.copy(stem.with_suffix(".md"), dest / stem.with_suffix(".md").name)
    print(stem.with_suffix(".md").read_text())
    print(f"gpu_campaign: {meta['seconds']} s; summary {stem}.md", file=sys.stderr)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
