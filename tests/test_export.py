"""`rto export`: checkpoints of a tiny SFT run and tiny PPO/RTO runs (GAE and REINFORCE++) as Hugging Face folders
that plain transformers loads with the run's weights at that step, and its refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rto.cli import main as cli
from rto.config import load_config
from rto.trainers import ppo, rm, sft
from tests.assets import make_assets, make_rl_assets, small_ppo_args


def step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:08d}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("export-offline"), n=32)


def offline_args(assets: dict, model: Path, data: str, name: str, *extra: str) -> list[str]:
    out = assets["model"].parent
    settings = [f"model.path={model}", f"data.path={assets[data]}", f"run.output_dir={out}", f"run.name={name}"]
    settings += ["train.global_batch_size=8", "train.micro_batch_size=8", "data.max_length=64"]
    settings += ["data.max_prompt_length=32", "data.eval_fraction=0", "optim.lr=1e-2", "optim.warmup_ratio=0"]
    return [*settings, "run.progress=false", "run.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def sft_run(assets) -> Path:
    base = shutil.copytree(assets["model"], assets["model"].parent / "sft-base")  # its own: one test moves it
    args = offline_args(assets, base, "sft", "sft", "train.max_steps=4", "train.save_every=2", "run.keep_last=3")
    sft.main(load_config("sft", None, args))
    return base.parent / "sft"


@pytest.fixture(scope="module")
def rl(tmp_path_factory) -> dict:
    return make_rl_assets(tmp_path_factory.mktemp("export-rl"), n_prompts=16)


def train_ppo(rl: dict, out: Path, name: str, *extra: str) -> Path:
    settings = small_ppo_args(
        rl, out, name, "rollout.max_new_tokens=4", "train.save_every=1", "run.keep_last=5", *extra
    )
    ppo.main(load_config("ppo", "toy", settings))
    return out / name


def export(capsys, *args) -> tuple[int, str, str]:
    rc = cli(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def checkpoint_weights(checkpoint: Path, name: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The model weights a checkpoint holds under `name`, read by DCP's own converter (not by the exporter's
    reader), without the wrapper's prefix (`lm.` for a policy, `model.` for a scalar model)."""
    dcp_to_torch_save(checkpoint, tmp / "whole.pt")
    state = torch.load(tmp / "whole.pt", weights_only=True)[name]
    return {k.split(".", 1)[1]: v for k, v in state.items()}


def assert_same(loaded: torch.nn.Module, expected: dict[str, torch.Tensor], what: str) -> None:
    """The loaded model has exactly the expected tensors, each equal (a tied LM head is saved once, as the
    embeddings)."""
    state = loaded.state_dict()
    if getattr(loaded.config, "tie_word_embeddings", False) and "lm_head.weight" not in expected:
        expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
    assert set(state) == set(expected), f"{what}: {sorted(set(state) ^ set(expected))[:3]} differ in presence"
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=f"{what}: {k} differs")


def test_sft_checkpoints_export_with_the_weights_of_their_step(sft_run, tmp_path, capsys):
    rc, out, _ = export(capsys, step(sft_run, 4), tmp_path / "last")
    assert rc == 0 and "rto export: sft step 4: model (LlamaForCausalLM" in out and str(tmp_path / "last") in out
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "last")  # the last step: the run's own export
    assert_same(lm, load_file(sft_run / "hf" / "model.safetensors"), "step 4")
    tok, run_tok = AutoTokenizer.from_pretrained(tmp_path / "last"), AutoTokenizer.from_pretrained(sft_run / "hf")
    assert tok.get_vocab() == run_tok.get_vocab() and tok.chat_template == run_tok.chat_template

    rc, out, _ = export(capsys, step(sft_run, 2), tmp_path / "mid")  # an intermediate step
    assert rc == 0 and "sft step 2" in out
    mid = AutoModelForCausalLM.from_pretrained(tmp_path / "mid")
    assert_same(mid, checkpoint_weights(step(sft_run, 2), "model", tmp_path), "step 2")
    assert any(not torch.equal(a, b) for a, b in zip(mid.state_dict().values(), lm.state_dict().values()))


