"""Settings of issue #13: model.revision / model.trust_remote_code reaching every from_pretrained, data.subset
reaching datasets.load_dataset, PPO's prompts section without eval_*, and wandb's project/entity/group and its
missing-install message."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import datasets
import pytest
import transformers

from rto.cli import main as cli
from rto.config import ConfigError, DataConfig, ModelConfig, PromptDataConfig, load_config, to_yaml
from rto.data import DataError, load_data_rows, load_rows
from rto.metrics import MetricLogger, run_logger
from rto.models import check_same_tokenizer, load_causal_lm, load_scalar_model, load_tokenizer
from tests.assets import make_rl_assets, write_jsonl

WANDB_MISSING = "run.wandb=true but wandb is not installed (pip install wandb)"
PPO = ["actor.path=a", "reward=r", "dpo=p", "data.path=d"]
LOADERS = {
    "tokenizer": transformers.AutoTokenizer,
    "config": transformers.AutoConfig,
    "causal": transformers.AutoModelForCausalLM,
    "seq": transformers.AutoModelForSequenceClassification,
    "token": transformers.AutoModelForTokenClassification,
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return make_rl_assets(tmp_path_factory.mktemp("tiny"), n_prompts=4)


@pytest.fixture(scope="module")
def tiny(assets) -> Path:
    return assets["model"]


@pytest.fixture
def hub(monkeypatch, assets):
    """Every transformers from_pretrained the project's own code calls (not transformers' calls inside them),
    recorded as (loader, path, keywords); a path that looks like a hub id ("org/...") reads a tiny local model
    instead (nothing is downloaded): "org/scorer" the tiny reward model, any other the tiny causal LM."""
    calls = []

    def local(path: str) -> str:
        if not path.startswith("org/"):
            return path
        return str(assets["reward"] if path == "org/scorer" else assets["model"])

    for name, cls in LOADERS.items():

        def fake(path, *args, _name=name, _orig=cls.from_pretrained, **kw):
            if sys._getframe(1).f_globals["__name__"].startswith("rto."):
                calls.append((_name, str(path), {k: kw.get(k, "absent") for k in ("revision", "trust_remote_code")}))
            return _orig(local(str(path)), *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    return calls


# ---- model.revision, model.trust_remote_code ----


def test_model_settings_default_to_no_remote_code_and_the_default_branch(hub, tiny):
    cfg = ModelConfig(path=str(tiny))
    assert (cfg.revision, cfg.trust_remote_code) == (None, False)
    assert load_config("sft", None, ["model.path=m", "data.path=d"]).model.trust_remote_code is False
    assert load_config("ppo", None, PPO).actor.trust_remote_code is False
    load_tokenizer(cfg)
    load_causal_lm(str(tiny), cfg)
    load_scalar_model(str(tiny), cfg)
    assert {c[0] for c in hub} == {"tokenizer", "causal", "config", "seq"}  # the tiny LM gets a new seq head
    assert all(kw == {"revision": None, "trust_remote_code": False} for _, _, kw in hub), hub


def test_revision_and_trust_remote_code_reach_every_load_of_the_model(hub):
    cfg = ModelConfig(path="org/policy", revision="v1.0", trust_remote_code=True)
    load_tokenizer(cfg)
    load_causal_lm("org/policy", cfg, "actor.path")
    load_scalar_model("org/policy", cfg, "reward")
    pinned = {"revision": "v1.0", "trust_remote_code": True}
    assert [(n, p) for n, p, _ in hub] == [(n, "org/policy") for n in ("tokenizer", "causal", "config", "seq")]
    assert all(kw == pinned for _, _, kw in hub), hub


def test_other_models_get_trust_remote_code_but_not_the_revision(hub, tiny):
    """PPO loads ref, dpo, reward and critic under the actor's settings: remote code for all, the revision only
    for the actor's own path (a ref left to default is that path); a separate tokenizer takes its default too."""
    cfg = ModelConfig(path="org/policy", revision="abc123", trust_remote_code=True)
    load_causal_lm("org/dpo", cfg, "dpo")
    load_scalar_model("org/rm", cfg, "reward")
    load_causal_lm("org/policy", cfg, "actor.path")  # the reference when ref is unset
    load_tokenizer(ModelConfig(path="org/policy", tokenizer="org/tok", revision="abc123", trust_remote_code=True))
    actor_tok = load_tokenizer(ModelConfig(path=str(tiny)))
    check_same_tokenizer(actor_tok, "org/rm", "reward", cfg=cfg)
    seen = {(n, p): kw for n, p, kw in hub}
    other = {"revision": None, "trust_remote_code": True}
    assert seen[("causal", "org/dpo")] == seen[("seq", "org/rm")] == seen[("config", "org/rm")] == other
    assert seen[("tokenizer", "org/tok")] == other
    assert seen[("causal", "org/policy")] == {"revision": "abc123", "trust_remote_code": True}
    assert [kw for n, p, kw in hub if (n, p) == ("tokenizer", "org/rm")] == [other]  # check_same_tokenizer


