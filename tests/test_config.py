"""Configuration: recipes, overrides, and the errors a user sees for bad keys, types and combinations."""

from __future__ import annotations

import pytest

from rto.cli import main
from rto.config import RECIPES, ConfigError, DPOConfig, SFTConfig, describe, load_config, validate

PATHS = ["model.path=m", "data.path=d"]


def test_defaults_recipe_and_overrides_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dpo:\n  beta: 0.3\n  optim: {lr: 1.0e-4}\n")
    cfg = load_config("dpo", str(recipe), PATHS + ["optim.lr=2e-6", "loss=ipo"])
    assert isinstance(cfg, DPOConfig)
    assert cfg.beta == 0.3  # from the recipe
    assert cfg.optim.lr == 2e-6  # the override wins over the recipe
    assert cfg.loss == "ipo"
    assert cfg.optim.betas == [0.9, 0.95]  # untouched default


REQUIRED = {"ppo": ["actor.path=a", "reward=r", "dpo=p", "data.path=d"]}


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_load(name):
    sections = {"toy": ("sft", "rm", "dpo", "ppo"), "llama3_8b": ("rm", "dpo"), "llama3_8b_rto": ("ppo",),
                "llama3_8b_ppo": ("ppo",)}[name]  # fmt: skip
    for command in sections:
        cfg = load_config(command, name, REQUIRED.get(command, PATHS))
        assert cfg is not None


def test_paper_settings_in_the_llama_recipes():
    cfg = load_config("dpo", "llama3_8b", ["model.path=m"])
    assert (cfg.optim.lr, cfg.train.global_batch_size, cfg.data.max_length, cfg.beta) == (5e-7, 256, 2048, 0.1)
    assert cfg.data.path == "HuggingFaceH4/ultrafeedback_binarized"
    rm = load_config("rm", "llama3_8b", ["model.path=m"])
    assert (rm.optim.lr, rm.train.global_batch_size) == (1e-6, 128)
    rto = load_config("ppo", "llama3_8b_rto", REQUIRED["ppo"])
    r = rto.rewards
    assert (rto.algo, r.dpo_scale, r.dpo_clip, r.kl_coef, r.gamma, r.lam, r.score_clip) == ("rto", 0.05, 0.05, 0.01,
                                                                                           1.0, 0.95, 10.0)  # fmt: skip
    assert (rto.actor_optim.lr, rto.critic_optim.lr, rto.rollout.prompts_per_step, rto.train.train_batch_size) == (
        5e-7, 9e-6, 1024, 128)  # fmt: skip
    baseline = load_config("ppo", "llama3_8b_ppo", ["actor.path=a", "reward=r", "data.path=d"])
    assert (baseline.algo, baseline.actor_optim.lr) == ("ppo", 8e-7)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?"),
        (["train.epochs=two"], "could not be converted to Integer (key: train.epochs)"),
        (["loss=kto"], "loss must be one of dpo, ipo, rdpo, simpo, tdpo; got 'kto'"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "must be a multiple of train.micro_batch_size"),
        (["data.max_prompt_length=2000", "data.max_length=1024"], "no room is left for the response"),
        (["optim.lr=0"], "optim.lr must be > 0"),
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


def test_every_setting_is_documented():
    lines = describe(SFTConfig) + describe(DPOConfig)
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines)
    assert "model.path = (required)" in lines[0]


def test_cli_prints_config_errors_and_exits_2(capsys):
    assert main(["dpo", "--loss", "ipo", "model.path=m", "data.path=d", "train.epochs=0"]) == 2
    assert "rto dpo: config error: train.epochs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["sft", "--help-config"]) == 0
    assert "optim.lr = 1e-05" in capsys.readouterr().out
