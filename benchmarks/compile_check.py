"""Compile every Triton kernel variant rto_kernels' host code can launch, for named GPU targets, with no GPU.

    python benchmarks/compile_check.py                 # the full table, sm_80 and sm_90, into benchmarks/results/
    python benchmarks/compile_check.py --subset test   # what tests/test_gpu_compile.py compiles (see `select`)
    python benchmarks/compile_check.py --device        # on a CUDA machine: its own target, the driver's counts

The variants are recorded, not listed, so that the list cannot drift from the code: the public ops run on small
CPU tensors with every kernel launch replaced by a recorder, so the ops' own dispatch picks each launch's tiles,
warps and compile-time flags; the options swept are read off the ops' signatures (each bool both ways, each
optional setting off and on, every shaping and KL estimator). An autotuned launch (the log-prob kernels,
rto_kernels._autotune; recorded with autotuning on whatever RTO_AUTOTUNE says) gives one variant per config the
autotuner could time for it, after its early prune (the list of the launch's dtype), numbered in the `config`
column (0: the default); the table also sums each config up over its variants. Each distinct launch is compiled
by Triton's own JIT under a stand-in driver that names the target and cannot launch. Registers and stack: the
cubin (cuobjdump); spill bytes: Triton's own ptxas command, when the stack is not empty; shared memory: the
compiler's, against the target's per-block limit. Shape classes, since Triton specialises integers and
pointers on divisibility by 16: `aligned` (sizes multiples of 16, like model dims), `ragged` (N, V, T not: packed
tokens, odd vocabularies, response lengths), and `tiles T=...`, the advantage kernel's smaller tiles
(next_pow2(T), capped at 1024, the tile of the other two classes) at the first option set.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import rto_kernels
from rto_kernels import _autotune

RESULTS = Path(__file__).resolve().parent / "results"
# (capability, per-block shared memory a kernel may opt into in bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin)
TARGETS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}  # A100; H100 and H200
REGISTER_FILE = 65536  # 32-bit registers per multiprocessor: one block of num_warps warps must fit

SHAPES = {
    "aligned": dict(N=32, H=64, V=512, B=2, T=1024),
    "ragged": dict(N=30, H=64, V=509, B=2, T=1001),
    **{f"tiles T={t}": dict(N=32, H=64, V=512, B=2, T=t) for t in (16, 32, 64, 128, 256, 512)},
}
LOGPROB_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Each op and its input dtypes (the advantage ops get the trainer's fp32 log-probs and values).
OPS = {
    rto_kernels.linear_logprobs: LOGPROB_DTYPES,
    rto_kernels.logprobs_from_logits: LOGPROB_DTYPES,
    rto_kernels.token_rewards: (torch.float32,),
    rto_kernels.gae: (torch.float32,),
    rto_kernels.rto_advantages: (torch.float32,),
}
# A value that turns each optional number on or fills a required one; everything else is read off the signatures.
SAMPLES = dict(softcap=30.0, logit_scale=0.5, temperature=0.7, kl_coef=0.05, dpo_scale=0.1, dpo_clip=0.05)
SAMPLES.update(score_clip=5.0, gamma=1.0, lam=0.95)
CHOICES = dict(kl_estimator=rto_kernels.KL_ESTIMATORS, shaping=rto_kernels.SHAPINGS)
# Launch options, not constexprs: shown as warps/stages (num_ctas and the rest are Triton's defaults here).
LAUNCH = ("num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override")


@dataclass
class Variant:
    """One distinct launch: the kernel, its arguments as the host code passed them, and which ops launch it."""

    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    dtype: str
    shape: str
    ops: list = field(default_factory=list)
    config: int | None = None  # its place in the autotuner's list for this launch (0: the default); None: untuned

    def describe(self) -> dict:
        on = [k if v is True else f"{k}={v}" for k, v in self.kwargs.items() if v is not False and k not in LAUNCH]
        launch = f"{self.kwargs.get('num_warps', 4)}w/{self.kwargs.get('num_stages', '-')}s"
        ops = ", ".join(self.ops)
        out = dict(kernel=self.fn.__name__, ops=ops, dtype=self.dtype, shape=self.shape, flags=" ".join(on))
        return out | dict(launch=launch, config="-" if self.config is None else str(self.config))


def _inputs(op: str, dtype: torch.dtype, s: dict) -> dict:
    """The tensors of one call of `op`, by parameter name (their values never matter: nothing runs)."""
    N, H, V, B, T = (s[k] for k in "NHVBT")
    targets = torch.zeros(N, dtype=torch.int64)
    if op == "linear_logprobs":
        leaves = dict(hidden=torch.zeros(N, H, dtype=dtype), weight=torch.zeros(V, H, dtype=dtype))
        leaves["bias"] = torch.zeros(V, dtype=dtype)
        return {k: t.requires_grad_() for k, t in leaves.items()} | dict(targets=targets)
    if op == "logprobs_from_logits":
        return dict(logits=torch.zeros(N, V, dtype=dtype, requires_grad=True), targets=targets)
    per_token = {k: torch.zeros(B, T, dtype=dtype) for k in ("logp", "ref_logp", "dpo_logp", "values", "rewards")}
    return per_token | dict(score=torch.zeros(B, dtype=dtype), mask=torch.ones(B, T, dtype=torch.bool))


def _candidates(op: str, p: inspect.Parameter, tensors: dict) -> list:
    """The values one parameter is swept over: both bools, optional settings off and on, every choice."""
    optional = "None" in str(p.annotation)
    if p.name in tensors:
        return [tensors[p.name]] + ([None] if optional else [])
    if str(p.annotation) == "bool":
        return [False, True]
    if p.name in CHOICES:
        return list(CHOICES[p.name])
    if p.name in SAMPLES:
        off = None if optional else p.default
        return [SAMPLES[p.name]] if off is inspect.Parameter.empty else list(dict.fromkeys([off, SAMPLES[p.name]]))
    if optional or p.default is inspect.Parameter.empty:
        raise ValueError(f"compile_check: no sample value for {op}({p.name}); add one to SAMPLES or _inputs")
    return [p.default]


def _calls(fn, dtype: torch.dtype, s: dict, first_only: bool) -> list[dict]:
    """Every keyword set the op's signature allows (or the first), as arguments of the public function."""
    tensors = _inputs(fn.__name__, dtype, s)
    params = list(inspect.signature(fn).parameters.values())
    combos = itertools.product(*(_candidates(fn.__name__, p, tensors) for p in params))
    return [dict(zip((p.name for p in params), c)) for c in itertools.islice(combos, 1 if first_only else None)]