def test_rm_checkpoint_exports_as_a_sequence_classifier(assets, tmp_path, capsys):
    rm.main(load_config("rm", None, offline_args(assets, assets["model"], "pairs", "rm", "train.max_steps=2")))
    run = assets["model"].parent / "rm"
    rc, out, _ = export(capsys, step(run, 2), tmp_path / "rm")
    assert rc == 0 and "rm step 2: model (LlamaForSequenceClassification" in out
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert_same(model, load_file(run / "hf" / "model.safetensors"), "reward model")


def test_ppo_checkpoints_export_actor_and_critic(rl, tmp_path, capsys):
    run = train_ppo(rl, tmp_path, "rto", "algo=rto", "train.steps=2")
    rc, out, _ = export(capsys, step(run, 2), tmp_path / "last")
    assert rc == 0 and "ppo step 2: actor" in out and "ppo step 2: critic (LlamaForSequenceClassification" in out
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "last" / "actor")
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "last" / "critic")
    assert_same(actor, load_file(run / "hf" / "actor" / "model.safetensors"), "actor step 2")
    assert_same(critic, load_file(run / "hf" / "critic" / "model.safetensors"), "critic step 2")

    rc, _, _ = export(capsys, step(run, 1), tmp_path / "mid")
    assert rc == 0
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "mid" / "actor")
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mid" / "critic")
    assert_same(actor, checkpoint_weights(step(run, 1), "actor", tmp_path), "actor step 1")
    assert_same(critic, checkpoint_weights(step(run, 1), "critic", tmp_path), "critic step 1")
    vocab = AutoTokenizer.from_pretrained(rl["model"]).get_vocab()
    assert AutoTokenizer.from_pretrained(tmp_path / "mid" / "critic").get_vocab() == vocab


def test_reinforce_plus_plus_exports_the_actor_only(rl, tmp_path, capsys):
    run = train_ppo(rl, tmp_path, "rpp", "estimator=reinforce++", "train.steps=1")
    (tmp_path / "out").mkdir()  # an existing empty folder is fine
    rc, out, _ = export(capsys, step(run, 1), tmp_path / "out")
    assert rc == 0 and "actor" in out and "critic" not in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["actor"]
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "actor")
    assert_same(actor, load_file(run / "hf" / "actor" / "model.safetensors"), "actor")


def test_refusals_are_one_line_errors(sft_run, tmp_path, capsys):
    def refused(*args) -> str:
        rc, _, err = export(capsys, *args)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("rto export: "), err
        return err

    err = refused(tmp_path / "nothing", tmp_path / "o")
    assert f"checkpoint error: {tmp_path / 'nothing'} is not a checkpoint folder" in err
    assert "is not a checkpoint folder (a run folder" in refused(sft_run, tmp_path / "o")
    orphan = tmp_path / "orphan" / "checkpoints" / "step_00000002"
    shutil.copytree(step(sft_run, 2), orphan)
    assert "holds no config.yaml" in refused(orphan, tmp_path / "o")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "busy exists and is not empty; pass --overwrite" in refused(step(sft_run, 2), busy)
    assert "holds the checkpoint" in refused(step(sft_run, 2), sft_run, "--overwrite")
    rc, _, _ = export(capsys, step(sft_run, 2), busy, "--overwrite")
    assert rc == 0 and not (busy / "notes.txt").exists() and (busy / "config.json").is_file()

    base = sft_run.parent / "sft-base"
    base.rename(base.with_name("moved"))
    try:
        err = refused(step(sft_run, 2), tmp_path / "o")
    finally:
        base.with_name("moved").rename(base)
    assert f"config error: model.path: no such file or folder: {base.resolve()}" in err
    assert not (tmp_path / "o").exists()
