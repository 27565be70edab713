"""The ppo command's config: generation (`RolloutConfig`), token rewards and GAE (`RewardConfig`), PPO steps and
batches (`PPOTrainConfig`), and `PPOConfig`, which holds them with the shared sections of offline.py."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rto.config.base import STOP_TOKENS_DOC, ConfigError, Keys, Section, doc
from rto.config.offline import ModelConfig, OptimConfig, ParallelConfig, PromptDataConfig, RunConfig
from rto_kernels import KL_ESTIMATORS, SHAPINGS


@dataclass
class RolloutConfig(Section):
    engine: str = doc("hf", "hf (built in: the actor generates) or vllm (colocated vLLM engine, GPU only)")
    prompts_per_step: int = doc(1024, "prompts per rollout step, over all ranks")
    samples_per_prompt: int = doc(1, "responses sampled for each prompt")
    max_new_tokens: int = doc(1024, "response length cap; a response cut there without EOS gets EOS forced last")
    temperature: float = doc(1.0, "sampling temperature, > 0 (also used for every policy log-prob)")
    top_p: float = doc(1.0, "nucleus sampling, in (0, 1] (1: off)")
    top_k: int = doc(0, "top-k sampling (0: off)")
    stop_tokens: list[str] = doc(factory=list, text=STOP_TOKENS_DOC)
    micro_batch_size: int = doc(32, "prompts per generate call on one rank")
    kv_cache: str = doc("dynamic", "built-in engine KV cache: dynamic (grows per step) or static (preallocated)")
    compile_decode: bool = doc(
        False, "built-in engine: torch.compile the decode step (needs kv_cache=static; CUDA graphs on GPU)"
    )
    vllm_gpu_memory_utilization: float = doc(0.4, "share of GPU memory vLLM may take (colocated with training)")
    vllm_bucket_mb: int = doc(512, "size of the buckets weights are streamed to vLLM in (MiB)")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.choice("engine", ("hf", "vllm"))
        k.choice("kv_cache", ("dynamic", "static"))
        k.ints("prompts_per_step", "samples_per_prompt", "max_new_tokens", "micro_batch_size", "vllm_bucket_mb")
        k.ints("top_k", low=0)
        # training samples: every log-prob is taken at this temperature, so 0 (greedy) has no policy to score
        k.real("temperature", above=0)
        k.real("top_p", above=0, at_most=1)
        k.real("vllm_gpu_memory_utilization", above=0, at_most=1)
        k.texts("stop_tokens")
        if self.compile_decode and self.kv_cache != "static":
            raise ConfigError(
                f"{at}compile_decode=true needs {at}kv_cache=static (a growing cache would recompile the "
                "decode step at every length)"
            )


@dataclass
class RewardConfig(Section):
    kl_coef: float = doc(0.01, "weight of the per-token KL penalty (fixed controller)")
    kl_estimator: str = doc("k1", "KL estimator on logp - ref_logp: k1, k2 or k3")
    dpo_scale: float = doc(0.05, "scale of the DPO token reward dpo_scale * (logp_dpo - logp_ref)")
    dpo_clip: float | None = doc(0.05, "clip of the DPO token reward, > 0 (null: none)")
    dpo_support: float | None = doc(
        None, "support-aware DPO term: no DPO token reward where the reference's token probability is below this"
    )
    score_mean: float | None = doc(None, "reward-model score normalisation (score - mean) / std (null: none)")
    score_std: float | None = doc(None, "see score_mean")
    score_clip: float | None = doc(10.0, "clip of the (normalised) score, > 0 (null: none)")
    gamma: float = doc(1.0, "discount")
    lam: float = doc(0.95, "GAE lambda")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.choice("kl_estimator", KL_ESTIMATORS)
        k.real("kl_coef", "dpo_scale", at_least=0)
        k.real("score_mean", optional=True)
        k.real("dpo_clip", "score_std", "score_clip", above=0, optional=True)
        k.real("dpo_support", above=0, below=1, optional=True)
        if (self.score_mean is None) != (self.score_std is None):
            raise ConfigError(f"{at}score_mean and {at}score_std go together: set both or neither")
        k.real("gamma", "lam", at_least=0, at_most=1)


@dataclass
class PPOTrainConfig(Section):
    steps: int = doc(100, "rollout steps (each: generate, score, advantages, update, sync)")
    ppo_epochs: int = doc(1, "passes over each rollout batch")
    train_batch_size: int = doc(128, "sequences per optimizer step, over all ranks")
    micro_batch_size: int = doc(8, "sequences per forward on one rank (scoring and update)")
    micro_token_budget: int | None = doc(None, "cap on tokens per micro-batch (cuts micro-batches further)")
    packing: bool = doc(
        False,
        "padding-free forwards in scoring and update (sequences end to end; varlen "
        "attention with flash_attention_2, a block-diagonal mask with sdpa/eager)",
    )
    clip_eps: float = doc(0.2, "PPO ratio clip, > 0")
    value_clip: float = doc(0.2, "value clip around the rollout's values, > 0")
    entropy_coef: float = doc(0.0, "entropy bonus weight (0: off)")
    whiten_advantages: bool = doc(True, "normalise advantages by their masked mean and std over all ranks")
    seed: int = doc(0, "seed for prompt order, sampling and initialisation")
    log_every: int = doc(1, "log metrics every N steps")
    save_every: int = doc(0, "checkpoint every N steps (0: at the end only)")
    max_nonfinite: int = doc(3, "steps in a row whose update was skipped for NaN/inf before the run stops")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.ints("steps", "ppo_epochs", "train_batch_size", "micro_batch_size", "log_every", "max_nonfinite")
        k.ints("micro_token_budget", optional=True)
        k.ints("save_every", low=0)
        k.seeds("seed")
        k.real("clip_eps", "value_clip", above=0)
        k.real("entropy_coef", at_least=0)


@dataclass
class PPOConfig(Section):
    algo: str = doc("rto", "ppo (KL + score), rto (+ DPO token reward), rs-ppo or ddpo (the paper's ablations)")
    estimator: str = doc("gae", "gae (critic) or reinforce++ (discounted returns, no critic)")
    actor: ModelConfig = doc(factory=ModelConfig, text="the policy (its path is the SFT model)")
    ref: str | None = doc(None, "reference model; default: actor.path (the SFT model)")
    dpo: str | None = doc(None, "DPO model (trained with ref = the SFT model); needed by rto, rs-ppo and ddpo")
    reward: str = doc(MISSING, "reward model (token-classification checkpoint with one label)")
    critic: str | None = doc(None, "critic initialisation; default: the reward model")
    data: PromptDataConfig = doc(factory=PromptDataConfig, text="prompts (messages or prompt column)")
    rollout: RolloutConfig = doc(factory=RolloutConfig, text="generation")
    rewards: RewardConfig = doc(factory=RewardConfig, text="token rewards and GAE")
    actor_optim: OptimConfig = doc(factory=lambda: OptimConfig(lr=5e-7), text="actor optimizer and schedule")
    critic_optim: OptimConfig = doc(factory=lambda: OptimConfig(lr=9e-6), text="critic optimizer and schedule")
    train: PPOTrainConfig = doc(factory=PPOTrainConfig, text="steps and batches")
    parallel: ParallelConfig = doc(factory=ParallelConfig, text="FSDP2 options")
    run: RunConfig = doc(factory=RunConfig, text="outputs, logging, resume")

    def critic_source(self) -> tuple[str, str] | None:
        """(the setting, the path) the critic starts from: `critic`, else the reward model; None without a critic
        (reinforce++)."""
        if self.estimator != "gae":
            return None
        return ("critic", self.critic) if self.critic else ("reward", self.reward)

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.choice("algo", SHAPINGS)  # the kernels' reward shapings are the algorithms
        k.choice("estimator", ("gae", "reinforce++"))
        k.text("reward")
        k.text("ref", "dpo", "critic", optional=True)

    def check_across(self, world_size: int) -> None:
        r, t = self.rollout, self.train
        if self.algo != "ppo" and self.dpo is None:
            raise ConfigError(f"algo={self.algo} needs the DPO model: set dpo=<path> (or use algo=ppo)")
        if r.prompts_per_step % world_size:
            raise ConfigError(
                f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of ranks ({world_size})"
            )
        rollout = r.prompts_per_step * r.samples_per_prompt
        if rollout % t.train_batch_size:
            raise ConfigError(
                f"train.train_batch_size ({t.train_batch_size}) must divide the rollout batch "
                f"(rollout.prompts_per_step x samples_per_prompt = {rollout})"
            )
        if t.train_batch_size % (t.micro_batch_size * world_size):
            raise ConfigError(
                f"train.train_batch_size ({t.train_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x ranks ({world_size})"
            )