def _base(obj):
    """The JITFunction under any autotune or heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def kernel_objects(launched_only: bool = True) -> dict:
    """{module.name: kernel} of the Triton kernels in rto_kernels' modules: those their source launches
    (`name[grid](...)`, directly or through an autotuner that wraps them), or every kernel object (also helpers,
    which are never launched, and the autotuners themselves)."""
    import pkgutil
    from importlib import import_module

    from triton.runtime.jit import JITFunction, KernelInterface

    found = {}
    for info in pkgutil.iter_modules(rto_kernels.__path__):
        module = import_module(f"rto_kernels.{info.name}")
        mine = {n: o for n, o in vars(module).items() if isinstance(o, KernelInterface)}
        mine = {n: o for n, o in mine.items() if _base(o).__module__ == module.__name__}
        launched = set(re.findall(r"(\w+)\[", inspect.getsource(module)))
        launched |= {_base(o).__name__ for n, o in mine.items() if n in launched}
        for name, obj in mine.items():
            if not launched_only or (isinstance(obj, JITFunction) and name in launched):
                found[f"{info.name}.{name}"] = obj
    return found


def _expand(obj, args: tuple, kwargs: dict) -> list:
    """(JITFunction, kwargs, config) of each compile one launch can cause: every autotune config the launch can
    time (after the autotuner's early prune), numbered in its list (None: untuned), heuristics applied."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    if isinstance(obj, Autotuner):
        named = dict(zip(obj.arg_names, args))
        configs = obj.early_config_prune(obj.configs, named, **kwargs) if obj.early_config_prune else obj.configs
        return [
            (fn, kw, i)
            for i, cfg in enumerate(configs)
            for fn, kw, _ in _expand(obj.fn, args, kwargs | cfg.all_kwargs())
        ]
    if isinstance(obj, Heuristics):
        named = dict(zip(obj.arg_names, args)) | kwargs
        return _expand(obj.fn, args, {**kwargs, **{k: f(named) for k, f in obj.values.items()}})
    return [(obj, kwargs, None)]


def _spec(a) -> object:
    """What Triton specialises an argument on: dtype and 16-byte alignment, integer 1 or divisible by 16."""
    if isinstance(a, torch.Tensor):
        return str(a.dtype), a.data_ptr() % 16 == 0
    if isinstance(a, int) and not isinstance(a, bool):
        return "1" if a == 1 else a % 16 == 0
    return a if a is None or isinstance(a, bool) else type(a).__name__


def record_variants() -> list[Variant]:
    """Run every op in every dtype, shape class and option set with the launches recorded; one Variant per
    distinct compile."""
    kernels = kernel_objects(launched_only=False)  # a launch under any name is recorded, never run
    variants: dict[tuple, Variant] = {}
    where = {}

    def recorder(obj):
        def run(*args, grid, warmup, **kwargs):
            for fn, kw, config in _expand(obj, args, kwargs):
                key = (fn.__name__, tuple(map(_spec, args)), tuple(sorted(kw.items())))
                v = variants.setdefault(key, Variant(fn, args, kw, where["dtype"], where["shape"], config=config))
                v.ops += [] if where["op"] in v.ops else [where["op"]]

        return run

    for obj in kernels.values():
        obj.run = recorder(obj)
    use_triton, rto_kernels.use_triton = rto_kernels.use_triton, lambda t: True
    autotune = os.environ.get(_autotune.ENV)
    os.environ[_autotune.ENV] = "1"  # the autotuned launches, whatever the caller's setting: every config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny CPU ops: threads only contend (10x slower on a loaded machine)
    try:
        for (fn, dtypes), (shape, s) in itertools.product(OPS.items(), SHAPES.items()):
            tiles = shape.startswith("tiles")
            if tiles and fn is not rto_kernels.rto_advantages:
                continue
            for dtype, kw in ((d, kw) for d in dtypes for kw in _calls(fn, d, s, first_only=tiles)):
                where.update(op=fn.__name__, dtype=str(dtype).removeprefix("torch."), shape=shape)
                try:
                    out = fn(**kw)
                except ValueError:  # a combination the op's own checks refuse (e.g. rto shaping with no DPO logp)
                    continue
                outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
                if outs:
                    where["op"] = f"{fn.__name__} backward"
                    torch.stack([o.sum() for o in outs]).sum().backward()
    finally:
        rto_kernels.use_triton = use_triton
        if autotune is None:
            os.environ.pop(_autotune.ENV)
        else:
            os.environ[_autotune.ENV] = autotune
        torch.set_num_threads(threads)
        for obj in kernels.values():
            del obj.run
    seen = {f"{v.fn.__module__.rsplit('.', 1)[-1]}.{v.fn.__name__}" for v in variants.values()}
    unseen = sorted(set(kernel_objects()) - seen)
    if unseen:
        raise RuntimeError(f"compile_check: {unseen} never launched by the ops swept; add their op to OPS")
    return list(variants.values())


def _weight(v: Variant) -> tuple[int, int]:
    """Flags on, then the larger option codes (shaping, estimator): heavier code paths sort later."""
    flags = [x for k, x in v.kwargs.items() if k not in LAUNCH]
    return sum(x is True for x in flags), sum(x for x in flags if type(x) is int and x < 8)


# The dtypes whose every autotune config the test subset compiles; the others compile the default config (0) only.
TEST_EVERY_CONFIG = ("bfloat16",)


def select(variants: list[Variant], subset: str, kernels: tuple[str, ...] = ()) -> list[Variant]:
    """full: all. test: every kernel in every dtype once, aligned, with the most flags on (the most registers),
    and for a kernel launched in one dtype only the fewest as well (GAE alone); an autotuned kernel so for each
    of its configs in the dtypes of TEST_EVERY_CONFIG, for the default config in the others. smoke: the lightest
    of all, one compile for a rehearsal. `kernels`: keep those kernels only (all when empty)."""
    variants = [v for v in variants if not kernels or v.fn.__name__ in kernels]
    aligned = [v for v in variants if v.shape == "aligned"]
    if subset != "test":
        return variants if subset == "full" else [min(aligned, key=_weight)]
    out = []
    for name in dict.fromkeys(v.fn.__name__ for v in aligned):
        dtypes = list(dict.fromkeys(v.dtype for v in aligned if v.fn.__name__ == name))
        for dtype in dtypes:
            group = [v for v in aligned if (v.fn.__name__, v.dtype) == (name, dtype)]
            configs = list(dict.fromkeys(v.config for v in group))
            for config in configs if dtype in TEST_EVERY_CONFIG else configs[:1]:
                mine = sorted((v for v in group if v.config == config), key=_weight)
                out += [mine[-1]] + ([mine[0]] if len(dtypes) == 1 else [])
    return out


# ---- compiling for a target ----


class StandInDriver:
    """Names a GPU target to Triton's JIT so that it compiles for it; it holds nothing that could launch."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return self.target.arch  # one JIT cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name: str):
        raise AttributeError(f"compile_check: the stand-in driver has no {name!r}; this Triton asked for it")


@contextlib.contextmanager
def active_driver(stand_in: StandInDriver | None):
    """Make `stand_in` Triton's active driver inside the block (None: keep the real one)."""
    from triton.runtime.driver import driver

    previous = driver._active
    if stand_in is not None:
        driver.set_active(stand_in)
    try:
        yield
    finally:
        driver._active = previous


def cubin_resources(cubin: bytes, workdir: Path) -> dict:
    """REG and STACK of the kernel in a cubin, as cuobjdump reads them (what the driver loads)."""
    import triton

    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True)
    fields = dict(tok.split(":", 1) for line in out.stdout.splitlines() if "REG:" in line for tok in line.split())
    if "REG" not in fields:
        raise RuntimeError(f"compile_check: cuobjdump printed no resource usage: {out.stderr.strip()[:200]}")
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]))


