"""One full RTO step (generate, score, advantages, update, sync), ours against a peer-style baseline.

Run:  python benchmarks/bench_step.py --shape tiny             (CPU; --quick for the CI smoke test)
      python benchmarks/bench_step.py --shape 1b [--profile]    (GPU; also 0.5b, 8b: random weights, no download)

Both variants run the same rollout (same prompts, same seed) through the trainer's own functions
(`score_rollout`, `compute_advantages`, `ppo_update`) on one rank, where `rto.parallel.shard` leaves the models
whole (no FSDP2); they differ where peer trainers differ:
- generation: ours the built-in decode loop (head on the last position only, one-draw-per-row sampling);
  peer: Hugging Face `generate` keeping every step's logits (`output_logits`), log_softmax + gather after;
- log-probs: ours through `rto_kernels.linear_logprobs` on response positions only; peer: the full [B, T, V]
  logits, fp32 log_softmax and gather, for actor, reference and DPO model, in scoring and in the update;
- advantages: ours one `rto_kernels.rto_advantages` pass (the Triton kernel on GPU; the reference on CPU, so
  no difference there); peer: vectorised rewards then the Python loop over time;
- weight sync into an inference copy: ours bucketed (`rollout.weight_sync`, 512 MiB buckets); peer: one load
  call per parameter.
`--fsdp-baseline` adds both variants on the one-rank FSDP2 path every run took before
(`parallel.single_rank_fsdp=true`: `ours-fsdp`, `peer-fsdp`), so that one run measures what skipping FSDP2 saves.
Each variant runs in a fresh subprocess. Reported per phase: wall time (median of the measured steps), peak
memory above the phase's start (CUDA: max_memory_allocated; CPU: the kernel's peak RSS, reset before each phase
through /proc/self/clear_refs, in a second run where glibc maps every allocation over 64 KiB on its own so that
RSS follows live tensors; times come from the first run), generation tokens/s, training tokens/s and the update
phase's MFU against the device's measured matmul rate.
Output: benchmarks/results/step_<shape>_<device>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # Llama-shaped configs: hidden, layers, heads, kv heads, intermediate, vocab
    "micro": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=172,
        vocab_size=2048,
    ),  # CI smoke test
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        vocab_size=32000,
    ),
    "0.5b": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=2816,
        vocab_size=128256,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    ),
}
PHASES = ("generate", "score", "advantages", "guard", "update", "sync")
VARIANTS = ("ours", "peer", "ours-fsdp", "peer-fsdp")  # -fsdp: FSDP2 on one rank (parallel.single_rank_fsdp=true)


# ---- memory ----


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


class PhaseMemory:
    """Peak memory above a phase's start, in MiB."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.base = _status("VmRSS:")

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_status("VmHWM:") - self.base) / 2**20


# ---- the peer-style pieces ----


def peer_policy_class():
    from rto.models import PolicyModel, shift_targets

    class PeerPolicyModel(PolicyModel):
        """Log-probs the way peer trainers compute them: full logits, fp32 log_softmax, gather."""

        def forward(self, input_ids, attention_mask, position_ids=None, *, loss_mask, temperature=1.0, **_):
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [B, T-1, V]
            sel, targets = shift_targets(input_ids, loss_mask)
            logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # [B, T-1]
            out = torch.zeros(loss_mask.shape, dtype=logp.dtype, device=logp.device)
            out[:, 1:] = torch.where(sel, logp, torch.zeros_like(logp))
            return {"logp": out}

    return PeerPolicyModel


def peer_engine_class():
    from rto.rollout.hf import HFEngine

    class PeerEngine(HFEngine):
        """Generation the way peer trainers' Hugging Face path does it: `generate` with its own sampling
        (`multinomial` over the softmax), every step's [B, V] logits kept and stacked to [B, L, V], then
        log_softmax + gather for the sampled tokens' log-probs."""

        def _generate_chunk(self, prompts):
            c = self.cfg
            P = max(len(p) for p in prompts)
            ids, attn = self.left_padded(prompts, P)
            out = self.lm.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k or None,
                max_new_tokens=c.max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
            new = out.sequences[:, P:]  # [B, L]
            logits = torch.stack(out.logits, dim=1).float() / c.temperature  # [B, L, V]
            logp = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
            return new.tolist(), logp.tolist()

    return PeerEngine


