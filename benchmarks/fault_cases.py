"""The fault probe's cases (benchmarks/fault_probe.py runs and judges them): `Case`, the table `CASES` and what
only the table needs.

- `TABLE`: one case a line, `name group command setting... => what the error names; ...` (`parse_cases`), its
  settings over a small run's (`fault_env.base_args`; `{case}`, `{runs}` and `{<asset>}` are filled in for the
  case's folder), its names as the judge reads them ("a|b": either, "!a": must not say a).
- `HOOKS`: per case, what differs from a plain refusal: a set-up (the set-ups below: a finished run copied in,
  a lock, a crafted pickle, a damaged model or data file), the exit code and warnings of a fault the run survives,
  an action other than running the command once (`signalled`, `beside`), a check of the folder afterwards (the
  checks below), a timeout or a file-size limit.
- `BEFORE_MODEL`: the cases whose refusal must come before any model loads.

The machinery it uses (`Env`, `Run`, `Process`, `last_line`) is benchmarks/fault_env.py's, as is the probe's.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fault_env import Env, Process, Run, last_line

USER = {"role": "user", "content": "repeat w1 w2"}
REPLY = {"role": "assistant", "content": "w1 w2"}


# ---- how a case runs ----


def run_once(case: Case, env: Env, argv: list[str]) -> Run:
    return Process(argv, env, case.limit_bytes).finish(case.timeout)


def wait_for(proc: Process, ready: Callable[[], bool], timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while proc.proc.poll() is None and time.perf_counter() < deadline:
        if ready():
            return True
        time.sleep(0.05)
    return False


def logged_step(env: Env, name: str = "run") -> Callable[[], bool]:
    file = env.runs / name / "metrics.jsonl"
    return lambda: file.is_file() and '"step"' in file.read_text(errors="replace")


def signalled(signum: int, when: str = "step", times: int = 1, gap: float = 0.3):
    """Send `signum` (`times` times, `gap` s apart) once the run logged a step (when="step") or printed `when`."""

    def action(case: Case, env: Env, argv: list[str]) -> Run:
        proc = Process(argv, env)
        ready = logged_step(env) if when == "step" else lambda: proc.said(when)
        if wait_for(proc, ready, case.timeout):
            for _ in range(times):
                os.kill(proc.proc.pid, signum)
                time.sleep(gap)
        else:
            env.notes["problem"] = f"the run ended or timed out before the signal ({when})"
        return proc.finish(case.timeout)

    return action


def beside(first: list[str]):
    """A first run (`first` settings) goes on while the case's command starts into the same run folder."""

    def action(case: Case, env: Env, argv: list[str]) -> Run:
        a = Process(env.argv(case.command, first), env)
        if not wait_for(a, logged_step(env), case.timeout):
            env.notes["problem"] = "the first run ended before the second could start"
        second = run_once(case, env, argv)
        if a.proc.poll() is not None:
            env.notes["problem"] = "the first run ended while the second ran: the case tested nothing"
        env.notes["first"] = a.finish(case.timeout)
        return second

    return action


# ---- checks of the case folder afterwards (None: fine, else the damage) ----


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if any(k.startswith("train/") for k in r)]


def resumes(total: int):
    """After a signal: a checkpoint is there, run.resume=auto finishes the run, no step is logged twice."""

    def check(env: Env, run: Run, argv: list[str]) -> str | None:
        from rto.checkpoint import latest_checkpoint

        run_dir = env.runs / "run"
        if latest_checkpoint(run_dir) is None:
            return "no checkpoint after the signal"
        again = Process([*argv, "run.resume=auto"], env).finish(600)
        if again.rc != 0:
            return f"run.resume=auto failed (exit {again.rc}): {last_line(again.stderr)}"
        steps = train_steps(run_dir)
        if steps != sorted(set(steps)) or not steps or steps[-1] != total:
            return f"after resume the logged steps are {steps[:3]}...{steps[-3:]}, not 1..{total} once each"
        return None

    return check


def survivor(env: Env, run: Run, argv: list[str]) -> str | None:
    """Two runs into one folder: the first one finished, and the folder holds only its run."""
    first, run_dir = env.notes["first"], env.runs / "run"
    if first.rc != 0:
        return f"the first run failed (exit {first.rc}): {last_line(first.stderr)}"
    if json.loads((run_dir / "run.json").read_text()).get("train.seed") != 0:
        return "run.json records the second run"
    if "0.002" in (run_dir / "config.yaml").read_text():
        return "config.yaml holds the second run's optim.lr"
    steps = train_steps(run_dir)
    if steps != sorted(set(steps)) or (run_dir / "run.lock").exists():
        return "metrics.jsonl mixes runs, or run.lock was left behind"
    return None


