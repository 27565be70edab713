"""Configuration: recipes, overrides, and the errors a user sees for bad keys, types, values and combinations."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing

import pytest
from omegaconf import OmegaConf

import rto_kernels
from rto import config as C
from rto.cli import main
from rto.config import RECIPES, ConfigError, DPOConfig, SFTConfig, describe, load_config, validate

PATHS = ["model.path=m", "data.path=d"]
REQUIRED = {
    "sft": PATHS,
    "rm": PATHS,
    "dpo": PATHS,
    "ppo": ["actor.path=a", "reward=r", "dpo=p", "data.path=d"],
    "eval": ["model=m", "data.path=d"],
    "inspect": ["model=m", "ref=r", "dpo=p", "data.path=d"],
    "pipeline": [],
}
NAN, INF = math.nan, math.inf


@functools.cache
def _defaults(command: str):
    return load_config(command, None, REQUIRED[command])


def defaults(command: str):
    """The command's validated defaults (with its required settings filled in), a fresh copy each call."""
    return copy.deepcopy(_defaults(command))


def sections(cfg, at=""):
    """(dotted prefix, section) for the command and every section inside it: the test's own walk."""
    yield at, cfg
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from sections(value, f"{at}{f.name}.")


def settings(cfg):
    """(dotted key, declared type) of every leaf setting of a command."""
    for at, section in sections(cfg):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if not dataclasses.is_dataclass(getattr(section, f.name)):
                yield at + f.name, hints[f.name]


def refused(command: str, key: str, value, world_size: int = 1) -> str:
    """Set one setting of the command's defaults to `value`; validation must refuse it naming `key`."""
    cfg = defaults(command)
    *path, name = key.split(".")
    holder = cfg
    for part in path:
        holder = getattr(holder, part)
    setattr(holder, name, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    assert key in str(e.value), f"{command} {key}={value!r}: {e.value}"
    return str(e.value)


def test_defaults_recipe_and_overrides_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dpo:\n  beta: 0.3\n  optim: {lr: 1.0e-4}\n")
    cfg = load_config("dpo", str(recipe), PATHS + ["optim.lr=2e-6", "loss=ipo"])
    assert isinstance(cfg, DPOConfig)
    assert cfg.beta == 0.3  # from the recipe
    assert cfg.optim.lr == 2e-6  # the override wins over the recipe
    assert cfg.loss == "ipo"
    assert cfg.optim.betas == [0.9, 0.95]  # untouched default


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_section_of_every_shipped_recipe_validates(name):
    commands = list(OmegaConf.load(RECIPES / f"{name}.yaml"))
    assert commands and set(commands) <= set(C.COMMANDS)
    for command in commands:
        cfg = load_config(command, name, REQUIRED[command])
        assert isinstance(cfg, C.COMMANDS[command])


def test_paper_settings_in_the_llama_recipes():
    cfg = load_config("dpo", "llama3_8b", ["model.path=m"])
    assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.data.max_length, cfg.beta) == (5e-7, 256, 2048, 0.1)
    assert cfg.data.path == "HuggingFaceH4/ultrafeedback_binarized"
    rm = load_config("rm", "llama3_8b", ["model.path=m"])
    assert (rm.optim.lr, rm.train.global_batch_size) == (1e-6, 128)
    rto = load_config("ppo", "llama3_8b_rto", REQUIRED["ppo"])
    r = rto.rewards
    paper = ("rto", 0.05, 0.05, 0.01, 1.0, 0.95, 10.0)
    assert (rto.algo, r.dpo_scale, r.dpo_clip, r.kl_coef, r.gamma, r.lam, r.score_clip) == paper
    sizes = (rto.actor_optim.lr, rto.critic_optim.lr, rto.rollout.prompts_per_step, rto.train.train_batch_size)
    assert sizes == (5e-7, 9e-6, 1024, 128)
    baseline = load_config("ppo", "llama3_8b_ppo", ["actor.path=a", "reward=r", "data.path=d"])
    assert (baseline.algo, baseline.actor_optim.lr) == ("ppo", 8e-7)


