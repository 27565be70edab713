"""The GPU path checked with no GPU: the kernels compile for sm_80 and sm_90 (benchmarks/compile_check.py) and the
GPU campaign's rehearsal runs end to end (benchmarks/gpu_campaign.py --dry-run).

The full compile table (every variant the host code can launch, each autotune config of the log-prob kernels its
own variant: 1728 compiles, 23 minutes of CPU here, 36 minutes on two shared cores) is too long for the suite, so
it compiles `compile_check.select(..., "test")`: every kernel in every dtype with the most flags on, for both
targets, in every autotune config for bf16 and in the default config for fp16 and fp32 (58 compiles, about 75 s
cold here; every config in every dtype would be 110 compiles, about 150 s). `python benchmarks/compile_check.py`
writes the full table to benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import compile_check, gpu_campaign
from rto_kernels import _autotune, interpreting

pytest.importorskip("triton", reason="compiling kernels needs Triton (no wheels for this platform)")

REPO = Path(__file__).resolve().parents[1]
# Per-block opt-in shared memory (CUDA programming guide, compute capabilities table): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.fixture(scope="module")
def compile_rows(tmp_path_factory) -> list[dict]:
    """The test subset compiled for both targets, in a process of its own (no interpreter, no stand-in driver
    left behind in this one)."""
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "benchmarks/compile_check.py", "--subset", "test", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tables = list(out.glob("compile_table_*_test.json"))
    assert tables, f"compile_check wrote no table (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(tables[0].read_text())["rows"]


def _name(r: dict) -> str:
    return f"{r['target']} {r['kernel']} {r['dtype']} [{r['flags']}]"


def test_every_kernel_and_dtype_compiles_for_both_targets(compile_rows):
    errors = [f"{_name(r)}: {r['error']}" for r in compile_rows if r["status"] == "FAIL: compile error"]
    assert not errors, "\n".join(errors)
    launched = {k.split(".")[-1] for k in compile_check.kernel_objects()}
    for target in SHARED_LIMIT:
        mine = [r for r in compile_rows if r["target"] == target]
        assert {r["kernel"] for r in mine} == launched, f"{target}: not every launched kernel was compiled"
        logprob_kernels = {r["kernel"] for r in mine if "logprobs" in r["ops"]}
        for kernel in logprob_kernels:
            dtypes = {r["dtype"] for r in mine if r["kernel"] == kernel}
            assert dtypes == {"bfloat16", "float16", "float32"}, f"{target} {kernel}: dtypes {sorted(dtypes)}"


def test_shared_memory_within_each_target_limit(compile_rows):
    for r in compile_rows:
        assert r["shared_limit"] == SHARED_LIMIT[r["target"]], _name(r)
        assert 0 <= r["shared"] <= r["shared_limit"], f"{_name(r)}: {r['shared']} B of shared memory"


def test_no_variant_spills(compile_rows):
    """No variant spills registers, in any dtype, on either target."""
    spilled = [f"{_name(r)}: {r['spill_stores']}/{r['spill_loads']} B" for r in compile_rows if r["status"] != "ok"]
    assert not spilled, "spilling variants:\n" + "\n".join(spilled)


def test_bf16_head_uses_wgmma_on_hopper_only(compile_rows):
    """Every autotune config of the bf16 forward (and of the 16-bit head kernels compiled) keeps Hopper's async MMA
    on sm_90; none exists on sm_80."""
    head = [r for r in compile_rows if r["kernel"] in ("_linear_fwd_kernel", "_linear_dz_kernel")]
    fwd = [r for r in head if r["kernel"] == "_linear_fwd_kernel" and r["dtype"] == "bfloat16"]
    assert {r["target"] for r in fwd} == set(SHARED_LIMIT) and len({r["config"] for r in fwd}) > 1
    low = [r for r in head if r["dtype"] in ("bfloat16", "float16")]
    lost = [_name(r) + f" config {r['config']}" for r in low if r["target"] == "sm_90" and not r["wgmma"]]
    assert not lost, "the 16-bit head lost Hopper's wgmma:\n" + "\n".join(lost)
    assert not any(r["wgmma"] for r in head if r["target"] == "sm_80")


def test_every_autotune_config_is_compiled(compile_rows):
    """The test subset compiles each config of each log-prob kernel's list in the dtypes of TEST_EVERY_CONFIG, and
    the default config (0) in the others (benchmarks/compile_check.py: the full table has every config in every
    variant)."""
    for kernel, lists in _autotune_lists().items():
        for dtype in ("bfloat16", "float16", "float32"):
            n = len(lists[_autotune.width(getattr(torch, dtype))])
            want = {str(i) for i in range(n)} if dtype in compile_check.TEST_EVERY_CONFIG else {"0"}
            for target in SHARED_LIMIT:
                mine = [r for r in compile_rows if (r["kernel"], r["dtype"], r["target"]) == (kernel, dtype, target)]
                assert {r["config"] for r in mine} == want, f"{target} {kernel} {dtype}"


def test_judge_fails_shared_memory_registers_and_low_precision_spills():
    ok = dict(shared=1024, shared_limit=2048, regs=128, num_warps=8, stack=0, spill_stores=0, spill_loads=0)
    assert compile_check.judge(ok, "bfloat16") == "ok"
    assert compile_check.judge(ok | dict(shared=4096), "bfloat16").startswith("FAIL: shared memory")
    assert compile_check.judge(ok | dict(regs=255, num_warps=16), "float32").startswith("FAIL: 255 registers")
    spill = ok | dict(stack=8, spill_stores=4, spill_loads=4)
    assert compile_check.judge(spill, "float16") == "FAIL: spills in a float16 variant"
    assert compile_check.judge(spill, "float32") == "FAIL: spills in a float32 variant"
    assert compile_check.judge(ok | dict(stack=16), "bfloat16") == "ok"  # a stack frame without spills
    unknown = ok | dict(stack=16, spill_stores=None, spill_loads=None)  # no ptxas report: the frame counts
    assert compile_check.judge(unknown, "bfloat16").startswith("FAIL: spills")


@pytest.mark.skipif(interpreting(), reason="records compiled launches; the interpreter's kernels are not")
def test_recorded_variants_cover_every_flag_shaping_and_estimator():
    variants = compile_check.record_variants()
    fwd = [v for v in variants if v.fn.__name__ == "_linear_fwd_kernel" and v.shape == "aligned"]
    for dtype in ("bfloat16", "float16", "float32"):
        combos = {tuple(v.kwargs[f] for f in ("ENTROPY", "HAS_BIAS", "HAS_SOFTCAP")) for v in fwd if v.dtype == dtype}
        assert len(combos) == 8, f"{dtype}: {sorted(combos)}"
    adv = [v for v in variants if v.fn.__name__ == "_advantages_kernel" and v.kwargs["COMPUTE_REWARDS"]]
    assert {v.kwargs["SHAPING"] for v in adv} == {0, 1, 2, 3}
    assert {v.kwargs["KL_EST"] for v in adv} == {0, 1, 2}
    tiles = {v.kwargs["BLOCK_T"] for v in variants if v.fn.__name__ == "_advantages_kernel"}
    assert tiles == {2**k for k in range(4, 11)}  # next_pow2(T) from 16 to the 1024 cap
    assert any(v.shape == "ragged" and v.fn.__name__ == "_linear_fwd_kernel" for v in variants)


def test_an_autotuned_kernel_contributes_every_config():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK": 16}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2)]

    @triton.autotune(configs=configs, key=[])
    @triton.jit
    def zero(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    expanded = compile_check._expand(zero, (None,), {})
    assert [(kw["BLOCK"], kw["num_warps"], config) for _, kw, config in expanded] == [(16, 2, 0), (64, 4, 1)]
    assert expanded[1][1]["num_stages"] == 2 and all(fn is zero.fn for fn, _, _ in expanded)

    def prune(configs, named_args, **kwargs):  # what the log-prob autotuners do: the list of the launch's width
        return configs[1:] if named_args["x_ptr"] == "wide" else configs[:1]

    pruned = triton.autotune(configs=configs, key=[], prune_configs_by=dict(early_config_prune=prune))(zero.fn)
    assert [kw["BLOCK"] for _, kw, _ in compile_check._expand(pruned, ("wide",), {})] == [64]
    assert [(kw["BLOCK"], c) for _, kw, c in compile_check._expand(pruned, ("narrow",), {})] == [(16, 0)]


def _autotune_lists() -> dict:
    from rto_kernels import linear_logprobs_op as lp
    from rto_kernels import logprobs_from_logits_op as lg

    return {
        "_linear_fwd_kernel": lp.FWD_CONFIGS,
        "_linear_dz_kernel": lp.DZ_CONFIGS,
        "_logits_fwd_kernel": lg.FWD_CONFIGS,
        "_logits_bwd_kernel": lg.BWD_CONFIGS,
    }


@pytest.mark.skipif(interpreting(), reason="records compiled launches; the interpreter's kernels are not")
def test_recorded_variants_are_every_config_of_each_list(monkeypatch):
    """Each log-prob kernel is recorded in every config of its width's list, in the list's order, every flag set
    and shape class in each (also with RTO_AUTOTUNE=0 in the environment: the check compiles what could run)."""
    monkeypatch.setenv(_autotune.ENV, "0")
    variants = compile_check.record_variants()
    for kernel, lists in _autotune_lists().items():
        for dtype in ("bfloat16", "float16", "float32"):
            configs = lists[_autotune.width(getattr(torch, dtype))]
            mine = [v for v in variants if (v.fn.__name__, v.dtype) == (kernel, dtype)]
            for i, cfg in enumerate(configs):
                got = [v for v in mine if v.config == i]
                assert got, f"{kernel} {dtype}: config {i} never recorded"
                tiles = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                assert all({k: v.kwargs[k] for k in tiles} == tiles for v in got), f"{kernel} {dtype} config {i}"
            per_config = {i: len([v for v in mine if v.config == i]) for i in range(len(configs))}
            assert len(set(per_config.values())) == 1 and len(mine) == sum(per_config.values()), per_config
    assert os.environ[_autotune.ENV] == "0"  # restored


def test_static_estimate_is_the_numbers_written_down():
    est = gpu_campaign.static_estimate()
    h100 = est["rates"]["H100 (798 TFLOP/s, 3.0 TB/s measured)"]
    assert round(2 * 16384 * 4096 * 128256 / 798e12 * 1e3, 2) == round(h100["fwd_ms"], 2) == 21.57
    assert h100["fwd_memory_ms"] < h100["fwd_ms"] / 50  # compute-bound by far
    doc = gpu_campaign.static_estimate.__doc__
    for number in ("17.21 TFLOP", "1.185 GB", "21.57 ms", "33.2", "21.79 ms", "64.7", "12.6 GB"):
        assert number in doc, f"static_estimate's docstring no longer says {number}"


def test_campaign_dry_run_runs_every_step(tmp_path):
    assert gpu_campaign.main(["--dry-run", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("campaign_*_summary.json")
    data = json.loads(path.read_text())
    assert [s["step"] for s in data["steps"]] == ["tests", "kernels", "step", "compile"]
    assert all(s["status"] == "ok" for s in data["steps"]), data["steps"]
    gpu = data["meta"]["gpu_commands"]
    assert gpu["tests"].startswith("python -m pytest -m gpu tests")
    assert "bench_step.py --shape 1b --batch 64" in gpu["step"] and "--device" in gpu["compile"]
    md = path.with_suffix(".md").read_text()
    assert "tests collected" in md and "Static estimate" in md and "21.57" in md
    (smoke,) = tmp_path.glob("compile_table_*_smoke.json")
    assert [r["status"] for r in json.loads(smoke.read_text())["rows"]] == ["ok"]
    assert list(tmp_path.glob("kernels_*_quick.json")) and list(tmp_path.glob("campaign_*_kernels.log"))


def test_campaign_reads_the_autotune_choices_from_the_kernel_log():
    """TRITON_PRINT_AUTOTUNING=1 output, in the two formats of Triton 3.x, becomes one row per tuning."""
    log = (
        "Triton autotuning for function _linear_fwd_kernel,\nwith key as (16384, 4096, 128256, False, False, False, "
        "'torch.bfloat16'),\nfinished after 2.31s,\nbest config selected: BM: 128, BV: 64, BH: 64, num_warps: 8, "
        "num_ctas: 1, num_stages: 3, maxnreg: None, ir_override: None;\nlinear_logprobs N=4096 ...\n"
        "Triton autotuning for function _logits_fwd_kernel finished after 0.50s; best config selected: BM: 4, "
        "BV: 1024, num_warps: 8, num_ctas: 1, num_stages: 3, maxnreg: None;\n"
    )
    fwd, logits = gpu_campaign.autotune_choices(log)
    assert fwd == dict(
        kernel="_linear_fwd_kernel",
        key="(16384, 4096, 128256, False, False, False, 'torch.bfloat16')",
        seconds=2.31,
        config="BM: 128, BV: 64, BH: 64, num_warps: 8, num_stages: 3",
    )
    assert (logits["kernel"], logits["key"], logits["config"]) == (
        "_logits_fwd_kernel",
        "",
        "BM: 4, BV: 1024, num_warps: 8, num_stages: 3",
    )
    step = {s.name: s for s in gpu_campaign.STEPS}["kernels"]
    assert step.env == {"TRITON_PRINT_AUTOTUNING": "1"}


def test_campaign_skips_what_it_has_no_time_for_and_packs_for_out(tmp_path, monkeypatch):
    """With $OUT set (the device machine's return folder, a few files only) and no --out: one archive of every
    result and the summary beside it."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_campaign.main(["--dry-run", "--budget", "0"]) == 0
    (archive,) = tmp_path.glob("campaign_*.tar.gz")
    (summary,) = tmp_path.glob("campaign_*_summary.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, summary.name])
    with tarfile.open(archive) as tar:
        (packed,) = [m for m in tar.getmembers() if m.name.endswith("_summary.json")]
        steps = json.load(tar.extractfile(packed))["steps"]
    assert [s["status"] for s in steps] == ["skipped: out of time"] * 4


def test_a_step_past_its_time_is_killed_with_its_children(tmp_path):
    child = tmp_path / "child.pid"
    code = (
        f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(child)!r}, 'w').write(str(p.pid))"
    )
    t0 = time.monotonic()
    argv = [sys.executable, "-c", code + "; time.sleep(60)"]
    # 20 s: the child must have started (and written its pid) before the kill, even on a loaded machine
    result = gpu_campaign.run_step(gpu_campaign.STEPS[0], argv, dict(os.environ), tmp_path / "log", 20)
    assert result["status"] == "timeout after 20 s" and time.monotonic() - t0 < 50
    assert child.exists(), "the step did not start its child within 20 s"
    status = Path(f"/proc/{child.read_text()}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead and not yet reaped