def replaced(env: Env, run: Run, argv: list[str]) -> str | None:
    """run.overwrite=true: the old run's checkpoints are gone, the new identity recorded."""
    names = sorted(p.name for p in (env.runs / "prior" / "checkpoints").iterdir())
    seed = json.loads((env.runs / "prior" / "run.json").read_text()).get("train.seed")
    return None if names == ["step_00000002"] and seed == 1 else f"checkpoints {names}, run.json train.seed={seed}"


def finished(env: Env, run: Run, argv: list[str]) -> str | None:
    run_dir = next(p.parent for p in env.runs.rglob("config.yaml"))
    left = (run_dir / "run.lock").exists()
    return "no hf/ export, or run.lock left behind" if left or not (run_dir / "hf").is_dir() else None


def valid_checkpoints(env: Env, run: Run, argv: list[str]) -> str | None:
    """A failed save leaves no checkpoint folder that a resume would pick and fail on (a .tmp is ignored)."""
    from rto.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

    for path in list_checkpoints(env.runs / "run"):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            return f"left a damaged checkpoint that resume would list: {e}"
    return None


def not_executed(env: Env, run: Run, argv: list[str]) -> str | None:
    return "the crafted pickle ran: PWNED exists" if (env.root / "PWNED").exists() else None


def no_poison(env: Env, run: Run, argv: list[str]) -> str | None:
    """Whatever a run exported holds finite weights of a sane size (an absurd lr must not save poison)."""
    from safetensors.torch import load_file

    for file in env.runs.rglob("model.safetensors"):
        worst = max(float(t.float().abs().max()) for t in load_file(file).values())
        if not worst < 1e3:
            return f"{file.relative_to(env.root)} holds weights up to {worst:g}"
    return None


# ---- set-ups ----