# One bad value per section class. A section class missing here fails the walk below: add it with a value
# its own check must refuse. Commands with no settings of their own map to None.
BAD = {
    C.OfflineConfig: None,  # the base of sft, rm and dpo
    C.SFTConfig: None,
    C.RMConfig: None,
    C.DPOConfig: ("beta", 0.0),
    C.PPOConfig: ("algo", "grpo"),
    C.ModelConfig: ("attn_implementation", "flash"),
    C.DataConfig: ("eval_fraction", 1.0),
    C.PromptDataConfig: ("overlong", "cut"),  # ppo, eval and inspect: prompts, no held-out set
    C.OptimConfig: ("betas", [0.9, 1.0]),
    C.TrainConfig: ("micro_batch_size", 0),
    C.ParallelConfig: ("timeout_s", 0.0),
    C.RunConfig: ("keep_last", 0),
    C.RolloutConfig: ("top_p", 0.0),
    C.RewardConfig: ("kl_coef", -5.0),
    C.PPOTrainConfig: ("clip_eps", -0.5),
    C.EvalConfig: ("temperature", NAN),
    C.InspectConfig: ("n", 0),
    C.ToyWorldConfig: ("length", 1),
    C.PipelineConfig: ("online", ["grpo"]),
}


@pytest.mark.parametrize("command", sorted(C.COMMANDS))
def test_every_section_of_every_command_is_checked(command):
    for at, section in sections(defaults(command)):
        assert type(section) in BAD, f"{command}: section {at or '(root)'} ({type(section).__name__}) has no case"
        if BAD[type(section)] is not None:
            name, value = BAD[type(section)]
            refused(command, at + name, value)


def test_every_section_class_is_exported_and_has_a_bad_case():
    # the classes live in the package's modules; `from rto.config import X` must keep reaching each of them
    modules = (C.offline, C.ppo, C.tools)
    classes = {v for m in modules for v in vars(m).values() if isinstance(v, type) and v.__module__ == m.__name__}
    sections = {cls for cls in classes if issubclass(cls, C.Section)}
    assert sections == set(BAD)
    assert all(getattr(C, cls.__name__) is cls and cls.__name__ in C.__all__ for cls in sections)


