"""Typed run configuration: dataclasses, YAML recipes, dotted command-line overrides, one validation pass.

A command's config is built as: the dataclass defaults, then the recipe's section for that command
(`rto/recipes/<name>.yaml`, or any YAML path), then `key=value` overrides. OmegaConf checks names and types
(an unknown key or a value of the wrong type is an error naming the key), and `validate` checks the
combinations, all before any model or dataset is loaded. Nothing is rewritten after that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A bad key, value or combination in the configuration."""


def doc(default: Any = MISSING, text: str = "", factory: Any = None) -> Any:
    """A dataclass field with a one-line description (shown by `rto <cmd> --help-config`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    path: str = doc(MISSING, "hub id or local folder of the model to train (or to initialise a reward model from)")
    tokenizer: str | None = doc(None, "hub id or folder of the tokenizer; default: model.path")
    dtype: str = doc("float32", "parameter dtype: float32 or bfloat16 (bf16 mixed precision is parallel.*)")
    attn_implementation: str = doc("sdpa", "attention backend: sdpa, eager or flash_attention_2")
    chat_template: str | None = doc(None, "Jinja chat template to use when the tokenizer has none")
    pad_token: str | None = doc(None, "token to pad with when the tokenizer has no pad token (e.g. its EOS token)")


@dataclass
class DataConfig:
    path: str = doc(MISSING, "hub id, local .json/.jsonl/.parquet file, or folder of such files")
    split: str = doc("train", "split to train on")
    eval_path: str | None = doc(None, "held-out set (same forms as path); default: eval_split of path")
    eval_split: str | None = doc(None, "held-out split of path; with neither, eval_fraction of train is held out")
    eval_fraction: float = doc(0.05, "share of the training rows held out when no eval set is given (0: no eval)")
    messages_key: str = doc("messages", "column of SFT conversations (lists of {role, content})")
    prompt_key: str = doc("prompt", "column of prompts (a string or a list of messages)")
    chosen_key: str = doc("chosen", "column of preferred responses (messages; may repeat the prompt turns)")
    rejected_key: str = doc("rejected", "column of dispreferred responses")
    max_length: int = doc(1024, "most tokens in prompt + response; longer responses are cut and counted")
    max_prompt_length: int = doc(512, "most prompt tokens; longer prompts follow `overlong`")
    overlong: str = doc("error", "prompts over max_prompt_length: error, truncate (keep the end) or drop")
    bad_rows: str = doc("error", "malformed rows: error (naming row and field) or skip (counted and logged)")
    packing: bool = doc(
        False,
        "padding-free batches (varlen attention with flash_attention_2; sdpa/eager get a "
        "block-diagonal causal mask, [tokens, tokens] per micro-batch)",
    )
    max_rows: int | None = doc(None, "use only the first max_rows rows of the training set")


@dataclass
class OptimConfig:
    lr: float = doc(1e-5, "peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: list[float] = doc(factory=lambda: [0.9, 0.95], text="AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_ratio: float = doc(0.03, "share of the steps with linear warm-up")
    min_lr_ratio: float = doc(0.1, "cosine decay ends at this share of lr")
    grad_clip: float = doc(1.0, "gradient-norm clip (0: none)")


@dataclass
class TrainConfig:
    epochs: int = doc(1, "passes over the training set")
    max_steps: int | None = doc(None, "stop after this many optimizer steps (default: epochs)")
    global_batch_size: int = doc(128, "sequences (pairs for rm/dpo) per optimizer step, over all ranks")
    micro_batch_size: int = doc(8, "sequences (pairs) per forward on one rank; gradients accumulate over them")
    seed: int = doc(0, "seed for shuffling, initialisation and sampling")
    eval_every: int = doc(0, "evaluate every N steps (0: at the end only)")
    save_every: int = doc(0, "checkpoint every N steps (0: at the end only)")
    log_every: int = doc(1, "log metrics every N steps")
    max_nonfinite: int = doc(3, "updates in a row skipped for NaN/inf before the run stops")


@dataclass
class ParallelConfig:
    mixed_precision: str = doc("auto", "bf16 compute with fp32 reduction: auto (on CUDA only), bf16 or off")
    activation_checkpointing: bool = doc(False, "recompute decoder-layer activations in backward")
    cpu_offload: bool = doc(False, "keep sharded parameters and gradients in CPU memory (FSDP2 offload)")
    timeout_s: float = doc(1800.0, "seconds a collective may wait for the other ranks before the run stops")


@dataclass
class RunConfig:
    name: str = doc("run", "run name: outputs go to output_dir/name")
    output_dir: str = doc("runs", "parent folder of runs")
    resume: str | None = doc(None, "auto (latest checkpoint of this run, if any) or a checkpoint folder")
    keep_last: int = doc(2, "checkpoints kept (older ones are deleted)")
    tensorboard: bool = doc(True, "write tensorboard events (when tensorboard is installed)")
    wandb: bool = doc(False, "log to Weights & Biases (must be installed)")
    progress: bool = doc(True, "show a progress bar")


@dataclass
class OfflineConfig:
    model: ModelConfig = doc(factory=ModelConfig, text="the trained model")
    data: DataConfig = doc(factory=DataConfig, text="the dataset")
    optim: OptimConfig = doc(factory=OptimConfig, text="optimizer and schedule")
    train: TrainConfig = doc(factory=TrainConfig, text="steps and batches")
    parallel: ParallelConfig = doc(factory=ParallelConfig, text="FSDP2 options")
    run: RunConfig = doc(factory=RunConfig, text="outputs, logging, resume")


@dataclass
class SFTConfig(OfflineConfig):
    pass


@dataclass
class RMConfig(OfflineConfig):
    pass


DPO_LOSSES = ("dpo", "ipo", "rdpo", "simpo", "tdpo")


@dataclass
class DPOConfig(OfflineConfig):
    loss: str = doc("dpo", "dpo, ipo, rdpo, simpo or tdpo")
    ref: str | None = doc(None, "reference model (hub id or folder); default: model.path; unused by simpo")
    beta: float = doc(0.1, "beta of DPO, IPO, R-DPO, TDPO (SimPO's default is 2.5: set it)")
    rdpo_alpha: float = doc(0.001, "R-DPO length coefficient")
    simpo_gamma_beta_ratio: float = doc(
        0.5, "SimPO margin as a share of beta (gamma = ratio * beta); the paper's 0.5 may mean gamma or gamma/beta"
    )
    tdpo_alpha: float = doc(0.2, "TDPO2 weight of the sequential KL term")
    tdpo_chunk: int = doc(256, "positions per chunk when TDPO computes full-vocabulary KLs")


ALGOS = ("ppo", "rto", "rs-ppo", "ddpo")


@dataclass
class RolloutConfig:
    engine: str = doc("hf", "hf (built in: the actor generates) or vllm (colocated vLLM engine, GPU only)")
    prompts_per_step: int = doc(1024, "prompts per rollout step, over all ranks")
    samples_per_prompt: int = doc(1, "responses sampled for each prompt")
    max_new_tokens: int = doc(1024, "response length cap; a response cut there without EOS gets EOS forced last")
    temperature: float = doc(1.0, "sampling temperature (also used for every policy log-prob)")
    top_p: float = doc(1.0, "nucleus sampling (1: off)")
    top_k: int = doc(0, "top-k sampling (0: off)")
    micro_batch_size: int = doc(32, "prompts per generate call on one rank")
    kv_cache: str = doc("dynamic", "built-in engine KV cache: dynamic (grows per step) or static (preallocated)")
    compile_decode: bool = doc(
        False, "built-in engine: torch.compile the decode step (needs kv_cache=static; CUDA graphs on GPU)"
    )
    vllm_gpu_memory_utilization: float = doc(0.4, "share of GPU memory vLLM may take (colocated with training)")
    vllm_bucket_mb: int = doc(512, "size of the buckets weights are streamed to vLLM in (MiB)")


@dataclass
class RewardConfig:
    kl_coef: float = doc(0.01, "weight of the per-token KL penalty (fixed controller)")
    kl_estimator: str = doc("k1", "KL estimator on logp - ref_logp: k1, k2 or k3")
    dpo_scale: float = doc(0.05, "scale of the DPO token reward dpo_scale * (logp_dpo - logp_ref)")
    dpo_clip: float | None = doc(0.05, "clip of the DPO token reward (null: none)")
    score_mean: float | None = doc(None, "reward-model score normalisation (score - mean) / std (null: none)")
    score_std: float | None = doc(None, "see score_mean")
    score_clip: float | None = doc(10.0, "clip of the (normalised) score (null: none)")
    gamma: float = doc(1.0, "discount")
    lam: float = doc(0.95, "GAE lambda")


@dataclass
class PPOTrainConfig:
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
    clip_eps: float = doc(0.2, "PPO ratio clip")
    value_clip: float = doc(0.2, "value clip around the rollout's values")
    entropy_coef: float = doc(0.0, "entropy bonus weight (0: off)")
    whiten_advantages: bool = doc(True, "normalise advantages by their masked mean and std over all ranks")
    seed: int = doc(0, "seed for prompt order, sampling and initialisation")
    log_every: int = doc(1, "log metrics every N steps")
    save_every: int = doc(0, "checkpoint every N steps (0: at the end only)")
    max_nonfinite: int = doc(3, "steps in a row whose update was skipped for NaN/inf before the run stops")


@dataclass
class PPOConfig:
    algo: str = doc("rto", "ppo (KL + score), rto (+ DPO token reward), rs-ppo or ddpo (the paper's ablations)")
    estimator: str = doc("gae", "gae (critic) or reinforce++ (discounted returns, no critic)")
    actor: ModelConfig = doc(factory=ModelConfig, text="the policy (its path is the SFT model)")
    ref: str | None = doc(None, "reference model; default: actor.path (the SFT model)")
    dpo: str | None = doc(None, "DPO model (trained with ref = the SFT model); needed by rto, rs-ppo and ddpo")
    reward: str = doc(MISSING, "reward model (token-classification checkpoint with one label)")
    critic: str | None = doc(None, "critic initialisation; default: the reward model")
    data: DataConfig = doc(factory=DataConfig, text="prompts (messages or prompt column)")
    rollout: RolloutConfig = doc(factory=RolloutConfig, text="generation")
    rewards: RewardConfig = doc(factory=RewardConfig, text="token rewards and GAE")
    actor_optim: OptimConfig = doc(factory=lambda: OptimConfig(lr=5e-7), text="actor optimizer and schedule")
    critic_optim: OptimConfig = doc(factory=lambda: OptimConfig(lr=9e-6), text="critic optimizer and schedule")
    train: PPOTrainConfig = doc(factory=PPOTrainConfig, text="steps and batches")
    parallel: ParallelConfig = doc(factory=ParallelConfig, text="FSDP2 options")
    run: RunConfig = doc(factory=RunConfig, text="outputs, logging, resume")


@dataclass
class EvalConfig:
    model: str = doc(MISSING, "the model to evaluate (hub id or folder)")
    reference: str | None = doc(None, "model to compare against (win rate), e.g. the SFT model")
    reward: str | None = doc(None, "reward model to score responses with")
    gold: bool = doc(False, "also score with the toy world's gold reward (toy prompts only)")
    pad_token: str | None = doc(None, "token to pad with when the tokenizer has none")
    data: DataConfig = doc(factory=DataConfig, text="prompts (messages or prompt column)")
    temperature: float = doc(0.7, "0.7: AlpacaEval's setting; 0: greedy, Arena-Hard's")
    top_p: float = doc(1.0, "nucleus sampling")
    max_new_tokens: int = doc(512, "response length cap")
    seed: int = doc(0, "sampling seed")
    output_dir: str = doc("runs", "parent folder")
    name: str = doc("eval", "outputs go to output_dir/name")


@dataclass
class InspectConfig:
    model: str = doc(MISSING, "policy whose responses are shown (hub id or folder)")
    ref: str = doc(MISSING, "reference (SFT) model")
    dpo: str = doc(MISSING, "DPO model whose token reward colours the tokens")
    data: DataConfig = doc(factory=DataConfig, text="prompts (messages or prompt column)")
    n: int = doc(8, "responses to render")
    temperature: float = doc(0.7, "sampling temperature (0: greedy)")
    max_new_tokens: int = doc(64, "response length cap")
    dpo_scale: float = doc(0.05, "scale of the DPO token reward")
    dpo_clip: float | None = doc(None, "clip of the DPO token reward (null: show it unclipped)")
    seed: int = doc(0, "sampling seed")
    output_dir: str = doc("runs", "parent folder")
    name: str = doc("inspect", "outputs go to output_dir/name")


@dataclass
class ToyWorldConfig:
    n_sft: int = doc(4000, "SFT conversations")
    n_pairs: int = doc(3000, "preference pairs (a tenth held out)")
    n_prompts: int = doc(2048, "RL prompts")
    n_eval: int = doc(128, "held-out evaluation prompts")
    bt_beta: float = doc(1.0, "Bradley-Terry temperature of the gold labels")
    hidden: int = doc(64, "hidden size of the toy Llama")
    layers: int = doc(2, "decoder layers of the toy Llama")


@dataclass
class PipelineConfig:
    name: str = doc("toy", "outputs go to output_dir/name (one folder per stage inside)")
    output_dir: str = doc("runs", "parent folder")
    seed: int = doc(0, "seed of the world and of every stage")
    world: ToyWorldConfig = doc(factory=ToyWorldConfig, text="the toy world's sizes")
    baselines: list[str] = doc(factory=lambda: ["dpo", "rdpo", "simpo", "tdpo"], text="offline methods to train")
    online: list[str] = doc(factory=lambda: ["ppo", "rto"], text="online algos to train from the SFT model")
    loss_overrides: dict[str, list[str]] = doc(factory=dict, text="extra dpo settings per loss, e.g. simpo: [beta=2.5]")
    quick: bool = doc(False, "a short run: a few dozen steps per stage (rto/pipeline.py: QUICK)")
    eval_temperature: float = doc(0.7, "sampling temperature of the evaluation")
    eval_max_new_tokens: int = doc(24, "response cap of the evaluation")


COMMANDS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig,
                             "eval": EvalConfig, "inspect": InspectConfig, "pipeline": PipelineConfig}  # fmt: skip


def recipe_path(recipe: str) -> Path:
    """A recipe name (a file in rto/recipes) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p
    p = RECIPES / f"{recipe}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES.glob("*.yaml")))
        raise ConfigError(f"unknown recipe {recipe!r}: known recipes are {known}, or give a path to a .yaml file")
    return p


