# One entry point for people and CI. `make test` is what .ci/run calls.
PY ?= python

.PHONY: setup test test-kernels test-unit lint format bench bench-step reproduce demo gpu-test compile-check gpu-campaign

# torch first: a bare torch requirement with no torch installed would pull the CUDA build.
setup:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

# Kernel tests run the real Triton kernels through the interpreter, which must be chosen before import:
# they get a process of their own; the rest runs on the reference path.
test: setup lint test-kernels test-unit

test-kernels:
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels

test-unit:
	$(PY) -m pytest tests --ignore=tests/kernels

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Full-size kernel benchmark on a CUDA machine; small reference shapes on CPU.
bench:
	$(PY) benchmarks/bench_kernels.py

# The main job: the whole pipeline on the embedded toy world, report in runs/toy/report.md.
demo: setup
	$(PY) -m rto pipeline --recipe toy

# One full RTO step against a peer-style baseline (tiny shape on CPU; --shape 1b on a GPU).
bench-step:
	$(PY) benchmarks/bench_step.py

# PPO vs RTO (and RS-PPO, DDPO) on the toy world over 3 seeds, results under benchmarks/results/.
reproduce:
	$(PY) benchmarks/reproduce_toy.py --seeds 0 1 2

gpu-test:
	$(PY) -m pytest -m gpu tests

# Every kernel variant compiled for sm_80/sm_90 on the CPU (no GPU needed); full table into benchmarks/results/.
compile-check:
	$(PY) benchmarks/compile_check.py

# One H100/H200, about 9 minutes: GPU tests, kernel and step benchmarks, the device's compile table, one summary.
# `make gpu-campaign ARGS=--dry-run` rehearses it anywhere (CI runs that through tests/test_gpu_compile.py).
gpu-campaign:
	$(PY) benchmarks/gpu_campaign.py $(ARGS)