def ptxas_spills(kernel, capability: int) -> tuple[int, int] | None:
    """(spill store, spill load) bytes from Triton's own ptxas command run again on the kernel's PTX (its flags
    change the count); None when this Triton's make_cubin takes other arguments."""
    import io

    from triton.compiler import make_backend

    backend = make_backend(kernel.metadata.target)
    opt = backend.parse_options(dict(kernel.metadata._asdict()))
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(kernel.asm["ptx"], {}, opt, capability)
    except Exception:  # another Triton's make_cubin: no report, and judge counts the stack frame as a spill
        return None
    finally:
        os.environ.pop("TRITON_DUMP_PTXAS_LOG")
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return (int(found[1]), int(found[2])) if found else None


def compile_variant(v: Variant, capability: int, shared_limit: int, workdir: Path, on_device: bool) -> dict:
    """Compile one recorded launch for the active target and read its resources; a failure becomes the row."""
    from triton.runtime.jit import JITFunction

    t0 = time.perf_counter()
    try:
        kernel = JITFunction.run(v.fn, *v.args, grid=(1,), warmup=True, **v.kwargs)
    except Exception as exc:  # the table shows what broke; main fails on it
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        return dict(status="FAIL: compile error", error=f"{type(exc).__name__}: {text}")
    row = dict(compile_s=round(time.perf_counter() - t0, 2), shared=kernel.metadata.shared, shared_limit=shared_limit)
    row.update(num_warps=kernel.metadata.num_warps, wgmma="wgmma.mma_async" in kernel.asm["ptx"])
    row.update(cubin_resources(kernel.asm["cubin"], workdir))
    spills = ptxas_spills(kernel, capability) if row["stack"] > 0 else (0, 0)
    row["spill_stores"], row["spill_loads"] = spills or (None, None)
    row["status"] = judge(row, v.dtype)
    if on_device:  # the driver's counts, as Triton reads them when it loads the binary (which checks resources)
        try:
            kernel._init_handles()
            row.update(driver_regs=kernel.n_regs, driver_spills=kernel.n_spills)
        except Exception as exc:  # e.g. OutOfResources: over the device's shared memory
            row.update(status="FAIL: the driver refused it", error=f"{type(exc).__name__}: {exc}"[:300])
    return row


