"""`rto ppo` on tiny models: every algo and estimator, the rewards the loop feeds to GAE, policy movement,
engine/trainer log-prob parity, resume, tokenizer checks, weight streaming, and 2 ranks under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rto import advantages as adv_mod
from rto.config import ConfigError, load_config
from rto.forward import policy_logp
from rto.models import tiny_causal_lm, tiny_tokenizer
from rto.parallel import init_distributed
from rto.rollout.weight_sync import stream_weights
from rto.scoring import on_support
from rto.trainers import ppo
from tests.assets import WORDS, make_rl_assets, small_ppo_args

QUIET = ["run.progress=false", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def rl(tmp_path_factory):
    return make_rl_assets(tmp_path_factory.mktemp("rl"))


def args(rl, out, name, *extra):
    faster = [
        "actor_optim.lr=1e-3",
        "critic_optim.lr=1e-3",
        "actor_optim.warmup_ratio=0",
        "critic_optim.warmup_ratio=0",
    ]
    settings = ["rollout.max_new_tokens=12", "train.micro_batch_size=4", *faster, "train.log_every=1"]
    return small_ppo_args(rl, out, name, *settings, *extra)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cfg(rl, out, name, *extra):
    return load_config("ppo", "toy", args(rl, out, name, *extra))


@pytest.mark.parametrize(
    "algo,estimator", [("ppo", "gae"), ("rto", "gae"), ("rs-ppo", "gae"), ("ddpo", "gae"), ("rto", "reinforce++")]
)
def test_every_algo_and_estimator_trains(rl, tmp_path, algo, estimator):
    ppo.main(cfg(rl, tmp_path, "run", f"algo={algo}", f"estimator={estimator}", "train.steps=2"))
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values())
        assert r["rollout/response_length"] > 0 and 0 <= r["rollout/truncated_fraction"] <= 1
        for phase in ("generate", "score", "advantages", "update", "sync"):
            assert r[f"time/{phase}_s"] >= 0
    assert ("train/vf_loss" in rows[0]) == (estimator == "gae")
    assert (rows[0]["rollout/dpo_reward_per_sequence"] != 0) == (algo != "ppo")
    assert (tmp_path / "run" / "hf" / "actor" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "hf" / "critic").exists() == (estimator == "gae")


def reference_rewards(s, mask, k, scale, clip, score_clip, algo):
    """the token reward of docs/algorithm.md, row by row in plain Python, from the scored tensors."""
    out = torch.zeros_like(s.logp_old, dtype=torch.float64)
    for b in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[b, t]]
        z = {}
        if algo != "ppo":
            z = {t: max(-clip, min(clip, scale * (s.logp_dpo[b, t].item() - s.logp_ref[b, t].item()))) for t in valid}
        for t in valid:
            out[b, t] = -k * (s.logp_old[b, t].item() - s.logp_ref[b, t].item())
            if algo in ("rto", "rs-ppo"):
                out[b, t] += z[t]
        last = valid[-1]
        out[b, last] += max(-score_clip, min(score_clip, s.score[b].item()))
        if algo == "rs-ppo":
            out[b, last] -= sum(z.values())
        if algo == "ddpo":
            out[b, last] += sum(z.values())
    return out


@pytest.mark.parametrize("algo", ["ppo", "rto", "rs-ppo", "ddpo"])
def test_rewards_fed_to_gae_follow_the_reference_formula(rl, tmp_path, monkeypatch, algo):
    seen = []

    def spy(scored, mask, c):
        out = adv_mod.compute_advantages(scored, mask, c)
        seen.append((scored, mask, out))
        return out

    monkeypatch.setattr(ppo, "compute_advantages", spy)
    c = cfg(
        rl,
        tmp_path,
        "run",
        f"algo={algo}",
        "train.steps=1",
        "rewards.kl_coef=0.2",
        "rewards.dpo_scale=0.5",
        "rewards.dpo_clip=0.3",
        "rewards.score_clip=0.01",
    )
    ppo.main(c)
    ((scored, mask, (rewards, advantages, returns)),) = seen
    expected = reference_rewards(scored, mask, 0.2, 0.5, 0.3, 0.01, algo)
    torch.testing.assert_close(rewards.double(), expected, rtol=1e-5, atol=1e-6)
    # GAE over the valid positions (contiguous here), value after the last = 0
    g, lam = c.rewards.gamma, c.rewards.lam
    for b in range(mask.shape[0]):
        valid = mask[b].nonzero().squeeze(1).tolist()
        carry, expected_returns = 0.0, {}
        for i in reversed(range(len(valid))):
            t = valid[i]
            next_v = scored.values[b, valid[i + 1]].item() if i + 1 < len(valid) else 0.0
            carry = rewards[b, t].item() + g * next_v - scored.values[b, t].item() + g * lam * carry
            expected_returns[t] = carry + scored.values[b, t].item()
        for t, value in expected_returns.items():
            assert returns[b, t].item() == pytest.approx(value, abs=1e-4)
    # whitened advantages: mean 0, variance 1 over the response tokens
    assert advantages[mask].mean().item() == pytest.approx(0, abs=1e-5)
    assert advantages[mask].var(unbiased=False).item() == pytest.approx(1, abs=1e-3)


def test_on_support_zeroes_the_dpo_log_ratio_where_the_reference_hardly_goes():
    ref = torch.log(torch.tensor([[0.5, 0.01, 0.2], [0.001, 0.3, 0.05]]))
    dpo = torch.log(torch.tensor([[0.6, 0.4, 0.1], [0.2, 0.3, 0.01]]))
    out = on_support(dpo, ref, 0.05)  # 0.01 and 0.001 are off the support; 0.05 is on it
    expected = torch.stack([torch.stack([dpo[0, 0], ref[0, 1], dpo[0, 2]]), torch.stack([ref[1, 0], *dpo[1, 1:]])])
    assert torch.equal(out, expected)


def test_support_aware_dpo_term_changes_only_the_tokens_off_the_reference_support(rl, tmp_path, monkeypatch):
    seen = {}

    def spy(name):
        def record(scored, mask, c):
            seen[name] = (scored, mask)
            return adv_mod.compute_advantages(scored, mask, c)

        return record

    support = 0.04  # about 1 / vocabulary: the tiny random reference puts tokens on both sides
    for name, extra in (("plain", []), ("support", [f"rewards.dpo_support={support}"])):
        monkeypatch.setattr(ppo, "compute_advantages", spy(name))
        ppo.main(cfg(rl, tmp_path, name, "algo=rto", "train.steps=1", *extra))
    (plain, mask), (aware, _) = seen["plain"], seen["support"]
    torch.testing.assert_close(aware.logp_ref, plain.logp_ref)  # same seed: the same first rollout
    off = mask & (plain.logp_ref < math.log(support))
    assert 0 < off.sum() < mask.sum()
    torch.testing.assert_close(aware.logp_dpo[off], aware.logp_ref[off])  # no DPO credit there
    torch.testing.assert_close(aware.logp_dpo[mask & ~off], plain.logp_dpo[mask & ~off])
    logged = metrics(tmp_path / "support")[0]["rollout/dpo_unsupported_fraction"]
    assert logged == pytest.approx(off.sum().item() / mask.sum().item())
    assert "rollout/dpo_unsupported_fraction" not in metrics(tmp_path / "plain")[0]


def test_policy_moves_and_clip_fraction_is_sane(rl, tmp_path):
    ppo.main(cfg(rl, tmp_path, "run", "train.steps=2", "train.ppo_epochs=2", "actor_optim.lr=3e-3"))
    rows = metrics(tmp_path / "run")
    for r in rows:
        assert 0 <= r["train/clip_fraction"] <= 1
        assert math.isfinite(r["train/kl_old_k3"]) and r["train/kl_old_k3"] > 0  # later minibatches see a new policy
    before = load_file(rl["model"] / "model.safetensors")
    after = load_file(tmp_path / "run" / "hf" / "actor" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_engine_logprobs_match_the_trainer_after_an_update(rl, tmp_path):
    c = cfg(rl, tmp_path, "run", "train.steps=1")
    d = init_distributed()
    from rto.models import load_tokenizer

    tok = load_tokenizer(c.actor)
    models = ppo.build_models(c, d)
    engine = ppo.build_engine(c, models, tok, d)
    prompts = ppo.load_prompts(c, tok, d)[:8]
    # one update so the actor differs from its checkpoint
    batch = engine.generate(prompts)
    logp = policy_logp(models.actor, batch, c.rollout.temperature)
    (-(logp * batch.response_mask).sum()).backward()
    with torch.no_grad():
        for p in models.actor.parameters():
            p.add_(p.grad, alpha=-1e-2)
            p.grad = None
    engine.sync_weights()
    batch = engine.generate(prompts)
    with torch.no_grad():
        trainer_logp = policy_logp(models.actor, batch, c.rollout.temperature)
    forced = batch.response_mask & (batch.response_mask.cumsum(1) == batch.response_lengths[:, None])
    compare = batch.response_mask & ~(forced & batch.truncated[:, None])
    torch.testing.assert_close(batch.rollout_logp[compare], trainer_logp[compare], rtol=1e-4, atol=1e-4)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(rl, tmp_path):
    ppo.main(cfg(rl, tmp_path, "full", "train.steps=3", "train.save_every=1", "run.keep_last=5"))
    import shutil

    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_00000002", tmp_path / "resumed" / "checkpoints" / "step_00000002"
    )
    ppo.main(cfg(rl, tmp_path, "resumed", "train.steps=3", "run.resume=auto"))
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [3]
    for part in ("actor", "critic"):
        a = load_file(tmp_path / "full" / "hf" / part / "model.safetensors")
        b = load_file(tmp_path / "resumed" / "hf" / part / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{part} {k} differs after resume")


def test_models_with_another_tokenizer_are_refused(rl, tmp_path):
    other = tmp_path / "other-dpo"
    tok = tiny_tokenizer(WORDS + ["extra"])
    tiny_causal_lm(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    c = cfg(rl, tmp_path, "run", f"dpo={other}")
    with pytest.raises(ConfigError, match="the tokenizer of dpo .* differs from the actor's .* must share the actor's"):
        ppo.main(c)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["algo=rto", "dpo=null"], "algo=rto needs the DPO model"),
        (["train.train_batch_size=5"], "must divide the rollout batch"),
        (["rewards.score_mean=1.0"], "rewards.score_mean and rewards.score_std go together"),
        (["estimator=reinforce"], "estimator must be one of gae, reinforce++"),
    ],
)
def test_bad_ppo_settings_are_refused(rl, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        cfg(rl, tmp_path, "run", *extra)


def test_weights_stream_in_buckets():
    lm = tiny_causal_lm(40)
    got = []
    n = stream_weights(lm, got.append, bucket_bytes=64 * 1024)
    flat = dict(kv for bucket in got for kv in bucket)
    assert n == len(got) > 1
    assert flat.keys() == lm.state_dict().keys()
    for k, v in lm.state_dict().items():
        assert torch.equal(flat[k], v)


def test_two_ranks(rl, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "rto",
        "ppo",
        "--recipe",
        "toy",
        *args(rl, tmp_path, "two", "train.steps=2"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(v) for r in rows for v in r.values())
    assert (tmp_path / "two" / "hf" / "actor" / "config.json").is_file()


@pytest.mark.vllm
def test_vllm_engine_parity_after_sync(rl, tmp_path):
    pytest.importorskip("vllm", reason="the vLLM engine needs vLLM")
    if not torch.cuda.is_available():
        pytest.skip("the vLLM engine needs a CUDA device")
    c = cfg(rl, tmp_path, "run", "rollout.engine=vllm", "train.steps=1")
    d = init_distributed()
    from rto.models import load_tokenizer

    tok = load_tokenizer(c.actor)
    models = ppo.build_models(c, d)
    engine = ppo.build_engine(c, models, tok, d)
    with torch.no_grad():
        for p in models.actor.parameters():
            p.mul_(1.01)
    engine.sync_weights()
    batch = engine.generate(ppo.load_prompts(c, tok, d)[:8])
    with torch.no_grad():
        trainer_logp = policy_logp(models.actor, batch, c.rollout.temperature)
    compare = batch.response_mask & ~batch.truncated[:, None]
    torch.testing.assert_close(batch.rollout_logp[compare], trainer_logp[compare], rtol=0, atol=2e-2)


def test_packed_scoring_and_update_match_padded(rl, tmp_path):
    """train.packing: the same rollout (same seed) scored and trained padding-free gives the padded run's numbers."""
    rows = {}
    for packing in (False, True):
        ppo.main(cfg(rl, tmp_path, f"p{packing}", "train.steps=2", f"train.packing={packing}"))
        rows[packing] = metrics(tmp_path / f"p{packing}")
    assert rows[True][0]["rollout/response_length"] == rows[False][0]["rollout/response_length"]
    for step in range(2):
        padded, packed = rows[False][step], rows[True][step]
        for key in padded:
            if key == "time" or key.startswith(("time/", "throughput/")):  # clocks, not results
                continue
            assert packed[key] == pytest.approx(padded[key], rel=1e-3, abs=1e-5), (step, key)
