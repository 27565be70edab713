"""The fault probe (benchmarks/fault_probe.py, its cases in benchmarks/fault_cases.py): its judge on made-up
results, and a few of its real cases run through the same machinery as the full probe, each of which must be
handled clearly."""

from __future__ import annotations

from benchmarks.fault_cases import CASES, Case
from benchmarks.fault_env import Env, Run, merge
from benchmarks.fault_probe import build_assets, judge, run_cases, snapshot, untouched

# fast cases (refused before any model trains): a bad value, an unknown setting, a bad data file, a run folder
REPRESENTATIVE = ("lr_inf", "unknown_setting", "invalid_json_line_50", "resume_from_nowhere")
ERROR = "rto sft: config error: optim.lr must be a finite number > 0, got inf (RTO_DEBUG=1 shows the traceback)"


def test_judge_tells_the_four_outcomes_apart():
    case = Case("c", "damage", "sft", names=("optim.lr",))
    log = "2026-12-01 14:00:00,000 rto.data: 64 of 64 rows kept\n"
    assert judge(case, Run(2, log + ERROR + "\n", 1.0), case.names) == ("clear", "")
    traceback = "Traceback (most recent call last):\n  File x\nValueError: bad\n" + ERROR
    assert judge(case, Run(2, traceback, 1.0), case.names)[0] == "unclear"
    assert judge(case, Run(1, ERROR, 1.0), case.names)[0] == "unclear"  # not the refusal's exit code
    assert judge(case, Run(2, ERROR + "\nrto sft: again\n", 1.0), case.names)[0] == "unclear"  # two lines
    assert judge(case, Run(2, ERROR + "\nsome log line after it\n", 1.0), case.names)[0] == "unclear"
    assert judge(case, Run(2, ERROR, 1.0), ("train.max_steps",))[1] == "the error does not name 'train.max_steps'"
    assert judge(case, Run(2, ERROR, 1.0), ("optim.lr", "!model"))[0] == "clear"
    assert judge(case, Run(2, ERROR, 1.0), ("optim.lr", "!finite"))[1] == "misleading: the error says 'finite'"
    assert judge(case, Run(0, log, 1.0), case.names) == ("silent", "exit 0: accepted")
    assert judge(case, Run(None, "", 300.0), case.names)[0] == "unclear"  # hung
    assert judge(case, Run(2, ERROR, 1.0), case.names, damage="changed run.json")[0] == "damage"
    survived = Case("s", "ugly", "sft", expect=0, warns=("skipping checkpoint",))
    assert judge(survived, Run(0, "WARNING skipping checkpoint step_2: truncated\n", 1.0)) == ("clear", "")
    assert judge(survived, Run(0, "done\n", 1.0))[0] == "silent"
    early = Case("e", "own", "sft", names=("row 3",), before_model=True)
    loaded = "Loading weights: 100%\nrto sft: data error: x.jsonl row 3: bad\n"
    assert judge(early, Run(2, loaded, 1.0), early.names) == ("unclear", "refused only after a model loaded")


def test_merge_replaces_removes_and_keeps_malformed_overrides():
    base = ["--recipe=toy", "model.path=a", "optim.lr=1", "run.name=run"]
    merged = merge(base, ["optim.lr=inf", "-run.name", "--recipe=other", "optim.lr"])
    assert merged == ["--recipe=other", "model.path=a", "optim.lr=inf", "optim.lr"]


def test_untouched_finds_what_a_refused_command_changed_or_left(tmp_path):
    env = Env(tmp_path, {})
    env.write("runs/prior/run.json", "{}")
    env.write("runs/prior/checkpoints/step_00000001.tmp/x", "partial")  # an unfinished save: allowed
    before = snapshot(tmp_path)
    assert untouched(env, before) is None
    env.write("runs/prior/checkpoints/step_00000002.tmp/y", "partial")
    assert untouched(env, before) is None
    env.write("runs/run/run.lock", "{}")
    assert untouched(env, before) == "left runs/run/run.lock"
    env.write("runs/prior/run.json", '{"command": "dpo"}')
    assert untouched(env, before) == "changed or removed runs/prior/run.json"


def test_the_case_table_is_well_formed():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 60
    for c in CASES:
        assert c.group in ("damage", "silent", "ugly", "own") and c.command in (
            "sft",
            "rm",
            "dpo",
            "ppo",
            "eval",
            "inspect",
        )
        assert c.names or c.expect == 0, f"{c.name}: a refusal must say what its error names"
        assert c.warns or c.expect != 0, f"{c.name}: a survived fault must say which warning shows it"


def test_representative_cases_are_handled_clearly(tmp_path):
    assets = build_assets(tmp_path / "assets", full=False)
    cases = [c for c in CASES if c.name in REPRESENTATIVE]
    results = run_cases(cases, assets, tmp_path, jobs=2)
    assert sorted(r["name"] for r in results) == sorted(REPRESENTATIVE)
    unclear = [(r["name"], r["outcome"], r["why"], r["tail"][-3:]) for r in results if r["outcome"] != "clear"]
    assert not unclear
    assert all(r["rc"] == 2 and r["error"].startswith("rto ") for r in results)