@pytest.mark.parametrize("command", sorted(C.COMMANDS))
def test_no_setting_accepts_nan_inf_a_negative_count_or_an_empty_name(command):
    checked = 0
    for key, kind in settings(defaults(command)):
        if kind in (float, float | None):
            for value in (NAN, INF, -INF):
                refused(command, key, value)
        elif kind == list[float]:
            refused(command, key, [NAN, 0.9])
        elif kind in (int, int | None):
            refused(command, key, -1)
        elif kind in (str, str | None):
            refused(command, key, "")
        elif kind == list[str]:
            refused(command, key, [""])
        elif kind == dict[str, list[str]]:
            refused(command, key, {"kto": ["beta=1"]})
        else:
            assert kind is bool, f"{key}: a setting of type {kind} needs a case here"
            continue
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    "command,overrides,message",
    [
        ("ppo", ["rewards.kl_coef=-5"], "rewards.kl_coef must be a finite number >= 0, got -5.0"),
        ("ppo", ["rewards.dpo_clip=-0.05"], "rewards.dpo_clip must be a finite number > 0 (or null), got -0.05"),
        ("ppo", ["rewards.dpo_support=1"], "rewards.dpo_support must be a finite number > 0 and < 1 (or null), got 1"),
        ("ppo", ["train.clip_eps=-0.5"], "train.clip_eps must be a finite number > 0, got -0.5"),
        ("ppo", ["train.value_clip=0"], "train.value_clip must be a finite number > 0"),
        ("ppo", ["rewards.score_clip=0"], "rewards.score_clip must be a finite number > 0 (or null)"),
        ("ppo", ["rewards.dpo_scale=-1"], "rewards.dpo_scale must be a finite number >= 0"),
        ("ppo", ["rewards.gamma=1.01"], "rewards.gamma must be a finite number >= 0 and <= 1, got 1.01"),
        ("ppo", ["rewards.lam=nan"], "rewards.lam must be a finite number >= 0 and <= 1, got nan"),
        ("ppo", ["rewards.score_mean=0", "rewards.score_std=0"], "rewards.score_std must be a finite number > 0"),
        ("ppo", ["rollout.temperature=0"], "rollout.temperature must be a finite number > 0, got 0.0"),
        ("ppo", ["rollout.top_p=1.5"], "rollout.top_p must be a finite number > 0 and <= 1"),
        ("ppo", ["rollout.vllm_gpu_memory_utilization=0"], "rollout.vllm_gpu_memory_utilization must be"),
        ("ppo", ["rollout.top_k=-1"], "rollout.top_k must be at least 0, got -1"),
        ("ppo", ["rollout.stop_tokens=['']"], "rollout.stop_tokens must be a list of non-empty strings"),
        ("ppo", ["train.micro_token_budget=0"], "train.micro_token_budget must be at least 1 (or null)"),
        ("ppo", ["train.seed=-1"], "train.seed must be in [0, 2**32), got -1"),
        ("ppo", ["rewards.kl_estimator=k4"], "rewards.kl_estimator must be one of k1, k2, k3, got 'k4'"),
        # the settings the PPO check used to skip
        ("ppo", ["actor.attn_implementation=flash"], "actor.attn_implementation must be one of sdpa, eager"),
        ("ppo", ["actor_optim.betas=[0.9,1.0]"], "actor_optim.betas must be two numbers in [0, 1)"),
        ("ppo", ["critic_optim.warmup_ratio=1"], "critic_optim.warmup_ratio must be a finite number >= 0 and < 1"),
        ("ppo", ["critic_optim.grad_clip=nan"], "critic_optim.grad_clip must be a finite number >= 0, got nan"),
        ("ppo", ["data.max_prompt_length=1024"], "data.max_prompt_length (1024) must be below data.max_length"),
        ("sft", ["data.eval_fraction=-0.1"], "data.eval_fraction must be a finite number >= 0 and < 1"),
        ("ppo", ["data.eval_fraction=0.1"], "Key 'eval_fraction' not in 'PromptDataConfig'"),  # ppo has no eval set
        ("ppo", ["data.subset=''"], "data.subset must be a non-empty string (or null)"),
        ("sft", ["model.revision=''"], "model.revision must be a non-empty string (or null)"),
        ("ppo", ["run.wandb_project=''"], "run.wandb_project must be a non-empty string"),
        ("ppo", ["run.overwrite=true", "run.resume=auto"], "run.overwrite=true starts fresh but run.resume=auto"),
        ("sft", ["optim.grad_clip=nan"], "optim.grad_clip must be a finite number >= 0, got nan"),
        ("sft", ["optim.lr=inf"], "optim.lr must be a finite number > 0, got inf"),
        ("sft", ["optim.lr=1e10"], "optim.lr must be at most 1"),
        ("sft", ["optim.lr=0"], "optim.lr must be a finite number > 0, got 0.0"),
        ("sft", ["optim.eps=0"], "optim.eps must be a finite number > 0"),
        ("sft", ["optim.weight_decay=-0.1"], "optim.weight_decay must be a finite number >= 0"),
        ("sft", ["optim.lr=0.5", "optim.weight_decay=2"], "optim.weight_decay must be below 1 / optim.lr = 2"),
        ("sft", ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be a finite number >= 0 and <= 1"),
        ("sft", ["parallel.timeout_s=-1"], "parallel.timeout_s must be a finite number > 0"),
        ("sft", ["run.name=.."], "run.name must be a folder name inside output_dir"),
        ("sft", ["run.keep_last=0"], "run.keep_last must be at least 1, got 0"),
        ("sft", ["train.eval_every=-1"], "train.eval_every must be at least 0"),
        ("sft", ["data.max_rows=0"], "data.max_rows must be at least 1 (or null)"),
        ("sft", ["data.format=yaml"], "data.format must be one of auto, messages, sharegpt, hh, plain"),
        ("sft", ["data.assistant_turns=first"], "data.assistant_turns must be one of all, last, got 'first'"),
        ("dpo", ["rdpo_alpha=-1"], "rdpo_alpha must be a finite number >= 0"),
        ("dpo", ["beta=nan"], "beta must be a finite number > 0, got nan"),
        ("eval", ["temperature=nan"], "temperature must be a finite number >= 0, got nan"),
        ("eval", ["temperature=-0.1"], "temperature must be a finite number >= 0, got -0.1"),
        ("eval", ["top_p=0"], "top_p must be a finite number > 0 and <= 1"),
        ("eval", ["generator=org/model"], "generator must be a file name (no / or \\, not . or ..)"),
        ("inspect", ["dpo_clip=0"], "dpo_clip must be a finite number > 0 (or null)"),
        ("inspect", ["temperature=inf"], "temperature must be a finite number >= 0, got inf"),
        ("pipeline", ["world.kind=tree"], "world.kind must be one of bag, chain, got 'tree'"),
        ("pipeline", ["world.length=1"], "world.length must be at least 2, got 1"),
        ("pipeline", ["world.hidden=12"], "world.hidden must be a positive multiple of 8"),
        ("pipeline", ["world.n_pairs=9"], "world.n_pairs must be at least 10"),
        ("pipeline", ["eval_temperature=nan"], "eval_temperature must be a finite number >= 0"),
        ("pipeline", ["baselines=[dpo,kto]"], "baselines must be a list of dpo, ipo, rdpo, simpo, tdpo (bad: ['kto'])"),
        ("pipeline", ["loss_overrides={simpo: [beta]}"], "loss_overrides.simpo must be a loss of"),
    ],
)
def test_bad_values_are_refused_by_name(command, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(command, None, REQUIRED[command] + overrides)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "command,overrides",
    [
        ("eval", ["temperature=0", "stop_tokens=['<|eot|>']", "generator=my-model"]),  # greedy
        ("inspect", ["temperature=0"]),
        ("pipeline", ["eval_temperature=0", "world.kind=chain", "world.length=2", "world.bt_beta=0"]),
        ("ppo", ["rewards.dpo_clip=null", "rewards.score_clip=null", "rewards.kl_coef=0", "rewards.gamma=0"]),
        ("ppo", ["rewards.score_mean=-3.5", "rewards.score_std=2", "rollout.top_k=0", "rollout.stop_tokens=[x, y]"]),
        ("ppo", ["data.max_prompt_length=1024", "data.max_length=2048", "run.overwrite=true"]),
        ("sft", ["optim.lr=1.0", "optim.grad_clip=0", "optim.warmup_ratio=0", "data.eval_fraction=0"]),
    ],
)
def test_edge_values_that_mean_something_are_accepted(command, overrides):
    cfg = load_config(command, None, REQUIRED[command] + overrides)
    assert isinstance(cfg, C.COMMANDS[command])


