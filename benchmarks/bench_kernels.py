"""Kernel microbenchmarks: the fused log-prob head and the fused rewards + GAE, against the peers' ways.

Run:  python benchmarks/bench_kernels.py            (full shapes on CUDA; small reference shapes on CPU)
      python benchmarks/bench_kernels.py --quick    (small shapes everywhere, for CI)

On CUDA, side by side in one process: median time of `triton.testing.do_bench`, extra peak memory (peak
allocated during the call minus what was allocated before it), and the achieved rate against the device's
measured bf16 matmul rate and copy bandwidth. Variants:
- linear_logprobs: ours (Triton), eager (materialised logits, fp32 log_softmax, gather), torch.compile of
  eager, Liger's fused linear cross-entropy with reduction="none" (when importable), and the bare matmul; for
  each head (`--heads`): plain, and with the head transforms of some model families (a bias [V], a logit
  multiplier and a softcap, alone and together), where ours is also timed against our plain head.
- rto_advantages: ours (Triton, one pass), the Python loop over time that peer trainers use (vectorised
  rewards, then GAE step by step), its torch.compile (short rows only: compiling a 2048-step unrolled loop
  takes too long to be a fair baseline), and the memory floor (bytes that must move / copy bandwidth).
On CPU the Triton kernels do not run compiled, so the script times eager and our chunked CPU path at small shapes
and says that GPU numbers need a GPU. Results go to benchmarks/results/kernels_<device>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rto_kernels
from rto_kernels import reference

RESULTS = Path(__file__).resolve().parent / "results"


# ---- measurement ----


def time_ms(fn: Callable[[], object], device: str, reps: int = 5) -> float:
    """Median wall time of fn in milliseconds (do_bench on CUDA)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extra_peak_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory allocated during one call beyond what was allocated before it, in MiB (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_peaks(device: str, quick: bool) -> dict:
    """Measured bf16 matmul rate (TFLOP/s) and copy bandwidth (GB/s) of the device."""
    if device != "cuda":
        return {}
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, device)
    x = torch.empty(2**28 if not quick else 2**26, device=device, dtype=torch.float32)
    copy_ms = time_ms(lambda: x.clone(), device)
    return {
        "matmul_bf16_tflops": 2 * n**3 / mm_ms / 1e9,
        "copy_gbps": 2 * x.numel() * 4 / copy_ms / 1e6,
    }


# ---- linear_logprobs ----


# Head transforms (docs/kernels.md): name -> keyword arguments of linear_logprobs, given the bias [V].
HEADS = {
    "plain": lambda bias: {},
    "bias": lambda bias: dict(bias=bias),  # Phi, GPT-J
    "softcap": lambda bias: dict(softcap=30.0),  # Gemma 2 and 3
    "bias+scale+softcap": lambda bias: dict(bias=bias, logit_scale=0.0625, softcap=30.0),  # every flag at once
}


def eager_head(hidden, weight, targets, bias=None, logit_scale=1.0, softcap=None):
    """Peer-style head: materialised logits, the head transform, fp32 log_softmax, gather."""
    logits = hidden @ weight.T if bias is None else hidden @ weight.T + bias  # [N, V]
    logits = reference.head_logits(logits.float(), logit_scale=logit_scale, softcap=softcap)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def ours_head(hidden, weight, targets, **head):
    return rto_kernels.linear_logprobs(hidden, weight, targets, **head)


def bare_matmul(hidden, weight, targets, **head):
    return hidden @ weight.T


