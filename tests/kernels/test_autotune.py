"""Autotuning of the log-prob kernels (rto_kernels._autotune): the switch, the row bucket of the key, the
interpreter's fixed tiles, and every configuration of every list against the float64 truth.

The per-config tests run under the interpreter, pretending to be compiled (`_autotune.interpreting` patched) so
that the GPU lists and sizing are used, with each autotuner pruned to the one configuration under test: nothing is
timed, and the real autotuned launch path runs with that configuration's tiles, splits and chunks. They have no
GPU variant: compiling every configuration would not fit the GPU campaign's test step, and on a GPU the realistic
tests (test_logprobs.py) check the configuration the autotuner chose.
"""

from __future__ import annotations

import pytest
import torch

import rto_kernels
from rto_kernels import _autotune, interpreting, reference
from rto_kernels import linear_logprobs_op as lp_mod
from rto_kernels import logprobs_from_logits_op as lg_mod
from tests.kernels._util import LOGPROB_ATOL, check_against_truth, eager_linear, eager_logits, linear_case

LINEAR = ((lp_mod._linear_fwd_tuned, lp_mod.FWD_CONFIGS), (lp_mod._linear_dz_tuned, lp_mod.DZ_CONFIGS))
LOGITS = ((lg_mod._logits_fwd_tuned, lg_mod.FWD_CONFIGS), (lg_mod._logits_bwd_tuned, lg_mod.BWD_CONFIGS))
MOST = max(len(c) for _, lists in LINEAR + LOGITS for c in lists.values())
INTERPRETED = pytest.mark.skipif(not interpreting(), reason="under the interpreter (TRITON_INTERPRET=1) only")


def _force(monkeypatch, tuners, dtype: torch.dtype, index: int) -> list:
    """Launch every autotuner in `tuners` with configuration `index` of its list for `dtype` (its last when the list
    is shorter), untimed; returns those configurations."""
    lists = [lists[_autotune.width(dtype)] for _, lists in tuners]
    if index >= max(map(len, lists)):
        pytest.skip(f"{index + 1} configurations for {dtype} in no list")
    monkeypatch.delenv(_autotune.ENV, raising=False)
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)  # the GPU lists and sizing (the kernels' own
    # flags, such as the interpreter's fp32 dots, still follow the real setting)
    forced = [configs[min(index, len(configs) - 1)] for configs in lists]
    for (tuner, _), cfg in zip(tuners, forced):
        monkeypatch.setattr(tuner, "early_config_prune", lambda c, named, _cfg=cfg, **kw: [_cfg])
        monkeypatch.setattr(tuner, "cache", {})  # what a previous test chose for the same key
    return forced


def _ran(tuners, forced) -> None:
    """Each autotuner launched, with its forced configuration only."""
    for (tuner, _), cfg in zip(tuners, forced):
        assert tuner.cache and set(tuner.cache.values()) == {cfg}, tuner.fn.__name__


def test_n_bucket_is_a_clamped_power_of_two():
    ns = (0, 1, 511, 512, 513, 4096, 5000, 65536, 65537, 10**7)
    assert [_autotune.n_bucket(n) for n in ns] == [512, 512, 512, 512, 1024, 4096, 8192, 65536, 65536, 65536]


def test_autotune_switch(monkeypatch):
    monkeypatch.delenv(_autotune.ENV, raising=False)
    assert _autotune.enabled() is not interpreting()  # never under the interpreter
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    assert _autotune.enabled()
    for off in ("0", "false", "Off", " no "):
        monkeypatch.setenv(_autotune.ENV, off)
        assert not _autotune.enabled(), off
    monkeypatch.setenv(_autotune.ENV, "1")
    assert _autotune.enabled()