def judge(row: dict, dtype: str) -> str:
    """ok, or why the variant fails (a spill in any dtype fails: every variant is tuned to fit its registers)."""
    if row["shared"] > row["shared_limit"]:
        return f"FAIL: shared memory {row['shared']} B over the {row['shared_limit']} B limit"
    if row["regs"] * 32 * row["num_warps"] > REGISTER_FILE:
        return f"FAIL: {row['regs']} registers x {row['num_warps']} warps exceed the register file"
    unknown = row["spill_stores"] is None  # no ptxas report: a stack frame counts as a spill
    if row["stack"] > 0 if unknown else row["spill_stores"] + row["spill_loads"] > 0:
        return f"FAIL: spills in a {dtype} variant"
    return "ok"


def run_check(variants: list[Variant], targets: list[str], on_device: bool, first: int = 0) -> list[dict]:
    """One row per (target, variant); `index` numbers the variants from `first`."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            capability = int(target.removeprefix("sm_"))
            limit = TARGETS.get(target, (0, 0))[1]  # 0 for a device's own target when warming: not judged
            if on_device:
                limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
            with active_driver(None if on_device else StandInDriver(capability)):
                for i, v in enumerate(variants, first):
                    row = v.describe() | dict(target=target, index=i)
                    rows.append(row | compile_variant(v, capability, limit, Path(tmp), on_device))
                    print(f"{target} {row['kernel']} {v.dtype} {row['flags']}: {rows[-1]['status']}", file=sys.stderr)
    return rows


def _share(job: tuple[int, int, str, list[str], tuple[str, ...]]) -> list[dict]:
    """A worker's part: record the variants itself (the same list in every process), compile every jobs-th."""
    index, jobs, subset, targets, kernels = job
    variants = select(record_variants(), subset, kernels)
    return [r for i in range(index, len(variants), jobs) for r in run_check([variants[i]], targets, False, i)]