def liger_head():
    """Liger's fused linear cross-entropy returning -logp per token, or None when not importable."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None

    def head(hidden, weight, targets):
        out = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
        return -(out[0] if isinstance(out, tuple) else out)

    return head


def bench_linear(N: int, H: int, V: int, dtype: torch.dtype, device: str, peaks: dict, head_name: str) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=gen) / H**0.5
    bias = torch.randn(V, device=device, dtype=dtype, generator=gen)
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    grad_out = torch.randn(N, device=device, generator=gen)
    head = HEADS[head_name](bias)
    ours = "rto (ours)" if rto_kernels.use_triton(hidden) else "rto chunked (CPU path)"
    variants: dict[str, Callable | None] = {ours: ours_head, "eager": eager_head}
    if device == "cuda":
        variants["torch.compile(eager)"] = torch.compile(eager_head, dynamic=False)
        if head_name == "plain":
            variants["liger fused linear CE"] = liger_head()
    if head_name == "plain":
        variants["bare matmul"] = bare_matmul

    rows = []
    shape = f"N={N} H={H} V={V} {str(dtype).removeprefix('torch.')}"
    for name, fn_head in variants.items():
        if fn_head is None:
            rows.append(
                dict(op="linear_logprobs", shape=shape, head=head_name, variant=name, mode="-", note="not installed")
            )
            continue
        leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]

        def fwd(fn_head=fn_head):
            with torch.no_grad():
                return fn_head(hidden, weight, targets, **head)

        def fwd_bwd(fn_head=fn_head, leaves=leaves):
            h, w, b = leaves
            h.grad = w.grad = b.grad = None
            out = fn_head(h, w, targets, **HEADS[head_name](b))
            g = grad_out if out.ndim == 1 else torch.ones_like(out)
            out.backward(g.to(out.dtype))

        for mode, fn, flops in (("fwd", fwd, 2 * N * H * V), ("fwd+bwd", fwd_bwd, 6 * N * H * V)):
            ms = time_ms(fn, device)
            tflops = flops / ms / 1e9
            row = dict(
                op="linear_logprobs",
                shape=shape,
                head=head_name,
                variant=name,
                mode=mode,
                ms=ms,
                extra_peak_mib=extra_peak_mb(fn, device),
                rate=tflops,
                rate_unit="TFLOP/s",
            )
            if "matmul_bf16_tflops" in peaks:
                row["pct_of_peak"] = 100 * tflops / peaks["matmul_bf16_tflops"]
            rows.append(row)
        del leaves
    return rows


# ---- rto_advantages ----


def bench_advantages(B: int, T: int, device: str, peaks: dict, compile_loop: bool) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    logp = -torch.rand(B, T, device=device, generator=gen) * 3
    ref = logp + 0.1 * torch.randn(B, T, device=device, generator=gen)
    dpo = logp + 0.1 * torch.randn(B, T, device=device, generator=gen)
    values = torch.randn(B, T, device=device, generator=gen)
    score = torch.randn(B, device=device, generator=gen)
    lengths = torch.randint(T // 4, T + 1, (B,), device=device, generator=gen)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    kw = dict(kl_coef=0.01, dpo_scale=0.05, dpo_clip=0.05, score_clip=10.0, gamma=1.0, lam=0.95)
    args = (logp, ref, dpo, score, values, mask)

    variants: dict[str, Callable | None] = {}
    if rto_kernels.use_triton(logp):
        variants["rto (ours)"] = lambda: rto_kernels.rto_advantages(*args, **kw)
    variants["python loop (peers)"] = lambda: reference.rto_advantages(*args, **kw)
    if device == "cuda":
        compiled = torch.compile(reference.rto_advantages, dynamic=False) if compile_loop else None
        variants["torch.compile(loop)"] = (lambda: compiled(*args, **kw)) if compiled else None

    # must move: 4 fp32 inputs + bool mask in, 3 fp32 outputs out, per token; the score per row
    floor_bytes = B * T * (4 * 4 + 1 + 3 * 4) + B * 4
    base = dict(op="rto_advantages", shape=f"B={B} T={T} fp32", head="-")
    rows = []
    if "copy_gbps" in peaks:
        floor_ms = floor_bytes / peaks["copy_gbps"] / 1e6
        rows.append(
            dict(base, variant="memory floor", mode="fwd", ms=floor_ms, rate=peaks["copy_gbps"], rate_unit="GB/s")
        )
    for name, fn in variants.items():
        if fn is None:
            note = "not run: compiling a 2048-step unrolled loop takes too long"
            rows.append(dict(base, variant=name, mode="-", note=note))
            continue
        ms = time_ms(fn, device)
        peak = extra_peak_mb(fn, device)
        rate = floor_bytes / ms / 1e6
        rows.append(dict(base, variant=name, mode="fwd", ms=ms, extra_peak_mib=peak, rate=rate, rate_unit="GB/s"))
    return rows


# ---- report ----


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def device_slug(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{os.cpu_count()}cores-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


OURS = ("rto (ours)", "rto chunked (CPU path)")


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each variant over the first one timed in its (op, shape, head, mode) group that is not ours, and
    for ours with a head transform, its time over our plain head's (the transforms' cost)."""
    timed = [r for r in rows if "ms" in r and r["variant"] != "memory floor"]
    for row in timed:
        group = [r for r in timed if all(r[k] == row[k] for k in ("op", "shape", "head", "mode"))]
        base = next((r for r in group if r["variant"] not in OURS), None)
        if base is not None:
            row["speedup_vs_" + base["variant"].split(" ")[0]] = base["ms"] / row["ms"]
        if row["variant"] in OURS and row["head"] not in ("plain", "-"):
            plain = [r for r in timed if r["head"] == "plain" and all(r[k] == row[k] for k in ("op", "shape", "mode"))]
            plain = [r for r in plain if r["variant"] == row["variant"]]
            if plain:
                row["time_vs_plain_head"] = row["ms"] / plain[0]["ms"]


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Kernel benchmark: {meta['device_name']}, {meta['date']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"torch {meta['torch']}, triton {meta['triton']}",
        "",
    ]
    if meta.get("peaks"):
        p = meta["peaks"]
        lines += [
            f"Measured device peaks: bf16 matmul {p['matmul_bf16_tflops']:.0f} TFLOP/s, "
            f"copy {p['copy_gbps']:.0f} GB/s.",
            "",
        ]
    lines += [
        meta["note"],
        "",
        "| op | shape | head | variant | mode | ms (median) | extra peak MiB | rate | % of peak | speed-up vs baseline "
        "| time vs plain head |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['head']} | {r['variant']} | - | {r.get('note', '')} | | | | | |"
            )
            continue
        peak = "" if r.get("extra_peak_mib") is None else f"{r['extra_peak_mib']:.0f}"
        pct = f"{r['pct_of_peak']:.0f}%" if "pct_of_peak" in r else ""
        if r["op"] == "rto_advantages" and "copy_gbps" in meta.get("peaks", {}):
            pct = f"{100 * r['rate'] / meta['peaks']['copy_gbps']:.0f}%"
        speed = next((f"{v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_")), "")
        vs_plain = f"{r['time_vs_plain_head']:.2f}x" if "time_vs_plain_head" in r else ""
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['head']} | {r['variant']} | {r['mode']} | {r['ms']:.3f} | {peak} | "
            f"{r['rate']:.2f} {r['rate_unit']} | {pct} | {speed} | {vs_plain} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (CI smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    parser.add_argument(
        "--heads",
        default=",".join(HEADS),
        help=f"comma-separated head variants of linear_logprobs (default: all of {', '.join(HEADS)})",
    )
    args = parser.parse_args(argv)
    heads = [h for h in args.heads.split(",") if h]
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        parser.error(f"--heads: unknown head {unknown[0]!r}; choose from {', '.join(HEADS)}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if rto_kernels.interpreting():
        print("TRITON_INTERPRET=1 is set: interpreter timings mean nothing; unset it to benchmark.", file=sys.stderr)
        return 2
    peaks = device_peaks(device, args.quick)
    rows: list[dict] = []
    if device == "cuda":
        linear_shapes = [(1024, 1024, 32000)] if args.quick else [(16384, 4096, 128256), (4096, 2048, 32000)]
        adv_shapes = [(64, 256)] if args.quick else [(512, 2048), (512, 256)]
        note = "GPU run: every variant measured side by side in this process."
        dtype = torch.bfloat16
    else:
        linear_shapes = [(128, 64, 2048)] if args.quick else [(512, 256, 8192)]
        adv_shapes = [(8, 64)] if args.quick else [(64, 256)]
        note = (
            "CPU run: eager and our chunked CPU path, at small shapes. The Triton kernels run compiled only "
            "on a GPU: GPU numbers need a GPU (run this script on a CUDA machine)."
        )
        dtype = torch.float32
    for N, H, V in linear_shapes:
        for head in heads:
            print(f"linear_logprobs N={N} H={H} V={V} head={head} ...", file=sys.stderr)
            rows += bench_linear(N, H, V, dtype, device, peaks, head)
            if device == "cuda":
                torch.cuda.empty_cache()
    for B, T in adv_shapes:
        print(f"rto_advantages B={B} T={T} ...", file=sys.stderr)
        rows += bench_advantages(B, T, device, peaks, compile_loop=T <= 256)
    add_ratios(rows)

    date = dt.date.today().isoformat()
    slug = device_slug(device)
    meta = dict(
        device=device,
        device_name=torch.cuda.get_device_name() if device == "cuda" else slug,
        date=date,
        torch=torch.__version__,
        triton=triton_version(),
        peaks=peaks,
        note=note,
        quick=args.quick,
        command="python benchmarks/bench_kernels.py"
        + (" --quick" if args.quick else "")
        + f" --heads {','.join(heads)}",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{slug}_{date}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    table = markdown(meta, rows)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
