"""The configs of the commands that train nothing: eval (`EvalConfig`), inspect (`InspectConfig`) and the toy
pipeline (`PipelineConfig`, with the toy world's sizes in `ToyWorldConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rto.config.base import STOP_TOKENS_DOC, ConfigError, Keys, Section, doc
from rto.config.offline import DPO_LOSSES, PromptDataConfig
from rto_kernels import SHAPINGS

REVISION_DOC = "hub branch, tag or commit of model (every load of it); the other models load their default branch"
REMOTE_CODE_DOC = "run the Python code a hub model ships, for every model and tokenizer the command loads"


@dataclass
class EvalConfig(Section):
    model: str = doc(MISSING, "the model to evaluate (hub id or folder)")
    revision: str | None = doc(None, REVISION_DOC)
    trust_remote_code: bool = doc(False, REMOTE_CODE_DOC)
    reference: str | None = doc(None, "model to compare against (win rate), e.g. the SFT model")
    reward: str | None = doc(None, "reward model to score responses with")
    gold: bool = doc(False, "also score with the toy world's gold reward (toy prompts only)")
    chat_template: str | None = doc(None, "Jinja chat template to use when the model's tokenizer has none")
    pad_token: str | None = doc(None, "token to pad with when the tokenizer has none")
    data: PromptDataConfig = doc(factory=PromptDataConfig, text="prompts (messages or prompt column)")
    temperature: float = doc(0.7, "0.7: AlpacaEval's setting; 0: greedy, Arena-Hard's")
    top_p: float = doc(1.0, "nucleus sampling, in (0, 1]")
    max_new_tokens: int = doc(512, "response length cap")
    stop_tokens: list[str] = doc(factory=list, text=STOP_TOKENS_DOC)
    generator: str | None = doc(None, "model name in the AlpacaEval / Arena-Hard exports; default: from model's path")
    seed: int = doc(0, "sampling seed")
    output_dir: str = doc("runs", "parent folder")
    name: str = doc("eval", "outputs go to output_dir/name")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.text("model", "output_dir", "name")
        k.text("reference", "reward", "chat_template", "pad_token", "revision", optional=True)
        k.file_name("generator", optional=True)  # Arena-Hard names its answer file after it
        k.real("temperature", at_least=0)  # 0: greedy
        k.real("top_p", above=0, at_most=1)
        k.ints("max_new_tokens")
        k.seeds("seed")
        k.texts("stop_tokens")


@dataclass
class InspectConfig(Section):
    model: str = doc(MISSING, "policy whose responses are shown (hub id or folder)")
    revision: str | None = doc(None, REVISION_DOC)
    trust_remote_code: bool = doc(False, REMOTE_CODE_DOC)
    ref: str = doc(MISSING, "reference (SFT) model")
    dpo: str = doc(MISSING, "DPO model whose token reward colours the tokens")
    chat_template: str | None = doc(None, "Jinja chat template to use when the model's tokenizer has none")
    pad_token: str | None = doc(None, "token to pad with when the tokenizer has none")
    data: PromptDataConfig = doc(factory=PromptDataConfig, text="prompts (messages or prompt column)")
    n: int = doc(8, "responses to render")
    temperature: float = doc(0.7, "sampling temperature (0: greedy)")
    max_new_tokens: int = doc(64, "response length cap")
    dpo_scale: float = doc(0.05, "scale of the DPO token reward")
    dpo_clip: float | None = doc(None, "clip of the DPO token reward, > 0 (null: show it unclipped)")
    seed: int = doc(0, "sampling seed")
    output_dir: str = doc("runs", "parent folder")
    name: str = doc("inspect", "outputs go to output_dir/name")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.text("model", "ref", "dpo", "output_dir", "name")
        k.text("chat_template", "pad_token", "revision", optional=True)
        k.ints("n", "max_new_tokens")
        k.seeds("seed")
        k.real("temperature", at_least=0)  # 0: greedy
        k.real("dpo_scale", at_least=0)
        k.real("dpo_clip", above=0, optional=True)


@dataclass
class ToyWorldConfig(Section):
    kind: str = doc("bag", "bag (bag-of-words world) or chain (reward lives in transitions between words)")
    length: int = doc(10, "target answer length in words for the chain world (at least 2)")
    n_sft: int = doc(4000, "SFT conversations")
    n_pairs: int = doc(3000, "preference pairs (a tenth held out)")
    n_prompts: int = doc(2048, "RL prompts")
    n_eval: int = doc(128, "held-out evaluation prompts")
    bt_beta: float = doc(1.0, "Bradley-Terry temperature of the gold labels (0: coin flips)")
    hidden: int = doc(64, "hidden size of the toy Llama (a multiple of 8: 4 heads of an even size)")
    layers: int = doc(2, "decoder layers of the toy Llama")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.choice("kind", ("bag", "chain"))
        k.ints("length", low=2)
        k.ints("n_sft", "n_prompts", "n_eval", "layers")
        k.ints("n_pairs", low=10)  # a tenth is held out: at least one pair
        k.real("bt_beta", at_least=0)
        if self.hidden < 8 or self.hidden % 8:  # 4 attention heads, each of an even size (rotary embeddings)
            k.fail("hidden", "a positive multiple of 8")


@dataclass
class PipelineConfig(Section):
    name: str = doc("toy", "outputs go to output_dir/name (one folder per stage inside)")
    output_dir: str = doc("runs", "parent folder")
    seed: int = doc(0, "seed of the world and of every stage")
    world: ToyWorldConfig = doc(factory=ToyWorldConfig, text="the toy world's sizes")
    baselines: list[str] = doc(factory=lambda: ["dpo", "rdpo", "simpo", "tdpo"], text="offline methods to train")
    online: list[str] = doc(factory=lambda: ["ppo", "rto"], text="online algos to train from the SFT model")
    loss_overrides: dict[str, list[str]] = doc(factory=dict, text="extra dpo settings per loss, e.g. simpo: [beta=2.5]")
    quick: bool = doc(False, "a short run: a few dozen steps per stage (rto/pipeline.py: QUICK)")
    eval_temperature: float = doc(0.7, "sampling temperature of the evaluation (0: greedy)")
    eval_max_new_tokens: int = doc(24, "response cap of the evaluation")

    def check(self, at: str) -> None:
        k = Keys(self, at)
        k.text("name", "output_dir")
        k.seeds("seed")
        k.texts("baselines", DPO_LOSSES)
        k.texts("online", SHAPINGS)
        for loss, settings in self.loss_overrides.items():
            if loss not in DPO_LOSSES or not all("=" in s for s in settings):
                raise ConfigError(
                    f"{at}loss_overrides.{loss} must be a loss of {', '.join(DPO_LOSSES)} with key=value "
                    f"settings, got {settings}"
                )
        k.real("eval_temperature", at_least=0)  # 0: greedy
        k.ints("eval_max_new_tokens")
