"""Models: HF causal LMs with the fused log-prob head, scalar-head models (critic, reward model), tokenizers.

- `PolicyModel` wraps any HF causal LM; its forward returns per-token log-probs of chosen tokens through
  `rto_kernels.linear_logprobs`, so the [tokens, vocab] logits never exist. The head's family transforms (bias,
  logit scale, softcap: `rto.families`) go into the fused op. It is the FSDP2 root unit, so the LM-head weight
  and bias are unsharded while its forward runs.
- `load_causal_lm` runs the parity probe (`rto.families.parity_probe`) on every policy-side model it loads.
- `ScalarModel` wraps a one-label HF sequence-classification model (or a token-classification one): per-token
  values for the critic, the value at the last valid token for the reward model. `load_scalar_model` reads the
  published reward-model formats (HF sequence classification, OpenRLHF's value head) with their trained heads.
  Both save as ordinary HF checkpoints.
- Every `from_pretrained` of a model (tokenizer, config, weights) gets `trust_remote_code` and, for the model's
  own path, `revision` from its `ModelConfig` (`rto.model_files.hub_kwargs`).
- `tiny_tokenizer` / `tiny_causal_lm` build small models in code for tests and the toy world (no downloads).
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import rto_kernels
from rto.config import ConfigError, ModelConfig
from rto.families import (
    PROBE_LENGTH,
    HeadSpec,
    ModelError,
    family,
    head_form,
    head_spec,
    parity_probe,
    probe_ids,
    probe_tolerance,
)
from rto.model_files import (  # noqa: F401  (re-exported: the checks callers run before loading)
    check_model_folder,
    check_model_path,
    check_same_tokenizer,
    check_same_tokenizers,
    check_vocabulary,
    hub_kwargs,
    reading_model,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


def load_tokenizer(cfg: ModelConfig, section: str = "model."):
    """The model's tokenizer, with a chat template and a pad token, or an error saying which is missing;
    `section`: the prefix of the settings in messages (actor. for ppo, none for eval and inspect)."""
    path = cfg.tokenizer or cfg.path
    what = f"{section}tokenizer" if cfg.tokenizer else f"{section}path" if section else "model"
    if cfg.tokenizer:
        check_model_path(path, what)
    else:  # the model's own folder: a file, an empty folder or a run folder gets its own message, not a tokenizer's
        check_model_folder(path, what, weights=False)
    kwargs = hub_kwargs(cfg, path, what)
    with reading_model(path, what):
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if not tok.chat_template:
        hint = f"set {section}chat_template to a Jinja template (or use a chat/instruct tokenizer)"
        raise ConfigError(f"the tokenizer of {path} has no chat template: {hint}")
    if tok.pad_token is None:
        if cfg.pad_token is None:
            hint = f"set {section}pad_token (often its EOS token, {tok.eos_token!r})"
            raise ConfigError(f"the tokenizer of {path} has no pad token: {hint}")
        if tok.convert_tokens_to_ids(cfg.pad_token) in (None, tok.unk_token_id):
            raise ConfigError(f"{section}pad_token {cfg.pad_token!r} is not in the vocabulary of {path}")
        tok.pad_token = cfg.pad_token
    return tok


def load_causal_lm(path: str, cfg: ModelConfig, what: str = "model.path") -> nn.Module:
    """A policy-side causal LM (actor, reference, DPO model, SFT model), checked by the parity probe: the fused
    head must give the model's own log-probs, or the run stops naming `what` and the model's family."""
    check_model_folder(path, what)
    dtype, hub = DTYPES[cfg.dtype], hub_kwargs(cfg, path, what)
    with reading_model(path, what):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.attn_implementation, **hub)
    parity_probe(lm, what, dtype)
    return lm


# OpenRLHF's reward and critic classes: `{base_model_prefix}.*` + a bias-free Linear(H, 1) named by
# config.value_head_prefix ("value_head", newer "score"); config.json may carry normalize_reward, mean, std.
OPENRLHF_ARCHITECTURES = ("RewardModel", "CriticModel")


SCALAR_CLASSES = ("ForSequenceClassification", "ForTokenClassification")  # architecture name endings


def scalar_config(path: str, cfg: ModelConfig, what: str, *, scorer: bool = False) -> tuple:
    """(config, architecture, hub keywords) of a scalar model's checkpoint, read without its weights; a head with
    more than one label is refused, and with `scorer` so is a checkpoint with no scalar head (see
    load_scalar_model). A command whose reward model only scores calls it before any long work."""
    check_model_folder(path, what)
    hub = hub_kwargs(cfg, path, what)
    with reading_model(path, what):
        config = AutoConfig.from_pretrained(path, **hub)
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch.endswith(SCALAR_CLASSES) and getattr(config, "num_labels", 1) != 1:
        raise ModelError(f"{what}: {path} ({arch}) has {config.num_labels} labels; a scalar model has one")
    if scorer and arch not in OPENRLHF_ARCHITECTURES and not arch.endswith(SCALAR_CLASSES):
        raise ModelError(
            f"{what}: {path} ({arch}) is not a reward model: it has no scalar head, and a new one would score at "
            "random; give a sequence- or token-classification checkpoint with one label or an OpenRLHF RewardModel"
        )
    return config, arch, hub


def load_scalar_model(path: str, cfg: ModelConfig, what: str = "model.path", *, scorer: bool = False) -> nn.Module:
    """A one-label scalar model (reward model or critic); `ScalarModel` reads its per-token values.

    Checkpoint formats, by config.json `architectures`: an HF `*ForSequenceClassification` (TRL, RewardBench,
    this project's RM trainer), OpenRLHF's `RewardModel` / `CriticModel` (its value head becomes `score`), an
    HF `*ForTokenClassification`; each loads with its trained head, and a load that reports missing or unexpected
    weights stops the run naming them. Any other checkpoint (a causal LM) gets a new head: the family's
    sequence-classification class, else its token-classification class, else a ModelError naming the family;
    with `scorer` (a reward model that scores, not one to be trained) such a checkpoint is refused instead, since
    a new head would score at random."""
    config, arch, hub = scalar_config(path, cfg, what, scorer=scorer)
    kwargs = dict(dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, output_loading_info=True)
    kwargs.update(hub)
    trained = True
    if arch in OPENRLHF_ARCHITECTURES:
        prefix = getattr(config, "value_head_prefix", None) or "value_head"
        if prefix != "score":
            kwargs["key_mapping"] = {rf"^{re.escape(prefix)}\.": "score."}
        auto = AutoModelForSequenceClassification
    elif arch.endswith(SCALAR_CLASSES):
        seq = arch.endswith("ForSequenceClassification")
        auto = AutoModelForSequenceClassification if seq else AutoModelForTokenClassification
    else:
        auto, trained = _new_head_class(config, what), False
    config.num_labels = 1
    config.classifier_dropout = 0.0  # dropout before a token-classification head would add noise to values
    # a causal LM given a new head: transformers' load report (its LM head unexpected, the head missing) is what
    # is meant, so it is left out and said in one line; a trained checkpoint's report stays (and any gap stops)
    quiet = _transformers_errors_only() if not trained else contextlib.nullcontext()
    with reading_model(path, what), quiet:
        model, info = auto.from_pretrained(path, config=config, **kwargs)
    _check_head_load(model, info, trained, f"{what} ({path}, {arch})")
    if not trained:
        log.info(
            "%s: %s (%s) has no scalar head: a new one-label %s head starts from random",
            what,
            path,
            arch,
            auto.__name__.removeprefix("AutoModelFor"),
        )
    if not _token_level(model):
        scalar_probe(model, what)
    return model


@contextlib.contextmanager
def _transformers_errors_only():
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(before)


def _new_head_class(config, what: str):
    for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        if type(config) in auto._model_mapping:
            return auto
    kind = config.model_type
    raise ModelError(f"{what}: model family {kind} has no sequence- or token-classification class in transformers")


def _check_head_load(model: nn.Module, info: dict, trained: bool, where: str) -> None:
    """A trained checkpoint must fill every weight and leave none over; a causal LM given a new head may miss
    only the head and leave over only what lies outside the base model (its LM head)."""
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if not trained:
        base = f"{model.base_model_prefix}."
        missing = [k for k in missing if k.startswith(base)]
        unexpected = [k for k in unexpected if k.startswith(base)]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if keys:
            raise ModelError(f"{where}: {what} weights when loading: {', '.join(keys[:6])}")


def reward_normalisation(model: nn.Module) -> tuple[float, float] | None:
    """(mean, std) of the reward model's scores as its checkpoint states them (OpenRLHF's config.json `mean` /
    `std`, applied as (score - mean) / std when `normalize_reward` is set), or None."""
    c = model.config
    if getattr(c, "normalize_reward", False) and getattr(c, "mean", None) is not None:
        return float(c.mean), float(getattr(c, "std", 1.0))
    return None


@torch.no_grad()
def scalar_probe(model: nn.Module, what: str) -> float:
    """`ScalarModel`'s value at the last token against the model's own sequence-classification output on a probe
    sequence; ModelError naming `what` and the family beyond the dtype's tolerance."""
    ids = probe_ids(model, PROBE_LENGTH)
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids, use_cache=False).logits.float().reshape(-1)  # [1]: the last token's score
        ours = ScalarModel(model)(ids)[:, -1]
    finally:
        model.train(was_training)
    diff = float((own - ours).abs().max())
    tol = probe_tolerance(next(model.parameters()).dtype, float(own.abs().max()))
    if not diff <= tol:
        kind = family(model)
        raise ModelError(f"{what}: the scalar head disagrees with model family {kind}'s own score by {diff:.3g}")
    return diff


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for next-token prediction: the hidden state at t-1 predicts token t.

    Returns (sel [B, T-1] bool: which predictions count, targets [B, T-1])."""
    return loss_mask[:, 1:], input_ids[:, 1:]


class PolicyModel(nn.Module):
    """An HF causal LM whose per-token log-probs come from the fused head (with its family's transforms)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head_form = head_form(lm)  # refuses a family whose head is not one linear layer + transforms

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    @property
    def head(self) -> HeadSpec:
        """The head's transforms, with the bias parameter as it is now (unsharded inside the forward)."""
        return head_spec(self.lm, self.head_form)

    def gathered_head(self) -> tuple[torch.Tensor, HeadSpec]:
        """The head's weight [V, H] and spec with whole, detached tensors (for TDPO's frozen reference). Under
        FSDP2 this gathers: every rank must call it."""
        from rto.parallel import full_tensor

        head = self.head
        bias = None if head.bias is None else full_tensor(head.bias.detach())
        return full_tensor(self.head_weight.detach()), HeadSpec(bias, head.logit_scale, head.softcap)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Final hidden states [B, T, H] (after the last norm)."""
        # no KV cache: with one, HF would also skip reading packed sequences' boundaries from the position ids
        decoder = self.lm.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def head_logprobs(
        self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The fused head on hidden [N, H]: log p(targets [N]) fp32 [N] (and the entropy [N])."""
        return rto_kernels.linear_logprobs(
            hidden,
            self.head_weight,
            targets,
            temperature=temperature,
            return_entropy=return_entropy,
            **self.head.kwargs(),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor,
        temperature: float = 1.0,
        kl_ref: tuple | None = None,
        kl_chunk: int = 256,
        return_hidden: bool = False,
        return_entropy: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Log-probs of the tokens where `loss_mask` [B, T] is true, aligned to those tokens.

        Returns {"logp": [B, T] fp32, 0 elsewhere}; with `kl_ref` = (reference hidden states [N, H] at the
        same selected positions, reference head weight [V, H], reference HeadSpec) also {"kl": [B, T]} =
        KL(ref || policy) over the full vocabulary at each selected position (TDPO; `gathered_head` gives the
        last two; the spec may be left out when both heads are plain); with `return_hidden`, {"hidden": [N, H]};
        with `return_entropy`, {"entropy": [B, T]} (the policy's entropy at each selected position).
        """
        from rto.losses import full_vocab_kl

        hidden = self.hidden_states(input_ids, attention_mask, position_ids)[:, :-1]  # [B, T-1, H]
        sel, targets = shift_targets(input_ids, loss_mask)
        h = hidden[sel]  # [N, H]
        res = self.head_logprobs(h, targets[sel], temperature, return_entropy)
        logp = res[0] if return_entropy else res
        out = {"logp": _scatter_tokens(logp, loss_mask)}
        if return_entropy:
            out["entropy"] = _scatter_tokens(res[1], loss_mask)
        if kl_ref is not None:
            ref_hidden, ref_weight, ref_head = (*kl_ref, None) if len(kl_ref) == 2 else kl_ref
            head = self.head
            if ref_head is None and not head.plain:
                why = f"the {self.head_form.family} head is not plain"
                raise ValueError(f"kl_ref needs the reference's HeadSpec (PolicyModel.gathered_head): {why}")
            kl = full_vocab_kl(h, self.head_weight, ref_hidden, ref_weight, kl_chunk, head=head, ref_head=ref_head)
            out["kl"] = _scatter_tokens(kl, loss_mask)
        if return_hidden:
            out["hidden"] = h
        return out


def _scatter_tokens(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-prediction values [N] back to token positions [B, T] (position 0 never predicted)."""
    full = torch.zeros(loss_mask.shape, dtype=values.dtype, device=values.device)
    sel = torch.zeros_like(loss_mask)
    sel[:, 1:] = loss_mask[:, 1:]
    return full.masked_scatter(sel, values)


def _token_level(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForTokenClassification")


SCALAR_HEADS = ("score", "classifier")  # the one-label head of the HF sequence-classification classes


class ScalarModel(nn.Module):
    """A one-label HF sequence- or token-classification model: values [B, T] for every token. A
    sequence-classification head runs on every position (HF itself reads it at the last one only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head_name = None
        if not _token_level(model):
            names = [n for n in SCALAR_HEADS if isinstance(getattr(model, n, None), nn.Linear)]
            if not names:
                raise ModelError(f"{type(model).__name__} has no linear scalar head named {' or '.join(SCALAR_HEADS)}")
            self.head_name = names[0]

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.head_name is None:
            return self.model(**inputs).logits.squeeze(-1).float()  # [B, T]
        hidden = self.model.base_model(**inputs).last_hidden_state  # [B, T, H]
        return getattr(self.model, self.head_name)(hidden).squeeze(-1).float()  # [B, T]


# ---- tiny models, built in code ----

TINY_SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level HF tokenizer over `words` with a chat template; `<|end|>` ends a turn (EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(TINY_SPECIALS + [w for w in dict.fromkeys(words) if w not in TINY_SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_causal_lm(
    vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0, max_positions: int = 512
) -> LlamaForCausalLM:
    """A small Llama with random weights (a few hundred thousand parameters at the defaults)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=TINY_SPECIALS.index("<|end|>"),  # the tiny tokenizer's EOS (Llama's default 2 is <|user|> here)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
