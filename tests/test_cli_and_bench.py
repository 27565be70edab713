"""The `rto` command and the kernel benchmark's quick mode, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import bench_kernels
from rto.cli import main


def test_rto_info_reports_the_kernel_path(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out
    assert "PyTorch reference" in out  # CPU without the interpreter


def test_python_dash_m_rto_runs():
    proc = subprocess.run([sys.executable, "-m", "rto", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("rto")


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_bench_kernels_quick_writes_results(tmp_path):
    assert bench_kernels.main(["--quick", "--out", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("kernels_*_quick.json")
    data = json.loads(json_file.read_text())
    timed = {(r["op"], r["variant"], r["mode"]): r for r in data["rows"] if "ms" in r}
    for key in [
        ("linear_logprobs", "eager", "fwd"),
        ("linear_logprobs", "eager", "fwd+bwd"),
        ("linear_logprobs", "bare matmul", "fwd"),
        ("rto_advantages", "python loop (peers)", "fwd"),
    ]:
        assert key in timed, f"missing {key}"
        assert timed[key]["ms"] > 0
    md = json_file.with_suffix(".md").read_text()
    assert "GPU numbers need a GPU" in md
    heads = ("plain", "bias", "softcap", "bias+scale+softcap")
    lp = {(r["head"], r["variant"], r["mode"]) for r in data["rows"] if r["op"] == "linear_logprobs" and "ms" in r}
    for head in heads:  # every head transform, ours (the chunked CPU path) and eager, forward and backward
        for variant in ("rto chunked (CPU path)", "eager"):
            assert {(head, variant, "fwd"), (head, variant, "fwd+bwd")} <= lp, (head, variant)
    assert md.count("\n| linear_logprobs") == len(lp)


def test_bench_step_quick_runs_both_variants(tmp_path):
    from benchmarks import bench_step

    assert bench_step.main(["--shape", "micro", "--quick", "--out", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("step_micro_*_quick.json")
    runs = json.loads(json_file.read_text())["runs"]
    for variant in ("ours", "peer"):
        assert set(runs[variant]["times"]) == {"generate", "score", "advantages", "guard", "update", "sync"}
        assert all(t > 0 for t in runs[variant]["times"].values())
        assert runs[variant]["tokens"]["generated"] > 0 and 0 < runs[variant]["update_mfu"] < 1
    assert "| whole step |" in json_file.with_suffix(".md").read_text()
