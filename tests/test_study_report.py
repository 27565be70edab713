"""The horizon study's report: paired differences, their intervals, and the words the verdict may use."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study_horizon_report import bootstrap_ci, judge, paired, t_ci, verdict  # noqa: E402


def arm(golds: dict[int, float], corr: float | None = None) -> dict:
    return {"seeds": {s: {"final_gold": g, "gold_corr_dpo_term": corr} for s, g in golds.items()}}


def result(L_arms: dict[str, dict], seeds=(0, 1, 2, 3, 4)) -> dict:
    return {
        "eval_seeds": list(seeds),
        "lengths": {L: {"tuned": arms, "recipe": {}} for L, arms in L_arms.items()},
    }


def test_paired_differences_pair_by_seed_and_need_two_seeds():
    p = paired({0: 5.0, 1: 7.0, 2: 9.0, 9: 100.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == [4.0, 5.0, 6.0] and p["mean"] == 5.0
    lo, hi = p["t95"]  # sd 1, n 3: half width 4.303 / sqrt(3)
    assert abs((hi - lo) / 2 - 4.303 / 3**0.5) < 1e-9
    assert paired({0: 1.0}, {0: 2.0}) is None
    b = bootstrap_ci([4.0, 5.0, 6.0])
    assert 4.0 <= b[0] < 5.0 < b[1] <= 6.0


def test_a_difference_is_ahead_only_when_both_intervals_exclude_zero():
    clear = paired({s: 10.0 + s for s in range(5)}, {s: 0.0 for s in range(5)})
    assert judge(clear, 5) == "ahead"
    assert judge(paired({s: 0.0 for s in range(5)}, {s: 10.0 + s for s in range(5)}), 5) == "behind"
    # two seeds: the bootstrap of two values excludes 0, the t interval (12.7 x sd) does not
    two = paired({0: 10.0, 1: 20.0}, {0: 0.0, 1: 0.0})
    assert two["bootstrap95"][0] > 0 and two["t95"][0] < 0
    assert judge(two, 5) == "not distinguishable (preliminary: 2 of 5 seeds)"
    noisy = paired({s: float(v) for s, v in enumerate([5, -4, 6, -3, 1])}, {s: 0.0 for s in range(5)})
    assert judge(noisy, 5) == "not distinguishable"


def test_the_verdict_says_each_comparison_as_measured():
    rto = arm({s: 10.0 + s for s in range(5)}, corr=0.3)
    ppo = arm({s: 0.0 for s in range(5)})
    ddpo = arm({s: 10.0 + s + (1 if s % 2 else -1) for s in range(5)})
    lines = verdict(result({"48": {"ppo": ppo, "rto": rto, "ddpo": ddpo}, "12": {"ppo": ppo, "rto": ppo}}))
    text = "\n".join(lines)
    assert "L = 48, each arm at its best setting: RTO - PPO on final held-out gold +12.00" in text
    assert text.count(": ahead.") == 1  # RTO vs PPO at 48; DDPO is within one of RTO on every seed
    assert "RTO - DDPO (the same DPO information, paid at the last token): " in text
    assert "RTO not distinguishable" in text
    assert f"correlation {statistics.fmean([0.3] * 5):.3f}" in text
    assert "L = 12: +0.00; L = 48: +12.00" in text
    assert t_ci([1.0, 2.0, 3.0])[0] < 2.0
    assert verdict(result({"48": {"ppo": ppo}})) == ["- L = 48: RTO vs PPO not measured yet (needs 2+ paired seeds)."]