def peer_advantages(s, mask, cfg):
    """The same rewards and GAE through the unfused PyTorch reference (vectorised rewards, a loop over time)."""
    from rto.advantages import compute_advantages
    from rto_kernels import reference

    return compute_advantages(s, mask, cfg, op=reference.rto_advantages)


def per_parameter_sync(lm, engine_copy) -> None:
    target = dict(engine_copy.named_parameters())
    for name, p in lm.named_parameters():  # one load call per parameter
        target[name].data.copy_(p.detach())


def bucketed_sync(lm, engine_copy) -> None:
    from rto.rollout.weight_sync import stream_weights

    target = engine_copy.state_dict()

    def load(bucket):
        for name, t in bucket:
            target[name].copy_(t)

    stream_weights(lm, load, 512 * 2**20)


# ---- one variant, in this process ----


def run_variant(
    variant: str,
    shape: str,
    steps: int,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    profile: bool,
    out: Path = RESULTS,
    decode: str = "dynamic",
    packing: bool = False,
    ragged: bool = False,
    algo: str = "rto",
):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    from rto import advantages
    from rto.config import PPOConfig, load_config
    from rto.guard import NonFiniteGuard
    from rto.models import PolicyModel, ScalarModel
    from rto.parallel import freeze, init_distributed, shard
    from rto.rollout.hf import HFEngine
    from rto.run import Timer, Trainable
    from rto.trainers import ppo

    d = init_distributed()
    label, variant, fsdp = variant, variant.removesuffix("-fsdp"), variant.endswith("-fsdp")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    shape_config = dict(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0)
    config = LlamaConfig(**shape_config, torch_dtype=dtype)
    settings = {
        "actor.path": "x",
        "reward": "x",
        "dpo": "x",
        "data.path": "x",
        "algo": algo,
        "rollout.max_new_tokens": new_tokens,
        "rollout.prompts_per_step": batch,
        "rollout.micro_batch_size": batch,
        "train.train_batch_size": batch,
        "train.micro_batch_size": min(batch, 8),
        "actor_optim.warmup_ratio": 0,
        "rollout.kv_cache": "dynamic" if decode == "dynamic" else "static",
        "rollout.compile_decode": decode == "compiled",
        "train.packing": packing,
        "parallel.single_rank_fsdp": fsdp,
    }
    cfg: PPOConfig = load_config("ppo", None, [f"{k}={v}" for k, v in settings.items()])
    policy_cls = peer_policy_class() if variant == "peer" else PolicyModel

    def causal(seed):
        torch.manual_seed(seed)
        lm = LlamaForCausalLM(config).to(dtype)
        return lm, shard(policy_cls(lm), lm, cfg.parallel, d.device)

    def scalar(seed):
        torch.manual_seed(seed)
        c = LlamaConfig(**{**config.to_dict(), "num_labels": 1, "classifier_dropout": 0.0})
        hf = LlamaForTokenClassification(c).to(dtype)
        return hf, shard(ScalarModel(hf), hf, cfg.parallel, d.device)

    actor_lm, actor = causal(1)
    _, ref = causal(1)
    dpo_model = freeze(causal(2)[1]) if algo != "ppo" else None
    critic_hf, critic = scalar(3)
    _, reward = scalar(4)
    models = ppo.Models(actor, actor_lm, freeze(ref), dpo_model, critic, critic_hf, freeze(reward))
    engine_copy = LlamaForCausalLM(config).to(dtype).to(d.device)  # the inference engine's weights

    class Tok:  # the engine needs only EOS and pad ids; EOS is never sampled on purpose (fixed-length rollouts)
        eos_token_id = config.vocab_size - 1
        pad_token_id = 0

    engine_cls = peer_engine_class() if variant == "peer" else HFEngine
    sync = per_parameter_sync if variant == "peer" else bucketed_sync

    class BenchEngine(engine_cls):
        """The engine with a real weight sync: into a separate inference copy of the actor."""

        def sync_weights(self):
            _sync_full(sync, actor, actor_lm, engine_copy)

    engine = BenchEngine(actor, actor_lm, Tok(), cfg.rollout, d.device)
    trainables = []
    for name, model, o in (("actor", actor, cfg.actor_optim), ("critic", critic, cfg.critic_optim)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr)
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        trainables.append(Trainable(name, model, optimizer, constant, 1.0))
    gen = torch.Generator().manual_seed(0)
    # ragged: prompt lengths uniform in [prompt_len / 4, 7 prompt_len / 4] (the same mean), as real prompts vary
    lo, hi = max(1, prompt_len // 4), prompt_len * 7 // 4 + 1
    lengths = torch.randint(lo, hi, (batch,), generator=gen).tolist() if ragged else [prompt_len] * batch
    prompts = [torch.randint(1, config.vocab_size - 1, (n,), generator=gen).tolist() for n in lengths]
    mem = PhaseMemory(d.device)
    times = {p: [] for p in PHASES}
    peaks = {p: 0.0 for p in PHASES}
    tokens = {"generated": 0, "trained": 0}

    class BenchTimer(Timer):
        """The step's own phase timer, plus the peak memory of each phase."""

        def start(self, phase):
            mem.start()

        def stop(self, phase):
            peaks[phase] = max(peaks.get(phase, 0.0), mem.stop())

    compute_adv = peer_advantages if variant == "peer" else advantages.compute_advantages
    guard = NonFiniteGuard(1, "(the benchmark saves no checkpoints)")
    trainer = ppo.PPOTrainer(cfg, d, models, engine, trainables, guard, advantages=compute_adv, timer=BenchTimer)
    prof = None
    for step in range(steps + 1):  # step 0 warms up (lazy init, allocator, kernels)
        if profile and step == steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if d.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=activities)
            prof.__enter__()
        torch.manual_seed(100 + step)
        result = trainer.step(prompts, with_metrics=False)  # the trainer's own step, phase by phase
        for phase, seconds in result.seconds.items():
            times.setdefault(phase, []).append(seconds)
        if step == 0:
            times = {p: [] for p in PHASES}
            peaks = {p: 0.0 for p in PHASES}
        else:
            tokens["generated"] += int(result.batch.response_mask.sum())
            tokens["trained"] += int(result.batch.attention_mask.sum())
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(str(out / f"trace_{label}_{shape}.json"))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    # matmul parameters: the input embedding is a lookup, not a matmul, so it does not count toward FLOPs
    params = sum(p.numel() for n, p in actor_lm.named_parameters() if "embed_tokens" not in n)
    critic_params = sum(p.numel() for n, p in critic_hf.named_parameters() if "embed_tokens" not in n)
    # what one decode step must read at least: every matmul weight once, and the KV cache of each row
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * dtype.itemsize
    return {
        "times": {p: statistics.median(v) for p, v in times.items()},
        "peak_mib": peaks,
        "tokens": tokens,
        "steps": steps,
        "actor_params": params,
        "critic_params": critic_params,
        "decode": decode,
        "decode_weight_bytes": params * dtype.itemsize,
        "kv_bytes_per_token": kv_bytes_per_token,
    }


