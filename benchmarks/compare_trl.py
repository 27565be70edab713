"""Our PPO step against TRL's PPO trainer on the same tiny model, on CPU, side by side in one run.

Run:  python benchmarks/compare_trl.py            (needs `trl` with its PPO trainer: pip install "trl==0.29.1")

Both train the same Llama shape as `bench_step.py --shape tiny` (random weights; policy, reference, reward model
and critic of that shape) on the same prompts: 32 prompts x 32 tokens per step, 64 new tokens (EOS never
sampled on purpose, so every response is full length), micro-batches of 8, one PPO epoch over one minibatch of
32. TRL runs `PPOTrainer.train()` for 1 and for 1 + `--steps` steps in fresh processes; its step time is the
difference divided by `--steps` (start-up and the first step cancel out). Ours runs `bench_step.py --variant ours`
(algo=ppo, so no DPO model either) and takes its median step time. TRL's algorithm differs in details (it scores
the reward model on the response truncated at the stop token, whitens rewards optionally, logs more), so the ratio
compares two whole PPO steps at the same sizes, not identical arithmetic.
Output: benchmarks/results/trl_compare_<device>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_step import SHAPES  # noqa: E402

BATCH, PROMPT, NEW, MICRO = 32, 32, 64, 8


def run_trl(steps: int) -> float:
    """Wall time of `PPOTrainer.train()` for `steps` steps, in this process (seconds)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rto.models import tiny_tokenizer

    torch.manual_seed(0)
    shape = SHAPES["tiny"]
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0)
    words = [f"w{i}" for i in range(shape["vocab_size"] - 8)]
    tok = tiny_tokenizer(words)
    config.vocab_size = len(tok)
    policy, ref = LlamaForCausalLM(config), LlamaForCausalLM(config)
    ref.load_state_dict(policy.state_dict())  # the reference starts as the policy, as in RLHF
    scalar = LlamaConfig(**{**config.to_dict(), "num_labels": 1})
    reward, value = LlamaForSequenceClassification(scalar), LlamaForSequenceClassification(scalar)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(8, len(tok), (PROMPT,), generator=gen).tolist()} for _ in range(BATCH * steps)]
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=BATCH // MICRO,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=BATCH * steps,
            response_length=NEW,
            local_rollout_forward_batch_size=MICRO,
            stop_token=None,
            missing_eos_penalty=None,
            num_sample_generations=0,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            logging_steps=1000,
            learning_rate=1e-6,
            temperature=1.0,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=Dataset.from_list(rows),
        )
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def child(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps")
    parser.add_argument("--trl-steps", type=int, help=argparse.SUPPRESS)  # internal: one TRL run
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.trl_steps:
        print(f"TRL_SECONDS {run_trl(args.trl_steps)}")
        return 0
    import torch
    import trl

    one = float(child([sys.executable, __file__, "--trl-steps", "1"]).split("TRL_SECONDS ")[1])
    many = float(child([sys.executable, __file__, "--trl-steps", str(1 + args.steps)]).split("TRL_SECONDS ")[1])
    trl_step = (many - one) / args.steps
    ours_cmd = [
        sys.executable,
        str(HERE / "bench_step.py"),
        "--variant",
        "ours",
        "--shape",
        "tiny",
        "--steps",
        str(args.steps),
        "--batch",
        str(BATCH),
        "--prompt-len",
        str(PROMPT),
        "--new-tokens",
        str(NEW),
        "--algo",
        "ppo",
    ]
    ours = json.loads(child(ours_cmd).split("RESULT ", 1)[1])
    ours_step = sum(ours["times"].values())
    device = f"cpu-{os.cpu_count()}cores"
    date = dt.date.today().isoformat()
    result = {
        "trl_version": trl.__version__,
        "torch": torch.__version__,
        "device": device,
        "steps": args.steps,
        "trl_train_1_step_s": one,
        f"trl_train_{1 + args.steps}_steps_s": many,
        "trl_step_s": trl_step,
        "ours_step_s": ours_step,
        "ours_phases_s": ours["times"],
        "ratio_ours_over_trl": ours_step / trl_step,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"trl_compare_{device}_{date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = [
        f"# Ours vs TRL {trl.__version__} PPO, tiny shape, {device}, {date}",
        "",
        f"Command: `python benchmarks/compare_trl.py --steps {args.steps}`",
        "",
        f"{BATCH} prompts x {PROMPT} tokens, {NEW} new tokens, micro-batches of {MICRO}, one PPO epoch; algo=ppo "
        "for both (no DPO model).",
        "",
        "| | seconds per step |",
        "|---|---|",
        f"| TRL PPOTrainer ((train of {1 + args.steps} steps - train of 1 step) / {args.steps}) | {trl_step:.3f} |",
        f"| ours (median phases, bench_step.py --variant ours --algo ppo) | {ours_step:.3f} |",
        f"| ratio ours / TRL | {ours_step / trl_step:.2f} |",
    ]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