def test_algos_and_kl_estimators_are_the_kernels_names():
    for algo in rto_kernels.SHAPINGS:
        assert load_config("ppo", None, REQUIRED["ppo"] + [f"algo={algo}"]).algo == algo
    for estimator in rto_kernels.KL_ESTIMATORS:
        cfg = load_config("ppo", None, REQUIRED["ppo"] + [f"rewards.kl_estimator={estimator}"])
        assert cfg.rewards.kl_estimator == estimator
    with pytest.raises(ConfigError, match="algo must be one of " + ", ".join(rto_kernels.SHAPINGS)):
        load_config("ppo", None, REQUIRED["ppo"] + ["algo=grpo"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?"),
        (["train.epochs=two"], "could not be converted to Integer (key: train.epochs)"),
        (["loss=kto"], "loss must be one of dpo, ipo, rdpo, simpo, tdpo, got 'kto'"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "must be a multiple of train.micro_batch_size"),
        (["data.max_prompt_length=2000", "data.max_length=1024"], "no room is left for the response"),
        (["data.overlong=cut"], "data.overlong must be one of error, truncate, drop"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
        (["beta"], "overrides must look like key=value"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("dpo", None, PATHS + overrides)
    assert message in str(e.value)


def test_missing_required_and_unknown_recipe():
    with pytest.raises(ConfigError, match="required settings are missing: data.path, model.path"):
        load_config("sft", None, [])
    with pytest.raises(
        ConfigError, match="unknown recipe 'nope': known recipes are llama3_8b, llama3_8b_ppo, llama3_8b_rto, toy"
    ):
        load_config("sft", "nope", PATHS)


def test_batch_sizes_checked_against_the_world_size():
    cfg = load_config("sft", None, PATHS + ["train.global_batch_size=12", "train.micro_batch_size=3"])
    validate(cfg, world_size=1)
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"x ranks \(8\) = 24"):
        validate(cfg, world_size=8)
    sizes = ["rollout.prompts_per_step=12", "train.train_batch_size=12", "train.micro_batch_size=2"]
    ppo = load_config("ppo", None, REQUIRED["ppo"] + sizes)
    validate(ppo, world_size=2)
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step \(12\) must be a multiple of ranks \(8\)"):
        validate(ppo, world_size=8)
    with pytest.raises(ConfigError, match=r"must be a multiple of train.micro_batch_size \(2\) x ranks \(4\)"):
        validate(ppo, world_size=4)


def test_every_setting_is_documented():
    for command, schema in C.COMMANDS.items():
        lines = describe(schema)
        assert all("#" in line and line.split("#", 1)[1].strip() for line in lines), command
    assert "model.path = (required)" in describe(SFTConfig)[0]
    ppo = describe(C.PPOConfig)
    assert "actor_optim.lr = 5e-07  # peak learning rate (at most 1)" in ppo  # the factory's own default
    assert "critic_optim.lr = 9e-06  # peak learning rate (at most 1)" in ppo


def test_cli_prints_config_errors_and_exits_2(capsys):
    assert main(["dpo", "--loss", "ipo", "model.path=m", "data.path=d", "train.epochs=0"]) == 2
    assert "rto dpo: config error: train.epochs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["sft", "--help-config"]) == 0
    assert "optim.lr = 1e-05" in capsys.readouterr().out