def compile_all(
    variants: list[Variant], subset: str, targets: list[str], on_device: bool, jobs: int, kernels: tuple[str, ...] = ()
) -> list[dict]:
    """run_check over `jobs` processes. On a device they compile for its target under the stand-in driver, which
    fills Triton's disk cache; this process then loads each binary (cache hits) to read the driver's counts."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = min(jobs, len(variants))
    if jobs <= 1:
        return run_check(variants, targets, on_device)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        parts = pool.map(_share, [(i, jobs, subset, targets, kernels) for i in range(jobs)])
        rows = [r for part in parts for r in part]
    same = ("kernel", "dtype", "shape", "flags", "launch", "config")
    if any(any(r[k] != variants[r["index"]].describe()[k] for k in same) for r in rows):
        raise RuntimeError("compile_check: the workers recorded other variants than this process")
    if on_device:
        return run_check(variants, targets, on_device)
    return sorted(rows, key=lambda r: (targets.index(r["target"]), r["index"]))


# ---- the table ----


def _cell(r: dict) -> str:
    if "regs" not in r:
        return r["error"]
    spill = "?" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
    driver = f" (driver {r['driver_regs']}, {r['driver_spills']})" if "driver_regs" in r else ""
    return f"{r['regs']}{driver} / {spill} / {r['shared'] // 1024}{' wgmma' if r['wgmma'] else ''}"


def config_summary(rows: list[dict], targets: list[str]) -> list[dict]:
    """One entry per autotuned kernel, dtype and config: its tiles, how many variants, the worst registers and
    shared memory on each target, the variants not ok, and whether every sm_90 variant uses wgmma."""
    out = {}
    for r in rows:
        if r.get("config", "-") == "-":
            continue
        tiles = " ".join(f for f in r["flags"].split() if f.startswith(("BM=", "BV=", "BH=", "BLOCK")))
        e = out.setdefault((r["kernel"], r["dtype"], r["config"]), dict(tiles=tiles, launch=r["launch"], per={}))
        t = e["per"].setdefault(r["target"], dict(variants=0, regs=0, shared_pct=0, not_ok=0, wgmma=0))
        t["variants"] += 1
        t["not_ok"] += r["status"] != "ok"
        t["wgmma"] += bool(r.get("wgmma"))
        t["regs"] = max(t["regs"], r.get("regs", 0))
        if "shared" in r and r["shared_limit"]:
            t["shared_pct"] = max(t["shared_pct"], round(100 * r["shared"] / r["shared_limit"]))
    return [dict(kernel=k, dtype=d, config=c, **e) for (k, d, c), e in out.items()]


def markdown(meta: dict, rows: list[dict]) -> str:
    targets = meta["targets"]
    lines = [f"# Kernel compile table: {', '.join(targets)}, {meta['date']}", "", f"Command: `{meta['command']}`  "]
    lines += [f"triton {meta['triton']}, torch {meta['torch']}; {meta['note']}", ""]
    for t in targets:
        mine = [r for r in rows if r["target"] == t]
        bad = [r for r in mine if r["status"] != "ok"]
        regs = max(r.get("regs", 0) for r in mine)
        smem = max(r["shared"] / r["shared_limit"] for r in mine if "shared" in r)
        lines.append(
            f"- {t}: {len(mine)} variants, {len(mine) - len(bad)} ok, {len(bad)} not; max registers {regs}, max "
            f"shared memory {100 * smem:.0f}% of the limit."
        )
        lines += [
            f"  - {r['kernel']} {r['dtype']} {r['shape']} [{r['flags']}] config {r['config']}: {r['status']}"
            for r in bad
        ]
    configs = config_summary(rows, targets)
    if configs:
        lines += ["", "Autotune configurations (config 0 is the default, the one RTO_AUTOTUNE=0 uses): per target, the"]
        lines += [
            "variants compiled, the most registers, the most shared memory (% of the limit), how many are not ok,"
        ]
        lines += ["and how many use wgmma.", ""]
        lines += ["| kernel | dtype | config | tiles | warps/stages | " + " | ".join(targets) + " |"]
        lines += ["|" + "---|" * (5 + len(targets))]
        for c in configs:
            cells = []
            for t in targets:
                p = c["per"].get(t)
                cells.append(
                    "-"
                    if p is None
                    else f"{p['variants']} / {p['regs']} regs / {p['shared_pct']}% / {p['not_ok']} not ok / "
                    f"{p['wgmma']} wgmma"
                )
            lines.append(
                f"| {c['kernel']} | {c['dtype']} | {c['config']} | {c['tiles']} | {c['launch']} | "
                + " | ".join(cells)
                + " |"
            )
    lines += ["", "Cells: registers / spill store/load bytes / shared KiB (wgmma: Hopper's async MMA in the PTX).", ""]
    lines += [
        "| kernel | launched by | dtype | shape | constexprs | warps/stages | config | " + " | ".join(targets) + " |"
    ]
    lines += ["|" + "---|" * (7 + len(targets))]
    for group in zip(*([r for r in rows if r["target"] == t] for t in targets)):
        r = group[0]
        desc = (
            f"{r['kernel']} | {r['ops']} | {r['dtype']} | {r['shape']} | {r['flags']} | {r['launch']} | {r['config']}"
        )
        lines.append(f"| {desc} | " + " | ".join(_cell(g) for g in group) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("full", "test", "smoke"), default="full", help="see `select`")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compiling processes")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--device", action="store_true", help="compile for this CUDA device; the driver's counts")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names to keep (default: every kernel)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for compile_table_*.{md,json}")
    parser.add_argument("--tag", default="", help="put in the file names (the campaign: the device)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if any(t not in TARGETS for t in targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if rto_kernels.interpreting():
        parser.error("TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it")
    if args.device and not torch.cuda.is_available():
        parser.error("--device needs a CUDA device")
    if args.device:
        targets = ["sm_{}{}".format(*torch.cuda.get_device_capability())]
    import triton

    t0 = time.perf_counter()
    kernels = tuple(k for k in args.kernels.split(",") if k)
    variants = select(record_variants(), args.subset, kernels)
    rows = compile_all(variants, args.subset, targets, args.device, args.jobs, kernels)
    times = os.times()  # children: the workers and every ptxas, once waited for
    meta = dict(date=dt.date.today().isoformat(), targets=targets, triton=triton.__version__, torch=torch.__version__)
    meta.update(subset=args.subset, variants=len(variants), wall_s=round(time.perf_counter() - t0, 1))
    meta.update(cpu_s=round(sum(times[:4]), 1), cpus=os.cpu_count(), jobs=args.jobs)
    meta["command"] = " ".join(["python benchmarks/compile_check.py", *(sys.argv[1:] if argv is None else argv)])
    where = f"on {torch.cuda.get_device_name()}" if args.device else "with a stand-in driver on the CPU, no GPU"
    meta["note"] = (
        f"compiled {where}: {len(variants)} variants recorded from the host code, {len(rows)} compiles in "
        f"{meta['wall_s']} s wall, {meta['cpu_s']} s CPU (ptxas included; {args.jobs} jobs, {meta['cpus']} CPUs)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "_".join(["compile_table", *([args.tag] if args.tag else []), meta["date"]])
    stem = args.out / (name + ("" if args.subset == "full" else f"_{args.subset}"))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    failed = [r for r in rows if r["status"].startswith("FAIL")]
    print(f"wrote {stem}.json and .md: {len(rows)} compiles, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