def test_a_revision_with_a_local_folder_is_refused(hub, tiny):
    cfg = ModelConfig(path=str(tiny), revision="main")
    with pytest.raises(ConfigError, match=r"actor.path: .* is a local folder, but actor.revision='main'"):
        load_causal_lm(str(tiny), cfg, "actor.path")
    with pytest.raises(ConfigError, match="is a local folder"):
        load_tokenizer(cfg)
    assert hub == []  # refused before anything loads


@pytest.fixture
def generation_configs(monkeypatch) -> list:
    """The project's GenerationConfig.from_pretrained calls recorded as (path, revision) (not transformers' own,
    inside a model load), answering an empty config (no stop ids)."""
    seen = []

    def fake(path, *args, **kw):
        if sys._getframe(1).f_globals["__name__"].startswith("rto."):
            seen.append((str(path), kw.get("revision")))
        return transformers.GenerationConfig()

    monkeypatch.setattr(transformers.GenerationConfig, "from_pretrained", fake)
    return seen


def loads_by_path(hub) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for _, path, kw in hub:
        out.setdefault(path, []).append(kw)
    return out


PINNED, OTHER = {"revision": "v1.0", "trust_remote_code": True}, {"revision": None, "trust_remote_code": True}


def test_eval_loads_its_model_at_the_revision_and_every_model_with_remote_code(
    hub, generation_configs, assets, tmp_path
):
    from rto.evaluate import evaluate

    args = ["model=org/policy", "revision=v1.0", "trust_remote_code=true", "reference=org/ref", "reward=org/scorer"]
    args += [f"data.path={assets['prompts']}", "max_new_tokens=4", f"output_dir={tmp_path}"]
    result = evaluate(load_config("eval", None, args))
    assert result["n"] == 4 and "rm_score" in result and "ref_rm_score" in result
    loads = loads_by_path(hub)
    assert set(loads) == {"org/policy", "org/ref", "org/scorer"}
    assert {n for n, p, _ in hub if p == "org/policy"} == {"tokenizer", "causal"}
    assert all(kw == PINNED for kw in loads["org/policy"]), loads["org/policy"]
    assert all(kw == OTHER for kw in loads["org/ref"] + loads["org/scorer"]), loads
    assert ("org/policy", "v1.0") in generation_configs and ("org/ref", None) in generation_configs


def test_inspect_loads_its_model_at_the_revision(hub, generation_configs, assets, tmp_path):
    from rto.inspection import inspect_tokens

    args = ["model=org/policy", "revision=v1.0", "trust_remote_code=true", "ref=org/ref", "dpo=org/dpo"]
    args += [f"data.path={assets['prompts']}", "n=2", "max_new_tokens=4", f"output_dir={tmp_path}"]
    inspect_tokens(load_config("inspect", None, args))
    loads = loads_by_path(hub)
    assert set(loads) == {"org/policy", "org/ref", "org/dpo"}
    assert all(kw == PINNED for kw in loads["org/policy"]), loads["org/policy"]
    assert all(kw == OTHER for kw in loads["org/ref"] + loads["org/dpo"]), loads
    assert generation_configs == [("org/policy", "v1.0")]


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_eval_and_inspect_refuse_a_revision_with_a_local_folder(command, hub, assets, tmp_path):
    from rto.evaluate import evaluate
    from rto.inspection import inspect_tokens

    others = ["reference=org/ref"] if command == "eval" else ["ref=org/ref", "dpo=org/dpo"]
    args = [f"model={assets['model']}", "revision=v1.0", *others, f"data.path={assets['prompts']}"]
    run = evaluate if command == "eval" else inspect_tokens
    with pytest.raises(ConfigError, match=r"^model: .* is a local folder, but revision='v1.0' names a branch"):
        run(load_config(command, None, [*args, f"output_dir={tmp_path}"]))
    assert hub == []  # refused before anything loads


