"""The sections every training command shares (model, data, optimizer, steps, FSDP2, outputs) and the configs of
the offline commands: sft, rm and dpo (`OfflineConfig` and its subclasses). The data section of the commands that
read prompts (ppo, eval, inspect) is `PromptDataConfig`; sft, rm and dpo's `DataConfig` adds the held-out set."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from omegaconf import MISSING

from rto.config.base import ConfigError, Keys, Section, doc

DPO_LOSSES = ("dpo", "ipo", "rdpo", "simpo", "tdpo")
WANDB_MISSING = "{at}wandb=true but wandb is not installed (pip install wandb)"


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module set to None in sys.modules
        return False


@dataclass
class ModelConfig(Section):
    path: str = doc(MISSING, "hub id or local folder of the model to train (or to initialise a reward model from)")
    tokenizer: str | None = doc(None, "hub id or folder of the tokenizer; default: model.path")
    dtype: str = doc("float32", "parameter dtype: float32 or bfloat16 (bf16 mixed precision is parallel.*)")
    attn_implementation: str = doc("sdpa", "attention backend: sdpa, eager or flash_attention_2")
    chat_template: str | None = doc(None, "Jinja chat template to use when the tokenizer has none")
    pad_token: str | None = doc(None, "token to pad with when the tokenizer has no pad token (e.g. its EOS token)")
    revision: str | None = doc(
        None,
        "hub branch, tag or commit of path, for every load of path (weights, config; the tokenizer unless tokenizer "
        "is set; a ref left to default); other models load their default branch; refused for a local folder",
    )
    trust_remote_code: bool = doc(
        False,
        "run the Python code a hub model ships (custom architectures or tokenizers) for every model and tokenizer "
        "the command loads (ppo: ref, dpo, reward and critic too)",
    )

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.text("path")
        k.text("tokenizer", "chat_template", "pad_token", "revision", optional=True)
        k.choice("dtype", ("float32", "bfloat16"))
        k.choice("attn_implementation", ("sdpa", "eager", "flash_attention_2"))


@dataclass
class PromptDataConfig(Section):
    """The data section of the commands that read prompts (ppo, eval, inspect): no held-out set of its own."""

    path: str = doc(MISSING, "hub id, local .json/.jsonl/.parquet file, or folder of such files")
    split: str = doc("train", "split to train on (eval, inspect: to read the prompts from)")
    subset: str | None = doc(
        None,
        "the dataset's config name (datasets.load_dataset's name=, e.g. default or a named config) for a hub id or "
        "a folder of data files; refused for a single file or a saved dataset (default: the dataset's only one)",
    )
    messages_key: str = doc("messages", "column of SFT conversations (lists of {role, content})")
    prompt_key: str = doc("prompt", "column of prompts (a string or a list of messages)")
    chosen_key: str = doc("chosen", "column of preferred responses (messages; may repeat the prompt turns)")
    rejected_key: str = doc("rejected", "column of dispreferred responses")
    max_length: int = doc(1024, "most tokens in prompt + response; longer responses are cut and counted")
    max_prompt_length: int = doc(512, "most prompt tokens (below max_length); longer prompts follow `overlong`")
    overlong: str = doc("error", "prompts over max_prompt_length: error, truncate (keep the end) or drop")
    bad_rows: str = doc("error", "malformed rows: error (naming row and field) or skip (counted and logged)")
    packing: bool = doc(
        False,
        "padding-free batches (varlen attention with flash_attention_2; sdpa/eager get a "
        "block-diagonal causal mask, [tokens, tokens] per micro-batch)",
    )
    max_rows: int | None = doc(None, "use only the first max_rows rows of the training set")
    format: str = doc("auto", "conversation fields: auto (per value), messages, sharegpt, hh or plain (rto/formats.py)")
    assistant_turns: str = doc("all", "SFT: the loss on every assistant turn (all) or on the last one only (last)")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.text("path", "split", "messages_key", "prompt_key", "chosen_key", "rejected_key")
        k.text("subset", optional=True)
        k.ints("max_length", "max_prompt_length")
        k.ints("max_rows", optional=True)
        k.choice("overlong", ("error", "truncate", "drop"))
        k.choice("bad_rows", ("error", "skip"))
        k.choice("assistant_turns", ("all", "last"))
        from rto.formats import FORMATS  # here, not at the top: rto.formats imports this module

        k.choice("format", FORMATS)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"{at}max_prompt_length ({self.max_prompt_length}) must be below {at}max_length "
                f"({self.max_length}): no room is left for the response"
            )


@dataclass
class DataConfig(PromptDataConfig):
    """The data section of sft, rm and dpo: the training set and its held-out set."""

    eval_path: str | None = doc(
        None, "held-out set (same forms as path; subset applies only if it is path); default: eval_split of path"
    )
    eval_split: str | None = doc(None, "held-out split of path; with neither, eval_fraction of train is held out")
    eval_fraction: float = doc(0.05, "share of the training rows held out when no eval set is given (0: no eval)")

    def check(self, at: str) -> None:
        super().check(at)
        k = Keys(self, at)
        k.text("eval_path", "eval_split", optional=True)
        k.real("eval_fraction", at_least=0, below=1)


@dataclass
class OptimConfig(Section):
    lr: float = doc(1e-5, "peak learning rate (at most 1)")
    weight_decay: float = doc(0.0, "AdamW weight decay (decoupled: each step scales the weights by 1 - lr * it)")
    betas: list[float] = doc(factory=lambda: [0.9, 0.95], text="AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_ratio: float = doc(0.03, "share of the steps with linear warm-up")
    min_lr_ratio: float = doc(0.1, "cosine decay ends at this share of lr")
    grad_clip: float = doc(1.0, "gradient-norm clip (0: none)")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.real("lr", above=0)
        if self.lr > 1:  # no model trains at such a step: it is a typo, and it would poison the weights
            k.fail("lr", "at most 1 (a peak learning rate; AdamW steps each weight by about lr)")
        k.real("weight_decay", "grad_clip", at_least=0)
        if self.lr * self.weight_decay >= 1:
            k.fail("weight_decay", f"below 1 / {at}lr = {1 / self.lr:g} (each step scales weights by 1 - lr * wd)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):  # NaN fails the comparison
            k.fail("betas", "two numbers in [0, 1)")
        k.real("eps", above=0)
        k.real("warmup_ratio", at_least=0, below=1)
        k.real("min_lr_ratio", at_least=0, at_most=1)


@dataclass
class TrainConfig(Section):
    epochs: int = doc(1, "passes over the training set")
    max_steps: int | None = doc(None, "stop after this many optimizer steps (default: epochs)")
    global_batch_size: int = doc(128, "sequences (pairs for rm/dpo) per optimizer step, over all ranks")
    micro_batch_size: int = doc(8, "sequences (pairs) per forward on one rank; gradients accumulate over them")
    seed: int = doc(0, "seed for shuffling, initialisation and sampling")
    eval_every: int = doc(0, "evaluate every N steps (0: at the end only)")
    save_every: int = doc(0, "checkpoint every N steps (0: at the end only)")
    log_every: int = doc(1, "log metrics every N steps")
    max_nonfinite: int = doc(3, "updates in a row skipped for NaN/inf before the run stops")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.ints("epochs", "global_batch_size", "micro_batch_size", "log_every", "max_nonfinite")
        k.ints("max_steps", optional=True)
        k.ints("eval_every", "save_every", low=0)
        k.seeds("seed")


@dataclass
class ParallelConfig(Section):
    mixed_precision: str = doc("auto", "bf16 compute with fp32 reduction: auto (on CUDA only), bf16 or off")
    activation_checkpointing: bool = doc(False, "recompute decoder-layer activations in backward")
    cpu_offload: bool = doc(False, "keep sharded parameters and gradients in CPU memory (FSDP2 offload)")
    timeout_s: float = doc(1800.0, "seconds a collective may wait for the other ranks before the run stops")
    single_rank_fsdp: bool = doc(
        False,
        "shard with FSDP2 on one rank too (default: one rank trains the plain model, without FSDP2's copies; "
        "cpu_offload, and bf16 on CPU, need this there)",
    )

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.choice("mixed_precision", ("auto", "bf16", "off"))
        k.real("timeout_s", above=0)


@dataclass
class RunConfig(Section):
    name: str = doc("run", "run name: outputs go to output_dir/name")
    output_dir: str = doc("runs", "parent folder of runs")
    resume: str | None = doc(None, "auto (latest checkpoint of this run, if any) or a checkpoint folder")
    overwrite: bool = doc(
        False,
        "start fresh in a run folder that holds another run's checkpoints, deleting them; without it such a "
        "start is refused",
    )
    keep_last: int = doc(2, "checkpoints kept (older ones are deleted)")
    tensorboard: bool = doc(
        True, "write tensorboard events (when tensorboard is installed), the run's config.yaml as the text 'config'"
    )
    wandb: bool = doc(False, "log to Weights & Biases (must be installed), the run's config as its config")
    wandb_project: str = doc("rto", "wandb project of the run")
    wandb_entity: str | None = doc(None, "wandb entity (user or team); default: wandb's own default entity")
    wandb_group: str | None = doc(None, "wandb group (e.g. the runs of one pipeline or sweep); default: none")
    progress: bool = doc(True, "show a progress bar")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.text("name", "output_dir")
        if self.name in (".", ".."):  # the run folder would be output_dir itself or its parent
            k.fail("name", "a folder name inside output_dir")
        k.text("resume", optional=True)
        k.text("wandb_project")
        k.text("wandb_entity", "wandb_group", optional=True)
        k.ints("keep_last")
        if self.wandb and not installed("wandb"):  # refused here: before any model loads, on every rank
            raise ConfigError(WANDB_MISSING.format(at=at))
        if self.overwrite and self.resume is not None:
            raise ConfigError(f"{at}overwrite=true starts fresh but {at}resume={self.resume} continues: set one")


@dataclass
class OfflineConfig(Section):
    model: ModelConfig = doc(factory=ModelConfig, text="the trained model")
    data: DataConfig = doc(factory=DataConfig, text="the dataset")
    optim: OptimConfig = doc(factory=OptimConfig, text="optimizer and schedule")
    train: TrainConfig = doc(factory=TrainConfig, text="steps and batches")
    parallel: ParallelConfig = doc(factory=ParallelConfig, text="FSDP2 options")
    run: RunConfig = doc(factory=RunConfig, text="outputs, logging, resume")

    def check(self, at: str) -> None:
        pass  # no settings of its own: its sections check themselves

    def check_across(self, world_size: int) -> None:
        t = self.train
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x ranks ({world_size}) = {per_step}"
            )


@dataclass
class SFTConfig(OfflineConfig):
    pass


@dataclass
class RMConfig(OfflineConfig):
    pass


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

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.choice("loss", DPO_LOSSES)
        k.text("ref", optional=True)
        k.real("beta", above=0)
        k.real("rdpo_alpha", "simpo_gamma_beta_ratio", "tdpo_alpha", at_least=0)
        k.ints("tdpo_chunk")