def test_lists_put_the_tuned_tile_first_and_untuned_launches_take_it(monkeypatch):
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    first = dict(BM=128, BV=64, BH=64, num_warps=8, num_stages=3)
    assert _autotune.fixed(lp_mod.FWD_CONFIGS, torch.bfloat16, lp_mod.INTERPRETER_TILES) == first
    assert _autotune.fixed(lp_mod.DZ_CONFIGS, torch.float16, lp_mod.INTERPRETER_TILES) == first
    fp32 = dict(BM=128, BV=64, BH=32, num_warps=8, num_stages=2)
    assert _autotune.fixed(lp_mod.FWD_CONFIGS, torch.float32, lp_mod.INTERPRETER_TILES) == fp32
    logits = dict(BM=4, BV=1024, num_warps=8, num_stages=3)
    assert _autotune.fixed(lg_mod.FWD_CONFIGS, torch.bfloat16, lg_mod.INTERPRETER_TILES) == logits
    for _, lists in LINEAR + LOGITS:
        for configs in lists.values():
            assert len(set(configs)) == len(configs) >= 2  # distinct, and something to choose from
    bv = _autotune.largest(lp_mod.FWD_CONFIGS, torch.bfloat16, lp_mod.INTERPRETER_TILES, "BV")
    assert all(bv % c.kwargs["BV"] == 0 for c in lp_mod.FWD_CONFIGS["16-bit"])


@INTERPRETED
def test_the_interpreter_keeps_its_fixed_tiles(gen, monkeypatch):
    monkeypatch.setenv(_autotune.ENV, "1")  # even when asked for

    def refuse(*args, **kwargs):
        raise AssertionError("an autotuner ran under the interpreter")

    for tuner, _ in LINEAR + LOGITS:
        monkeypatch.setattr(tuner, "run", refuse)
    seen = []
    run = lp_mod._linear_fwd_kernel.run
    monkeypatch.setattr(lp_mod._linear_fwd_kernel, "run", lambda *a, **kw: seen.append(kw) or run(*a, **kw))
    hidden, weight, targets = linear_case(gen, 5, 16, 40, torch.float32, "cpu")
    rto_kernels.linear_logprobs(hidden.requires_grad_(), weight, targets).sum().backward()
    rto_kernels.logprobs_from_logits(hidden.detach().requires_grad_(), targets).sum().backward()
    assert {k: seen[0][k] for k in lp_mod.INTERPRETER_TILES} == lp_mod.INTERPRETER_TILES


@INTERPRETED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", range(MOST))
def test_every_linear_config_matches_fp64(gen, monkeypatch, dtype, index):
    forced = _force(monkeypatch, LINEAR, dtype, index)
    monkeypatch.setattr(lp_mod, "DZ_CHUNK_BYTES", 1)  # the backward in chunks of the largest BV: several of them
    hidden, weight, targets = linear_case(gen, 41, 31, 1271, dtype, "cpu")  # odd shapes: partial tiles everywhere
    bias = torch.randn(1271, generator=gen, dtype=torch.float64).to(dtype)
    names = ["grad_hidden", "grad_weight", None, "grad_bias"]

    def op(fn):
        return lambda h, w, t, b, **kw: fn(h, w, t, bias=b, softcap=2.0, **kw)

    ops = (op(rto_kernels.linear_logprobs), op(eager_linear), op(reference.linear_logprobs))
    check_against_truth(*ops, [hidden, weight, targets, bias], gen, LOGPROB_ATOL[dtype], names, temperature=0.8)
    _ran(LINEAR, forced)


@INTERPRETED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", range(MOST))
def test_every_logits_config_matches_fp64(gen, monkeypatch, dtype, index):
    forced = _force(monkeypatch, LOGITS, dtype, index)
    logits = (torch.randn(37, 4100, generator=gen) * 3).to(dtype)  # V past a power of two
    targets = torch.randint(0, 4100, (37,), generator=gen)
    ops = (rto_kernels.logprobs_from_logits, eager_logits, reference.logprobs_from_logits)
    check_against_truth(*ops, [logits, targets], gen, LOGPROB_ATOL[dtype], ["grad_logits", None], temperature=0.7)
    _ran(LOGITS, forced)