def test_model_settings_are_listed_for_every_model_section(capsys):
    assert cli(["ppo", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "actor.revision = None" in out and "actor.trust_remote_code = False" in out
    assert cli(["sft", "--help-config"]) == 0
    assert "model.trust_remote_code = False" in capsys.readouterr().out


# ---- data.subset ----


def test_subset_picks_a_config_of_a_folder_with_two(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "two"
    folder.mkdir()
    write_jsonl(folder / "easy.jsonl", [{"prompt": "a1"}, {"prompt": "a2"}])
    write_jsonl(folder / "hard.jsonl", [{"prompt": "b1"}])
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}.jsonl\n" for c in ("easy", "hard")
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    assert load_rows(str(folder), "train", subset="hard")["prompt"] == ["b1"]
    rows = load_data_rows(DataConfig(path=str(folder), subset="easy"))
    assert rows["prompt"] == ["a1", "a2"]
    with pytest.raises(DataError, match=r"has several configs; its configs: easy, hard \(set data.subset\)"):
        load_rows(str(folder), "train")
    with pytest.raises(DataError, match="has no config 'medium'; its configs: easy, hard"):
        load_rows(str(folder), "train", subset="medium")


def test_subset_reaches_load_dataset_as_name_for_a_hub_id(monkeypatch):
    calls = []

    def fake(path, *args, **kw):
        calls.append((path, kw))
        return datasets.Dataset.from_list([{"prompt": "hi"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    load_data_rows(PromptDataConfig(path="org/prompts", split="test_gen", subset="default"))
    load_rows("org/prompts", "train")
    assert calls == [
        ("org/prompts", {"name": "default", "split": "test_gen"}),
        ("org/prompts", {"name": None, "split": "train"}),
    ]


def test_subset_is_refused_for_a_single_file_or_a_saved_dataset(tmp_path):
    one = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ConfigError, match=r"^data.subset='default': data.path .*p.jsonl is one file, so it has no"):
        load_data_rows(DataConfig(path=str(one), subset="default"))
    datasets.Dataset.from_list([{"prompt": "hi"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match="is a saved dataset"):
        load_rows(str(tmp_path / "saved"), "train", subset="x")
    assert len(load_rows(str(tmp_path / "saved"), "train")) == 1


# ---- the prompts section of ppo, eval and inspect ----


@pytest.mark.parametrize("command", ["ppo", "eval", "inspect"])
def test_prompt_commands_have_no_eval_settings(command, capsys):
    assert cli([command, "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "eval_path" not in out and "eval_split" not in out and "eval_fraction" not in out
    assert "data.subset = None" in out
    required = {"ppo": PPO, "eval": ["model=m", "data.path=d"], "inspect": ["model=m", "ref=r", "dpo=p", "data.path=d"]}
    for setting in ("data.eval_fraction=0.1", "data.eval_split=test", "data.eval_path=x"):
        with pytest.raises(ConfigError, match=f"Key '{setting[5:].split('=')[0]}' not in 'PromptDataConfig'"):
            load_config(command, None, required[command] + [setting])


def test_offline_commands_keep_their_held_out_set(capsys):
    for command in ("sft", "rm", "dpo"):
        cfg = load_config(command, None, ["model.path=m", "data.path=d", "data.eval_fraction=0.1", "data.subset=s"])
        assert isinstance(cfg.data, DataConfig) and cfg.data.eval_fraction == 0.1 and cfg.data.subset == "s"
    assert cli(["rm", "--help-config"]) == 0
    assert "data.eval_fraction = 0.05" in capsys.readouterr().out


# ---- wandb, tensorboard ----


def fake_wandb(monkeypatch) -> list[dict]:
    """A wandb module in sys.modules whose init records its keywords."""
    inits = []
    run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kw: inits.append(kw) or run
    monkeypatch.setitem(sys.modules, "wandb", module)
    return inits


def test_wandb_asked_for_but_not_installed_is_one_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as e:
        load_config("sft", None, ["model.path=m", "data.path=d", "run.wandb=true"])
    assert str(e.value) == WANDB_MISSING
    assert load_config("sft", None, ["model.path=m", "data.path=d"]).run.wandb is False  # off: no check
    with pytest.raises(ConfigError) as e:  # the logger itself, for a config built without the check
        MetricLogger(
            tmp_path, enabled=True, total_steps=1, initial_step=0, tensorboard=False, wandb=True, progress=False
        )
    assert str(e.value) == WANDB_MISSING
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any file is opened


def test_wandb_gets_project_entity_group_and_the_run_config(monkeypatch, tmp_path):
    inits = fake_wandb(monkeypatch)
    overrides = ["run.wandb=true", "run.wandb_entity=team", "run.wandb_group=sweep-1", f"run.output_dir={tmp_path}"]
    cfg = load_config("ppo", None, PPO + overrides)
    assert cfg.run.wandb_project == "rto"
    run_dir = tmp_path / cfg.run.name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))  # as rto.run.start_run writes it
    main_rank = types.SimpleNamespace(is_main=True)
    with run_logger(run_dir, cfg.run, main_rank, total_steps=2, initial_step=0) as logger:
        logger.log(1, {"train/loss": 0.5})
    (init,) = inits
    assert (init["project"], init["entity"], init["group"], init["name"]) == ("rto", "team", "sweep-1", "run")
    assert init["config"]["algo"] == "rto" and init["config"]["run"]["wandb_group"] == "sweep-1"
    cfg.run.wandb_project, cfg.run.wandb_entity, cfg.run.wandb_group = "paper", None, None
    run_logger(run_dir, cfg.run, main_rank, total_steps=2, initial_step=0).close()
    assert (inits[1]["project"], inits[1]["entity"], inits[1]["group"]) == ("paper", None, None)


def test_tensorboard_gets_the_run_config_once_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("sft", None, ["model.path=m", "data.path=d", "run.progress=false", "optim.lr=3e-4"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with run_logger(run_dir, cfg.run, types.SimpleNamespace(is_main=True), total_steps=1, initial_step=0) as log:
        log.log(1, {"train/loss": 1.0})
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert "    optim:" in shown and "lr: 0.0003" in shown and "trust_remote_code: false" in shown


def test_the_revision_reaches_the_generation_config_of_a_hub_model(monkeypatch):
    """Stop tokens come from the model's generation_config.json: at the pinned revision, like its weights."""
    from rto.families import stop_token_ids
    from rto.models import tiny_tokenizer

    seen = []

    def fake(path, *args, **kw):
        seen.append((path, kw.get("revision")))
        return transformers.GenerationConfig(eos_token_id=[7, 9])

    monkeypatch.setattr(transformers.GenerationConfig, "from_pretrained", fake)
    tok = tiny_tokenizer(["w1", "w2"])
    assert stop_token_ids(tok, "org/model", [], revision="v1.0") == [tok.eos_token_id, 7, 9]
    assert seen == [("org/model", "v1.0")]


def test_the_vllm_engine_loads_the_actor_at_its_revision(monkeypatch):
    """vLLM is GPU-only and optional: a stand-in `vllm` module records what the engine asks `LLM` for."""
    from rto.config import RolloutConfig
    from rto.models import tiny_causal_lm, tiny_tokenizer
    from rto.rollout.vllm import VLLMEngine

    asked = {}

    class LLM:
        def __init__(self, **kw):
            asked.update(kw)

        def sleep(self, level):
            pass

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    tok = tiny_tokenizer(["w1", "w2"])
    cfg = RolloutConfig(engine="vllm")
    VLLMEngine(tiny_causal_lm(len(tok)), "org/model", tok, cfg, "cpu", 0, revision="v2", trust_remote_code=True)
    assert (asked["model"], asked["revision"], asked["tokenizer_revision"]) == ("org/model", "v2", "v2")
    assert asked["trust_remote_code"] is True