def _sync_full(sync, actor, actor_lm, engine_copy):
    """Sync with the actor's FSDP2 units gathered (as for generation; nothing to gather on one rank without FSDP2),
    so every variant copies whole tensors."""
    from rto.rollout.hf import gathered

    with gathered(actor):
        sync(actor_lm, engine_copy)


# ---- driver ----


def copy_bandwidth(device: torch.device) -> float:
    """Measured device memory bandwidth (GB/s) of a large copy (bytes read + bytes written)."""
    n = 2**28 if device.type == "cuda" else 2**25  # 1 GiB / 128 MiB of fp32
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * a.nbytes * reps / (time.perf_counter() - t0) / 1e9


def matmul_rate(device: torch.device) -> float:
    """Measured dense matmul rate (TFLOP/s) in the training dtype of this device."""
    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: 1 measured step, small batch")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per step")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the last measured step: a chrome trace per variant in --out, a table on stderr",
    )
    parser.add_argument(
        "--decode",
        choices=("auto", "dynamic", "static", "compiled"),
        default="auto",
        help="our engine's decode: KV cache kind, compiled step (auto: compiled on CUDA, else dynamic)",
    )
    parser.add_argument("--algo", default="rto", help="algo setting (ppo: no DPO model)")
    parser.add_argument("--ragged", action="store_true", help="prompt lengths vary (uniform, same mean length)")
    parser.add_argument("--packing", action="store_true", help="our scoring and update run padding-free")
    parser.add_argument(
        "--fsdp-baseline",
        action="store_true",
        help="also run both variants with FSDP2 on one rank (parallel.single_rank_fsdp=true), as before it was skipped",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, interleaved (a loaded machine: its load drifts); times are the "
        "medians over rounds, each round's kept in the JSON",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.prompt_len, args.new_tokens = 1, 8, 16, 16
    if args.decode == "auto":
        args.decode = "compiled" if torch.cuda.is_available() else "dynamic"
    if args.variant:
        peer = args.variant.startswith("peer")
        decode = "dynamic" if peer else args.decode  # the peer engine is HF generate
        packing = args.packing and not peer  # peer-style batches stay padded
        result = run_variant(
            args.variant,
            args.shape,
            args.steps,
            args.batch,
            args.prompt_len,
            args.new_tokens,
            args.profile,
            args.out,
            decode,
            packing,
            args.ragged,
            args.algo,
        )
        print("RESULT " + json.dumps(result))
        return 0

    variants = VARIANTS if args.fsdp_baseline else VARIANTS[:2]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    timed: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved: a change in the machine's load falls on every variant alike
        for variant in variants:
            timed[variant].append(_child(_variant_cmd(variant, args), env))
    runs = {}
    for variant in variants:
        result = _median_round(timed[variant])
        if not torch.cuda.is_available():
            # CPU peak memory comes from a second run in which every allocation of 64 KiB or more gets its own
            # mapping and goes back to the OS when freed, so a phase's peak RSS follows its live tensors (glibc
            # would otherwise reuse freed memory unseen). Its syscalls distort time, so times come from the first.
            cmd = _variant_cmd(variant, args)
            result["peak_mib"] = _child(cmd, {**env, "MALLOC_MMAP_THRESHOLD_": "65536"})["peak_mib"]
        runs[variant] = result
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate = matmul_rate(device)
    bandwidth = copy_bandwidth(device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{os.cpu_count()}cores"
    for r in runs.values():
        total = sum(r["times"].values())
        r["step_s"] = total
        per_step_trained = r["tokens"]["trained"] / r["steps"]
        per_step_generated = r["tokens"]["generated"] / r["steps"]
        r["generate_tokens_per_s"] = per_step_generated / r["times"]["generate"]
        r["train_tokens_per_s"] = per_step_trained / r["times"]["update"]
        flops = 6 * (r["actor_params"] + r["critic_params"]) * per_step_trained  # fwd + bwd of actor and critic
        r["update_mfu"] = flops / r["times"]["update"] / (rate * 1e12)
        # decode bound: each step reads the weights once and each row's KV cache (mean context over the steps)
        context = args.prompt_len + args.new_tokens / 2
        step_bytes = r["decode_weight_bytes"] + args.batch * context * r["kv_bytes_per_token"]
        r["decode_bound_tokens_per_s"] = args.batch * bandwidth * 1e9 / step_bytes
        r["decode_vs_bound"] = r["generate_tokens_per_s"] / r["decode_bound_tokens_per_s"]
    write(runs, args, device_name, rate, bandwidth)
    return 0


def _variant_cmd(variant: str, args) -> list[str]:
    """The command line of one variant's subprocess."""
    return [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--shape",
        args.shape,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--out",
        str(args.out),
        "--decode",
        args.decode,
        "--algo",
        args.algo,
        *(["--profile"] if args.profile else []),
        *(["--ragged"] if args.ragged else []),
        *(["--packing"] if args.packing else []),
    ]


def _median_round(results: list[dict]) -> dict:
    """One variant's result over its rounds: each phase's time the median of the rounds' (medians over steps);
    the rounds' own times kept under "rounds" when there are several."""
    out = dict(results[0])
    out["times"] = {p: statistics.median(r["times"][p] for r in results) for p in results[0]["times"]}
    if len(results) > 1:
        out["rounds"] = [r["times"] for r in results]
    return out


def _child(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def _without_out(argv: list[str]) -> list[str]:
    """The command-line arguments less --out and its value (the results folder is not part of the recipe)."""
    kept, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        kept.append(a)
    return kept


def fsdp_table(runs: dict) -> list[str]:
    """One rank without FSDP2 (ours, peer) against one rank with it (ours-fsdp, peer-fsdp): times and ratios."""
    names = ("ours", "ours-fsdp", "peer", "peer-fsdp")
    pairs = (("ours", "peer"), ("ours-fsdp", "peer-fsdp"), ("ours", "peer-fsdp"), ("ours", "ours-fsdp"))
    lines = [
        "",
        "One rank without FSDP2 (ours, peer: the default) and with it (ours-fsdp, peer-fsdp: "
        "`parallel.single_rank_fsdp=true`, the path every one-rank run took before):",
        "",
        "| phase | " + " | ".join(f"{n} s" for n in names) + " | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |",
        "|---" * (1 + len(names) + len(pairs)) + "|",
    ]
    rows = [(p, {n: runs[n]["times"][p] for n in names}) for p in PHASES]
    rows.append(("whole step", {n: runs[n]["step_s"] for n in names}))
    for phase, t in rows:
        ratios = " | ".join(f"{t[a] / t[b]:.2f}" for a, b in pairs)
        lines.append(f"| {phase} | " + " | ".join(f"{t[n]:.4f}" for n in names) + f" | {ratios} |")
    peaks = " | ".join(f"{runs[n]['peak_mib']['update']:.0f}" for n in names)
    lines += ["", f"Update-phase peak MiB ({', '.join(names)}): {peaks}"]
    return lines


def round_lines(runs: dict) -> list[str]:
    """The update phase's time ratios round by round (how much of a difference is the machine's noise)."""
    pairs = [("ours", "peer")]
    if "ours-fsdp" in runs:
        pairs += [("ours-fsdp", "peer-fsdp"), ("ours", "peer-fsdp"), ("ours", "ours-fsdp")]
    n = len(runs["ours"]["rounds"])
    lines = ["", "| update-phase time ratio | " + " | ".join(f"round {i + 1}" for i in range(n)) + " |"]
    lines.append("|---" * (1 + n) + "|")
    for a, b in pairs:
        ratios = [ra["update"] / rb["update"] for ra, rb in zip(runs[a]["rounds"], runs[b]["rounds"])]
        lines.append(f"| {a}/{b} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return lines


def write(runs: dict, args, device_name: str, rate: float, bandwidth: float) -> None:
    ours, peer = runs["ours"], runs["peer"]
    date = dt.date.today().isoformat()
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    tags = "".join(f"_{t}" for t in ("ragged", "packing", "quick", "fsdp_baseline") if getattr(args, t))
    stem = args.out / f"step_{args.shape}_{slug}_{date}{tags}"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_step.py " + " ".join(_without_out(sys.argv[1:]))
    lines = [
        f"# Step benchmark: shape {args.shape}, {device_name}, {date}",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"{args.batch} prompts x {args.prompt_len} tokens{' on average (ragged)' if args.ragged else ''}, "
        f"{args.new_tokens} new tokens, {args.steps} measured "
        f"steps after one warm-up; measured matmul rate {rate:.2f} TFLOP/s, copy bandwidth {bandwidth:.0f} GB/s. "
        f"Our engine's decode: {ours['decode']}; our scoring and update: "
        f"{'padding-free' if args.packing else 'padded'}. Times are medians over steps"
        f"{f' and then over {args.rounds} interleaved rounds' if args.rounds > 1 else ''}; peak memory is above "
        "each phase's start.",
        "",
        "| phase | ours s | peer-style s | time ratio (ours/peer) | ours peak MiB | peer peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PHASES:
        to, tp = ours["times"][p], peer["times"][p]
        mo, mp = ours["peak_mib"][p], peer["peak_mib"][p]
        mratio = f"{mo / mp:.2f}" if mp > 1 else "-"
        lines.append(f"| {p} | {to:.4f} | {tp:.4f} | {to / tp:.2f} | {mo:.0f} | {mp:.0f} | {mratio} |")
    lines.append(
        f"| whole step | {ours['step_s']:.4f} | {peer['step_s']:.4f} | {ours['step_s'] / peer['step_s']:.2f} | | | |"
    )
    lines += ["", "| | ours | peer-style |", "|---|---|---|"]
    for key, label in (
        ("generate_tokens_per_s", "generation tokens/s"),
        ("train_tokens_per_s", "training tokens/s"),
        ("update_mfu", "update-phase MFU"),
        ("decode_bound_tokens_per_s", "decode bandwidth bound tokens/s"),
        ("decode_vs_bound", "generation / bound"),
    ):
        fmt = "{:.1%}" if key in ("update_mfu", "decode_vs_bound") else "{:,.0f}"
        lines.append(f"| {label} | {fmt.format(ours[key])} | {fmt.format(peer[key])} |")
    if "ours-fsdp" in runs:
        lines += fsdp_table(runs)
    if "rounds" in ours:
        lines += round_lines(runs)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    meta = {
        "args": vars(args) | {"out": str(args.out)},
        "device": device_name,
        "matmul_tflops": rate,
        "copy_gb_per_s": bandwidth,
    }
    stem.with_suffix(".json").write_text(json.dumps(meta | {"runs": runs}, indent=1))
    print("\n".join(lines))
    print(f"wrote {stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