class Crafted:
    """A pickle that runs a shell command when loaded: a checkpoint must never be loaded with plain pickle."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def newest(env: Env) -> Path:
    return env.prior() / "checkpoints" / "step_00000002"


def craft_metadata(env: Env) -> None:
    ckpt, data = newest(env), pickle.dumps(Crafted(env.root / "PWNED"))
    (ckpt / ".metadata").write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][".metadata"] = len(data)  # so that the size check passes and the unpickler is reached
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def craft_rng(env: Env) -> None:
    ckpt = newest(env)  # the first checkpoint format: no manifest, the RNG state as a torch.save pickle
    (ckpt / "manifest.json").unlink()
    (ckpt / "rng_rank0.json").unlink()
    (ckpt / "rng_rank0.pt").write_bytes(pickle.dumps(Crafted(env.root / "PWNED")))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_checkpoints(env: Env, *steps: int) -> None:
    run_dir = env.prior()
    for step in steps:
        truncate(run_dir / "checkpoints" / f"step_{step:08d}" / "__0_0.distcp")


def lock_of(env: Env, pid: int) -> None:
    """runs/run/run.lock written as a run of process `pid` on this host writes it (rto/rundir.py)."""
    stat = Path(f"/proc/{pid}/stat")
    start = int(stat.read_text().rsplit(")", 1)[1].split()[19]) if stat.exists() else 1  # when it started
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    holder = {"pid": pid, "host": os.uname().nodename, "boot": boot, "start": start, "since": "earlier"}
    env.write("runs/run/run.lock", json.dumps(holder))


def live_lock(env: Env) -> None:
    proc = subprocess.Popen(["sleep", "900"], start_new_session=True)
    env.cleanups.append(lambda: (proc.kill(), proc.wait()))
    lock_of(env, proc.pid)


def stale_lock(env: Env) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    lock_of(env, proc.pid)  # that process is gone


def read_only(env: Env) -> None:
    env.runs.mkdir()
    if os.geteuid() != 0:
        env.runs.chmod(0o555)
        env.cleanups.append(lambda: env.runs.chmod(0o755))
        return
    subprocess.run(["chattr", "+i", str(env.runs)], check=True)  # root ignores file modes, not the immutable flag
    env.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(env.runs)], check=True))


def model_copy(env: Env, drop: tuple[str, ...] = (), tokenizer: dict | None = None, **files: bytes) -> None:
    """The tiny model copied to `m/`, files dropped, written or truncated (value b""), tokenizer_config edited."""
    folder = env.copy("model", "m")
    for name in drop:
        (folder / name).unlink()
    for name, data in files.items():
        truncate(folder / name) if data == b"" else (folder / name).write_bytes(data)
    if tokenizer is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config = {k: v for k, v in {**config, **tokenizer}.items() if v is not None}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))


# ---- the cases ----


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # damage, silent, ugly (issue 12's lists) or own
    command: str  # sft, rm, dpo, ppo, eval or inspect
    args: tuple[str, ...] = ()  # the case's settings over base_args (Env.fmt fills {case}, {runs}, {<asset>})
    names: tuple[str, ...] = ()  # what the error line must name ("a|b": either; "!a": must not say a)
    setup: Callable[[Env], object] | None = None
    expect: int = 2  # the exit code: 2 refused, 0 survived (then `warns` must appear), 128 + signum
    warns: tuple[str, ...] = ()
    check: Callable[[Env, Run, list[str]], str | None] | None = None  # the folder afterwards: None or the damage
    action: Callable[[Case, Env, list[str]], Run] = run_once
    before_model: bool = False  # a refusal that must come before any model loads
    unchanged: bool = True  # a refusal leaves the folder as it was (off where another run writes to it meanwhile)
    timeout: float = 300
    limit_bytes: int | None = None  # RLIMIT_FSIZE: a full disk


def parse_cases(table: str, hooks: dict[str, dict], before_model: set[str]) -> list[Case]:
    """One case per line of `table`: `name group command setting... => what the error names; ...`, with the
    set-up, checks and expectations of `hooks[name]`."""
    cases = []
    for line in table.strip().splitlines():
        spec, _, names = line.partition("=>")
        name, group, command, *args = spec.split()
        named = tuple(n.strip() for n in names.split(";") if n.strip())
        hook = {"before_model": name in before_model, **hooks.get(name, {})}
        cases.append(Case(name, group, command, tuple(args), named, **hook))
    unknown = (set(hooks) | before_model) - {c.name for c in cases}
    if unknown:
        raise ValueError(f"hooks for no case: {sorted(unknown)}")
    return cases


def prior(env: Env) -> Path:
    return env.prior()


def prior_ppo(env: Env) -> Path:
    return env.prior("prior_ppo")


# the settings of two cases written as one token each
NEWEST = "run.resume={runs}/prior/checkpoints/step_00000002"
ROLE = {"messages": [USER, {"role": "narrator", "content": "w1"}, REPLY]}
SAME = {"prompt": USER["content"], "chosen": [USER, REPLY], "rejected": [USER, REPLY]}
NON_UTF8 = b'{"messages": [{"role": "user", "content": "repeat w1 \xff"}, {"role": "assistant", "content": "w1"}]}'
EMPTY_REPLY = {"messages": [USER, {"role": "assistant", "content": ""}]}
FIRST_RUN = ["train.max_steps=150", "train.save_every=1", "train.log_every=1"]

TABLE = """
fresh_run_into_used_folder       damage sft  run.name=prior optim.lr=0.002 => run.resume=auto; run.overwrite
fresh_run_into_used_ppo_folder   damage ppo  run.name=prior => run.resume=auto; run.overwrite
two_runs_at_once                 damage sft  train.seed=1 optim.lr=0.002 => in use; run.lock
lock_of_a_live_process           damage sft  => in use; run.lock
stale_lock_of_a_dead_process     damage sft
lr_inf                           damage sft  optim.lr=inf => optim.lr
lr_1e10                          damage sft  optim.lr=1e10 => optim.lr
actor_lr_inf                     damage ppo  actor_optim.lr=inf => actor_optim.lr
critic_lr_1e10                   damage ppo  critic_optim.lr=1e10 => critic_optim.lr
weight_decay_1e6                 damage sft  optim.lr=1e-3 optim.weight_decay=1e6 => optim.weight_decay
resume_rto_as_ppo                damage ppo  run.name=prior run.resume=auto algo=ppo => algo
resume_rto_as_reinforce          damage ppo  run.name=prior run.resume=auto estimator=reinforce++ => estimator
dpo_resumes_an_sft_checkpoint    damage dpo  {newest} => command
resume_on_other_data             damage sft  run.name=prior run.resume=auto data.path={case}/copy.jsonl => data.path
resume_other_model               damage sft  run.name=prior run.resume=auto model.path={dpo} => model.path
resume_other_batch               damage sft  run.name=prior run.resume=auto train.global_batch_size=8 => batch_size
overwrite_starts_over            damage sft  run.name=prior run.overwrite=true train.seed=1
overwrite_with_resume            damage sft  run.overwrite=true run.resume=auto => run.overwrite
resume_a_run_without_checkpoints damage sft  run.name=prior run.resume=auto => run.overwrite
resume_from_nowhere              damage sft  run.resume={case}/nowhere => run.resume
resume_with_corrupt_run_json     damage sft  run.name=prior run.resume=auto => run.json
kl_coef_negative                 silent ppo  rewards.kl_coef=-5 => rewards.kl_coef
dpo_clip_negative                silent ppo  rewards.dpo_clip=-0.05 => rewards.dpo_clip
clip_eps_negative                silent ppo  train.clip_eps=-0.5 => train.clip_eps
grad_clip_nan                    silent sft  optim.grad_clip=nan => optim.grad_clip
eval_temperature_nan             silent eval temperature=nan => temperature
unknown_chat_role                silent sft  data.path={case}/roles.jsonl => row 3; narrator
chosen_equals_rejected           silent dpo  data.path={case}/same.jsonl => row 5; chosen
chosen_equals_rejected_skipped   silent dpo  data.path={case}/same.jsonl data.bad_rows=skip
gamma_above_1                    silent ppo  rewards.gamma=1.5 => rewards.gamma
lam_negative                     silent ppo  rewards.lam=-0.1 => rewards.lam
value_clip_zero                  silent ppo  train.value_clip=0 => train.value_clip
rollout_temperature_zero         silent ppo  rollout.temperature=0 => rollout.temperature
rollout_top_p_zero               silent ppo  rollout.top_p=0 => rollout.top_p
score_clip_zero                  silent ppo  rewards.score_clip=0 => rewards.score_clip
dpo_scale_nan                    silent ppo  rewards.dpo_scale=nan => rewards.dpo_scale
entropy_coef_negative            silent ppo  train.entropy_coef=-1 => train.entropy_coef
score_mean_without_std           silent ppo  rewards.score_mean=0 => rewards.score_std
samples_per_prompt_zero          silent ppo  rollout.samples_per_prompt=0 => rollout.samples_per_prompt
warmup_ratio_above_1             silent sft  optim.warmup_ratio=1.5 => optim.warmup_ratio
beta2_of_1                       silent sft  optim.betas=[0.9,1.0] => optim.betas
adam_eps_zero                    silent sft  optim.eps=0 => optim.eps
min_lr_ratio_2                   silent rm   optim.min_lr_ratio=2 => optim.min_lr_ratio
eval_fraction_1                  silent sft  data.eval_fraction=1 => data.eval_fraction
seed_negative                    silent sft  train.seed=-1 => train.seed
dpo_beta_negative                silent dpo  beta=-0.1 => beta
tdpo_chunk_zero                  silent dpo  loss=tdpo tdpo_chunk=0 => tdpo_chunk
timeout_zero                     silent sft  parallel.timeout_s=0 => parallel.timeout_s
keep_last_zero                   silent sft  run.keep_last=0 => run.keep_last
max_rows_zero                    silent sft  data.max_rows=0 => data.max_rows
max_nonfinite_zero               silent rm   train.max_nonfinite=0 => train.max_nonfinite
eval_top_p_2                     silent eval top_p=2 => top_p
eval_temperature_negative        silent eval temperature=-1 => temperature
eval_max_new_tokens_zero         silent eval max_new_tokens=0 => max_new_tokens
inspect_dpo_clip_negative        silent inspect dpo_clip=-1 => dpo_clip
inspect_n_zero                   silent inspect n=0 => n must|n=
inspect_temperature_nan          silent inspect temperature=nan => temperature
empty_data_file                  ugly sft  data.path={case}/empty.jsonl => {case}/empty.jsonl
invalid_json_line_50             ugly sft  data.path={case}/bad.jsonl => bad.jsonl; line 50
non_utf8_line_7                  ugly sft  data.path={case}/bytes.jsonl => bytes.jsonl; line 7; UTF-8
non_utf8_skipped                 ugly sft  data.path={case}/bytes.jsonl data.bad_rows=skip
one_row_dataset                  ugly sft  data.path={case}/one.jsonl => train.global_batch_size
model_path_is_a_file             ugly sft  model.path={sft} => model.path; is a file
model_path_empty_folder          ugly sft  model.path={case}/m => model.path; {case}/m; config.json
model_path_run_folder            ugly sft  model.path={runs}/prior => model.path; hf
truncated_safetensors            ugly sft  model.path={case}/m => model.safetensors
fewer_embedding_rows_than_tokens ugly sft  model.path={small_vocab} => model.path
read_only_output_dir             ugly sft  => {runs}
disk_full                        ugly sft  => step_0000000
corrupt_newest_checkpoint        ugly sft  run.name=prior run.resume=auto train.max_steps=3
all_checkpoints_corrupt          ugly sft  run.name=prior run.resume=auto => run.resume=auto; run.overwrite
sigterm_in_training              ugly sft  train.max_steps=100 train.log_every=1 => SIGTERM; run.resume=auto
sigint_in_ppo                    ugly ppo  train.steps=30 train.log_every=1 => SIGINT; run.resume=auto
sigint_while_loading             ugly sft  => interrupted
sigterm_twice                    ugly sft  train.max_steps=100 train.log_every=1 => SIGTERM
missing_data_file                own sft  data.path={case}/nope.jsonl => data.path
data_file_csv                    own sft  data.path={case}/d.csv => data.path; d.csv
data_empty_folder                own sft  data.path={case}/d => data.path; !model
split_of_one_file                own sft  data.split=test => data.split
no_messages_column               own sft  data.path={case}/c.jsonl => messages
messages_not_a_list              own sft  data.path={case}/t.jsonl => row 2; messages
starts_with_assistant            own sft  data.path={case}/a.jsonl => row 4
empty_reply                      own sft  data.path={case}/r.jsonl => row 5
json_array_line                  own sft  data.path={case}/j.jsonl => line 9
blank_data_file                  own sft  data.path={case}/w.jsonl => w.jsonl
overlong_prompt                  own sft  data.max_prompt_length=3 => row 0; data.max_prompt_length
prompt_is_only_a_reply           own ppo  data.path={case}/p.jsonl => row 0
rm_on_sft_data                   own rm   data.path={sft} => chosen
eval_data_without_prompts        own eval data.path={case}/x.jsonl => prompt
unknown_recipe                   own sft  --recipe=nosuch => nosuch
recipe_file_missing              own sft  --recipe={case}/r.yaml => {case}/r.yaml
recipe_without_section           own dpo  --recipe={case}/r.yaml => dpo
recipe_invalid_yaml              own sft  --recipe={case}/r.yaml => r.yaml
unknown_setting                  own sft  optim.lrr=1 => optim.lrr
wrong_type                       own sft  train.epochs=two => train.epochs
override_without_equals          own sft  optim.lr => optim.lr
required_setting_missing         own sft  -model.path => model.path
hub_model_offline                own sft  model.path=nosuch-org/nosuch-model => nosuch-org/nosuch-model
hub_data_offline                 own sft  data.path=nosuch-org/nosuch-data => nosuch-org/nosuch-data
hub_tokenizer_offline            own sft  model.tokenizer=nosuch-org/tok => model.tokenizer
unknown_dpo_loss                 own dpo  loss=foo => loss
unknown_dpo_loss_flag            own dpo  --loss=foo => --loss
batch_not_a_multiple             own sft  train.global_batch_size=12 => train.global_batch_size
prompt_length_not_below_max      own sft  data.max_prompt_length=64 => data.max_prompt_length
rto_without_dpo_model            own ppo  -dpo => dpo
rollout_not_a_multiple           own ppo  rollout.prompts_per_step=12 => train.train_batch_size
compile_without_static_cache     own ppo  rollout.compile_decode=true => rollout.kv_cache
vllm_engine_on_cpu               own ppo  rollout.engine=vllm => rollout.engine|vllm
dtype_float16                    own sft  model.dtype=float16 => model.dtype
output_dir_is_a_file             own sft  run.output_dir={sft} => {sft}
crafted_pickle_metadata          own sft  run.name=prior {newest} => .metadata; refusing
crafted_pickle_rng_state         own sft  run.name=prior {newest} => rng_rank0.pt; refusing; !file an issue
crafted_pickle_newest_auto       own sft  run.name=prior run.resume=auto train.max_steps=3
checkpoint_without_manifest      own sft  run.name=prior {newest} => manifest.json
reward_other_tokenizer           own ppo  reward={other_rm} => reward
dpo_model_other_tokenizer        own ppo  dpo={other_lm} => dpo
critic_other_tokenizer           own ppo  critic={other_rm} => critic
ppo_ref_other_tokenizer          own ppo  ref={other_lm} => ref
dpo_ref_other_tokenizer          own dpo  ref={other_lm} => ref
eval_reference_other_tokenizer   own eval reference={other_lm} => reference
eval_reward_other_tokenizer      own eval reward={other_rm} => reward
inspect_dpo_other_tokenizer      own inspect dpo={other_lm} => dpo
reward_with_two_labels           own ppo  reward={two_labels} => reward
reward_is_a_causal_lm            own ppo  reward={model} => reward; is not a reward model
eval_reward_is_a_causal_lm       own eval reward={model} => reward; is not a reward model
packing_family_that_cannot       own sft  model.path={opt} data.packing=true => data.packing
no_chat_template                 own sft  model.path={case}/m => model.chat_template
no_pad_token                     own sft  model.path={case}/m => model.pad_token
pad_token_not_in_vocab           own sft  model.path={case}/m model.pad_token=<nope> => model.pad_token
corrupt_model_config             own sft  model.path={case}/m => config.json
no_weights_file                  own sft  model.path={case}/m => model.path|{case}/m
eval_gold_on_other_prompts       own eval gold=true => gold
eval_generator_with_slash        own eval generator=a/b => generator
eval_model_missing               own eval model={case}/nope => model
inspect_ref_missing              own inspect ref={case}/nope => ref
critic_is_a_file                 own ppo  critic={sft} => critic
""".replace("{newest}", NEWEST)

NO_PAD = {"pad_token": None}
HOOKS: dict[str, dict] = {
    "fresh_run_into_used_folder": dict(setup=prior),
    "fresh_run_into_used_ppo_folder": dict(setup=prior_ppo),
    "two_runs_at_once": dict(action=beside(FIRST_RUN), check=survivor, unchanged=False, timeout=500),
    "lock_of_a_live_process": dict(setup=live_lock),
    "stale_lock_of_a_dead_process": dict(setup=stale_lock, expect=0, warns=("stale lock",), check=finished),
    "lr_inf": dict(check=no_poison),
    "lr_1e10": dict(check=no_poison),
    "actor_lr_inf": dict(check=no_poison),
    "critic_lr_1e10": dict(check=no_poison),
    "resume_rto_as_ppo": dict(setup=prior_ppo),
    "resume_rto_as_reinforce": dict(setup=prior_ppo),
    "dpo_resumes_an_sft_checkpoint": dict(setup=prior),
    "resume_on_other_data": dict(setup=lambda e: (e.prior(), e.copy("sft", "copy.jsonl"))),
    "resume_other_model": dict(setup=prior),
    "resume_other_batch": dict(setup=prior),
    "overwrite_starts_over": dict(setup=prior, expect=0, warns=("run.overwrite=true: deleted",), check=replaced),
    "resume_a_run_without_checkpoints": dict(setup=lambda e: shutil.rmtree(e.prior() / "checkpoints")),
    "resume_with_corrupt_run_json": dict(setup=lambda e: (e.prior() / "run.json").write_text("{oops")),
    "unknown_chat_role": dict(setup=lambda e: e.lines("sft", "roles.jsonl", {4: ROLE})),
    "chosen_equals_rejected": dict(setup=lambda e: e.lines("pairs", "same.jsonl", {6: SAME})),
    "chosen_equals_rejected_skipped": dict(
        setup=lambda e: e.lines("pairs", "same.jsonl", {6: SAME, 9: SAME}), expect=0, warns=("skipped",)
    ),
    "empty_data_file": dict(setup=lambda e: e.write("empty.jsonl", b"")),
    "invalid_json_line_50": dict(setup=lambda e: e.lines("sft", "bad.jsonl", {50: b'{"messages": [oops'})),
    "non_utf8_line_7": dict(setup=lambda e: e.lines("sft", "bytes.jsonl", {7: NON_UTF8})),
    "non_utf8_skipped": dict(setup=lambda e: e.lines("sft", "bytes.jsonl", {7: NON_UTF8}), expect=0, warns=("line 7",)),
    "one_row_dataset": dict(setup=lambda e: e.write("one.jsonl", e.assets["sft"].read_text().splitlines()[0])),
    "model_path_empty_folder": dict(setup=lambda e: (e.root / "m").mkdir()),
    "model_path_run_folder": dict(setup=prior),
    "truncated_safetensors": dict(setup=lambda e: model_copy(e, **{"model.safetensors": b""})),
    "read_only_output_dir": dict(setup=read_only),
    "disk_full": dict(limit_bytes=300_000, check=valid_checkpoints),
    "corrupt_newest_checkpoint": dict(
        setup=lambda e: corrupt_checkpoints(e, 2), expect=0, warns=("skipping checkpoint", "step_00000002")
    ),
    "all_checkpoints_corrupt": dict(setup=lambda e: corrupt_checkpoints(e, 1, 2)),
    "sigterm_in_training": dict(expect=143, action=signalled(signal.SIGTERM), check=resumes(100)),
    "sigint_in_ppo": dict(expect=130, action=signalled(signal.SIGINT), check=resumes(30), timeout=400),
    "sigint_while_loading": dict(expect=130, action=signalled(signal.SIGINT, when="rows kept")),
    "sigterm_twice": dict(expect=143, action=signalled(signal.SIGTERM, times=2, gap=0.02)),
    "data_file_csv": dict(setup=lambda e: e.write("d.csv", "a,b\n1,2\n")),
    "data_empty_folder": dict(setup=lambda e: (e.root / "d").mkdir()),
    "no_messages_column": dict(setup=lambda e: e.rows("c.jsonl", [{"conversation": [USER, REPLY]}] * 40)),
    "messages_not_a_list": dict(setup=lambda e: e.lines("sft", "t.jsonl", {3: {"messages": 5}})),
    "starts_with_assistant": dict(setup=lambda e: e.lines("sft", "a.jsonl", {5: {"messages": [REPLY, USER, REPLY]}})),
    "empty_reply": dict(setup=lambda e: e.lines("sft", "r.jsonl", {6: EMPTY_REPLY})),
    "json_array_line": dict(setup=lambda e: e.lines("sft", "j.jsonl", {9: b"[1, 2]"})),
    "blank_data_file": dict(setup=lambda e: e.write("w.jsonl", "\n  \n\n")),
    "prompt_is_only_a_reply": dict(setup=lambda e: e.rows("p.jsonl", [{"messages": [REPLY]}] * 40)),
    "eval_data_without_prompts": dict(setup=lambda e: e.rows("x.jsonl", [{"text": "hello"}] * 8)),
    "recipe_without_section": dict(setup=lambda e: e.write("r.yaml", "sft:\n  optim: {lr: 1.0e-3}\n")),
    "recipe_invalid_yaml": dict(setup=lambda e: e.write("r.yaml", "sft: [unclosed\n")),
    "crafted_pickle_metadata": dict(setup=craft_metadata, check=not_executed),
    "crafted_pickle_rng_state": dict(setup=craft_rng, check=not_executed),
    "crafted_pickle_newest_auto": dict(
        setup=craft_metadata, check=not_executed, expect=0, warns=("skipping checkpoint", "refusing")
    ),
    "checkpoint_without_manifest": dict(setup=lambda e: (newest(e) / "manifest.json").unlink()),
    "no_chat_template": dict(setup=lambda e: model_copy(e, drop=("chat_template.jinja",))),
    "no_pad_token": dict(setup=lambda e: model_copy(e, tokenizer=NO_PAD)),
    "pad_token_not_in_vocab": dict(setup=lambda e: model_copy(e, tokenizer=NO_PAD)),
    "corrupt_model_config": dict(setup=lambda e: model_copy(e, **{"config.json": b"{oops"})),
    "no_weights_file": dict(setup=lambda e: model_copy(e, drop=("model.safetensors",))),
}
# data checks come before any model loads
BEFORE_MODEL = set(
    """unknown_chat_role chosen_equals_rejected empty_data_file invalid_json_line_50 non_utf8_line_7 one_row_dataset
    missing_data_file data_file_csv data_empty_folder split_of_one_file no_messages_column messages_not_a_list
    starts_with_assistant empty_reply json_array_line blank_data_file overlong_prompt prompt_is_only_a_reply
    rm_on_sft_data eval_data_without_prompts""".split()
)
CASES = parse_cases(TABLE, HOOKS, BEFORE_MODEL)