def load_config(command: str, recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults <- recipe section `command` <- `key=value` overrides, type-checked and validated."""
    schema = COMMANDS[command]
    try:
        cfg = OmegaConf.structured(schema)
        if recipe is not None:
            path = recipe_path(recipe)
            sections = OmegaConf.load(path)
            if command not in sections:
                raise ConfigError(f"recipe {path} has no '{command}:' section (it has: {', '.join(sections)})")
            cfg = OmegaConf.merge(cfg, sections[command])
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"required settings are missing: {', '.join(missing)} (set them as key=value)")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + _key_hint(e)) from None
    validate(obj)
    return obj


def _key_hint(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    return f" (key: {key})" if key else ""


def validate(cfg: Any, world_size: int = 1) -> None:
    """Combinations that cannot run. Raises ConfigError naming the settings; rewrites nothing."""
    if isinstance(cfg, PPOConfig):
        return validate_ppo(cfg, world_size)
    if isinstance(cfg, (EvalConfig, InspectConfig, PipelineConfig)):
        return validate_tools(cfg)
    t, d, o = cfg.train, cfg.data, cfg.optim
    _one_of("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
    _one_of("model.attn_implementation", cfg.model.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
    _one_of("data.overlong", d.overlong, ("error", "truncate", "drop"))
    _one_of("data.bad_rows", d.bad_rows, ("error", "skip"))
    _one_of("parallel.mixed_precision", cfg.parallel.mixed_precision, ("auto", "bf16", "off"))
    for key, value in (("train.global_batch_size", t.global_batch_size), ("train.micro_batch_size", t.micro_batch_size),
                       ("train.epochs", t.epochs), ("data.max_length", d.max_length),
                       ("data.max_prompt_length", d.max_prompt_length), ("train.log_every", t.log_every),
                       ("run.keep_last", cfg.run.keep_last)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1 (or unset), got {t.max_steps}")
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(f"data.max_prompt_length ({d.max_prompt_length}) must be below data.max_length "
                          f"({d.max_length}): no room is left for the response")  # fmt: skip
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x ranks ({world_size}) = {per_step}"
        )
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if not 0 <= o.warmup_ratio < 1 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.warmup_ratio must be in [0, 1) and optim.min_lr_ratio in [0, 1]")
    if isinstance(cfg, DPOConfig):
        _one_of("loss", cfg.loss, DPO_LOSSES)
        if cfg.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {cfg.beta}")
        if cfg.tdpo_chunk < 1:
            raise ConfigError(f"tdpo_chunk must be at least 1, got {cfg.tdpo_chunk}")


def validate_tools(cfg: Any) -> None:
    if isinstance(cfg, PipelineConfig):
        bad = [b for b in cfg.baselines if b not in DPO_LOSSES] + [a for a in cfg.online if a not in ALGOS]
        if bad:
            raise ConfigError(f"pipeline: unknown methods {bad}: baselines come from {', '.join(DPO_LOSSES)}, online "
                              f"from {', '.join(ALGOS)}")  # fmt: skip
        unknown = sorted(set(cfg.loss_overrides) - set(DPO_LOSSES))
        if unknown:
            raise ConfigError(f"loss_overrides: unknown losses {unknown}")
        return
    if cfg.temperature < 0 or cfg.max_new_tokens < 1:
        raise ConfigError("temperature must be >= 0 and max_new_tokens at least 1")
    if isinstance(cfg, InspectConfig) and cfg.n < 1:
        raise ConfigError(f"n must be at least 1, got {cfg.n}")


def validate_ppo(cfg: PPOConfig, world_size: int) -> None:
    r, t, w = cfg.rollout, cfg.train, cfg.rewards
    _one_of("algo", cfg.algo, ALGOS)
    _one_of("estimator", cfg.estimator, ("gae", "reinforce++"))
    _one_of("rollout.engine", r.engine, ("hf", "vllm"))
    _one_of("rollout.kv_cache", r.kv_cache, ("dynamic", "static"))
    if r.compile_decode and r.kv_cache != "static":
        raise ConfigError("rollout.compile_decode=true needs rollout.kv_cache=static (a growing cache would "
                          "recompile the decode step at every length)")  # fmt: skip
    _one_of("rewards.kl_estimator", w.kl_estimator, ("k1", "k2", "k3"))
    _one_of("actor.dtype", cfg.actor.dtype, ("float32", "bfloat16"))
    _one_of("data.overlong", cfg.data.overlong, ("error", "truncate", "drop"))
    _one_of("data.bad_rows", cfg.data.bad_rows, ("error", "skip"))
    _one_of("parallel.mixed_precision", cfg.parallel.mixed_precision, ("auto", "bf16", "off"))
    if cfg.algo != "ppo" and cfg.dpo is None:
        raise ConfigError(f"algo={cfg.algo} needs the DPO model: set dpo=<path> (or use algo=ppo)")
    for key, value in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.samples_per_prompt",
                       r.samples_per_prompt), ("rollout.max_new_tokens", r.max_new_tokens),
                       ("rollout.micro_batch_size", r.micro_batch_size), ("train.steps", t.steps),
                       ("train.ppo_epochs", t.ppo_epochs), ("train.train_batch_size", t.train_batch_size),
                       ("train.micro_batch_size", t.micro_batch_size), ("train.log_every", t.log_every),
                       ("run.keep_last", cfg.run.keep_last)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if r.prompts_per_step % world_size:
        raise ConfigError(f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of ranks ({world_size})")
    rollout = r.prompts_per_step * r.samples_per_prompt
    if rollout % t.train_batch_size:
        raise ConfigError(f"train.train_batch_size ({t.train_batch_size}) must divide the rollout batch "
                          f"(rollout.prompts_per_step x samples_per_prompt = {rollout})")  # fmt: skip
    if t.train_batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(f"train.train_batch_size ({t.train_batch_size}) must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}) x ranks ({world_size})")  # fmt: skip
    if not r.temperature > 0 or not 0 < r.top_p <= 1 or r.top_k < 0:
        raise ConfigError("rollout.temperature must be > 0, rollout.top_p in (0, 1], rollout.top_k >= 0")
    if (w.score_mean is None) != (w.score_std is None) or (w.score_std is not None and w.score_std <= 0):
        raise ConfigError("rewards.score_mean and rewards.score_std go together, with score_std > 0")
    if not (0 <= w.gamma <= 1 and 0 <= w.lam <= 1):
        raise ConfigError(f"rewards.gamma and rewards.lam must be in [0, 1], got {w.gamma} and {w.lam}")
    if cfg.data.max_prompt_length < 1:
        raise ConfigError("data.max_prompt_length must be at least 1")
    for name, o in (("actor_optim", cfg.actor_optim), ("critic_optim", cfg.critic_optim)):
        if o.lr <= 0:
            raise ConfigError(f"{name}.lr must be > 0, got {o.lr}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def describe(schema: type, prefix: str = "") -> list[str]:
    """One line per setting: dotted key, default, description."""
    lines = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        has_factory = f.default_factory is not dataclasses.MISSING
        if has_factory and dataclasses.is_dataclass(f.default_factory):
            lines += describe(f.default_factory, key + ".")
            continue
        default = f.default_factory() if has_factory else f.default
        shown = "(required)" if default == MISSING else repr(default)
        lines.append(f"{key} = {shown}  # {f.metadata.get('doc', '')}")
    return lines


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
