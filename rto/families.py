"""Model families: what each HF causal LM does between its last hidden state and its logits, and its stop tokens.

- `head_form(lm)` reads, per family (its `model_type`), what the installed transformers' `*ForCausalLM.forward`
  applies after the decoder: z = (h @ W.T + b) * logit_scale, then z = c * tanh(z / c) with a softcap c. A
  family whose head does something else is refused by name (`ModelError`); `head_spec(lm)` adds the live bias
  parameter (read at call time, so that it is the one FSDP2 has unsharded and the optimizer updates).
- `parity_probe` is the general guard: after a policy-side model loads, the fused head's log-probs on a short
  probe sequence must match the model's own `log_softmax(model(ids).logits)`, or the run stops naming the
  model, its family and the largest difference. A family missing from the tables below is therefore never
  silently wrong.
- `check_packing` refuses padding-free batches for a family whose packed forward differs from its padded one.
- `stop_token_ids` is the union of the tokenizer's EOS, the model's `generation_config.eos_token_id` and extra
  stop tokens; `cut_at_stop` ends a response at the first of them.
Formulas and kernel contracts: docs/kernels.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rto.config import ConfigError

log = logging.getLogger(__name__)


class ModelError(ConfigError):
    """A model the project cannot use as loaded: an unsupported head, a failed parity probe, refused packing."""


@dataclass(eq=False)
class HeadSpec:
    """The head transforms of one model: z = (h @ W.T + bias) * logit_scale; z = softcap * tanh(z / softcap)."""

    bias: torch.Tensor | None = None  # [V], a parameter of the model
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.bias is None and self.logit_scale == 1.0 and self.softcap is None

    def kwargs(self) -> dict:
        """The fused op's keyword arguments for the transforms this head has (none for a plain head)."""
        out: dict = {}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.logit_scale != 1.0:
            out["logit_scale"] = self.logit_scale
        if self.softcap is not None:
            out["softcap"] = self.softcap
        return out


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, head: HeadSpec | None) -> torch.Tensor:
    """The head's logits [N, V] fp32 from hidden [N, H] and weight [V, H] (for callers that need the whole row:
    the engine's [B, V] sampling step and TDPO's chunked KL). The matmul runs in the weight's dtype."""
    bias = None if head is None or head.bias is None else head.bias.to(weight.dtype)
    z = F.linear(hidden.to(weight.dtype), weight, bias).float()
    if head is None:
        return z
    if head.logit_scale != 1.0:
        z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


# ---- the families' heads, read from transformers' modeling code ----

# model_type -> multiplier read from the loaded model. Cohere: logits * logit_scale; Granite: logits /
# logits_scaling; MiniCPM3: lm_head(h / logits_scaling) (the same, there is no bias); HyperCLOVA X: logits *
# logits_scaling; Falcon-H1: lm_head(h) * model.lm_head_multiplier.
_COHERE = ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")
_GRANITE = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")


def _scale_of(lm: nn.Module) -> float:
    cfg, kind = lm.config, lm.config.model_type
    if kind in _COHERE:
        scale = getattr(lm, "logit_scale", getattr(cfg, "logit_scale", None))
        return 1.0 if scale is None else float(scale)
    if kind in _GRANITE or kind == "minicpm3":
        return 1.0 / float(cfg.logits_scaling)
    if kind == "hyperclovax":
        return float(cfg.logits_scaling)
    if kind == "falcon_h1":
        return float(getattr(lm.model, "lm_head_multiplier", cfg.lm_head_multiplier))
    return 1.0


# model_type -> softcap: `final_logit_softcapping` of the text config (Gemma 2, Gemma 3 text, Gemma 3n, Gemma 4,
# VaultGemma, nanochat, Beam), RecurrentGemma's `logits_soft_cap`, xLSTM's `output_logit_soft_cap`, Inkling 2's
# softcap module. (Gemma 3's image-text class `gemma3` applies none in this transformers.)
_GEMMA = ("gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified")
_FINAL_SOFTCAP = (*_GEMMA, "gemma4_unified_text", "vaultgemma", "nanochat", "beam")


def _softcap_of(lm: nn.Module) -> float | None:
    cfg, kind = lm.config, lm.config.model_type
    if kind in _FINAL_SOFTCAP:
        cap = cfg.get_text_config().final_logit_softcapping
    elif kind == "recurrent_gemma":
        cap = cfg.logits_soft_cap
    elif kind == "xlstm":
        cap = cfg.output_logit_soft_cap
    elif kind in ("inkling2_text", "inkling2_loop_text"):
        cap = lm.logit_softcap.softcap
    else:
        cap = None
    return None if cap is None else float(cap)


# Families whose head is something other than one linear layer with the transforms above.
REFUSED = {
    "modernbert-decoder": "its logits pass a decoder block after lm_head",
    "gemma4_assistant": "its logits come from a masked embedding",
    "gemma4_unified_assistant": "its logits come from a masked embedding",
    "prophetnet": "it predicts n-gram streams",
    "musicgen": "it has one head per codebook",
    "musicgen_melody": "it has one head per codebook",
    "xlnet": "it is a permutation LM",
    "xlm": "its head is an adaptive softmax",
}


@dataclass(frozen=True)
class HeadForm:
    """The static part of a model's head (its family's transforms); the bias is read live (`head_spec`)."""

    family: str
    has_bias: bool
    logit_scale: float
    softcap: float | None


def family(lm: nn.Module) -> str:
    return getattr(lm.config, "model_type", None) or type(lm).__name__


def head_form(lm: nn.Module) -> HeadForm:
    """How `lm` turns its decoder's last hidden state into logits, or ModelError naming a refused family."""
    kind = family(lm)
    where = f"{kind} ({type(lm).__name__})"
    if kind in REFUSED:
        raise ModelError(f"model family {where} is not supported: {REFUSED[kind]}")
    if kind == "inkling_text" and getattr(lm.config, "unpadded_vocab_size", None) is not None:
        raise ModelError(f"model family {where} is not supported with unpadded_vocab_size: its logits are cut")
    out = lm.get_output_embeddings()
    if not isinstance(out, nn.Linear) or not any(m is out for m in lm.children()):
        why = f"its output layer ({type(out).__name__}) is not one linear layer of the model"
        raise ModelError(f"model family {where} is not supported: {why}")
    return HeadForm(kind, out.bias is not None, _scale_of(lm), _softcap_of(lm))


def head_spec(lm: nn.Module, form: HeadForm | None = None) -> HeadSpec:
    """`lm`'s head transforms with its current bias parameter (read now: FSDP2 swaps parameters)."""
    form = form or head_form(lm)
    bias = lm.get_output_embeddings().bias if form.has_bias else None
    return HeadSpec(bias, form.logit_scale, form.softcap)


# ---- the parity probe ----

PROBE_LENGTH = 8  # tokens of the probe sequence
PROBE_TARGETS = 16  # vocabulary entries compared at each probe position (the model's top 8 and 8 spread out)
# per-dtype tolerance on log-probs: ATOL + EPS x the largest |logit| (the model's own logits are rounded to its
# dtype once in the matmul and once in a softcap; the fused head accumulates in fp32)
PROBE_ATOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def probe_tolerance(dtype: torch.dtype, max_logit: float) -> float:
    return PROBE_ATOL.get(dtype, 2e-2) + torch.finfo(dtype).eps * max(1.0, max_logit)


def probe_ids(model: nn.Module, length: int) -> torch.Tensor:
    """A fixed probe sequence [1, length] of token ids every embedding of `model` has, without its pad token
    (a sequence-classification model reads its score before the first pad)."""
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = embed.num_embeddings if out is None else min(embed.num_embeddings, out.weight.shape[0])
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (1, length), generator=g)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        ids = torch.where(ids == pad, (ids + 1) % vocab, ids)
    return ids.to(embed.weight.device)


@torch.no_grad()
def parity_probe(lm: nn.Module, what: str, dtype: torch.dtype | None = None, length: int = PROBE_LENGTH) -> float:
    """Largest |fused log-prob - the model's own log_softmax(logits)| on a probe sequence; ModelError naming
    `what` (the setting the model came from), the family and the difference when beyond the dtype's tolerance.

    Compared at every position: the next token's log-prob and the entropy (`PolicyModel.forward`) and the
    log-probs of PROBE_TARGETS vocabulary entries (`PolicyModel.head_logprobs` on the same hidden states)."""
    from rto.models import PolicyModel  # models imports this module

    dtype = dtype or lm.get_output_embeddings().weight.dtype
    try:
        policy = PolicyModel(lm)
    except ModelError as e:
        raise ModelError(f"{what}: {e}") from None
    was_training = lm.training
    lm.eval()
    try:
        ids = probe_ids(lm, length)
        logits = lm(input_ids=ids, use_cache=False).logits[0].float()  # [L, V]
        own = torch.log_softmax(logits, dim=-1)
        mask = torch.ones_like(ids, dtype=torch.bool)
        out = policy(ids, torch.ones_like(ids), loss_mask=mask, return_entropy=True)
        V = own.shape[-1]
        spread = torch.linspace(0, V - 1, PROBE_TARGETS // 2, device=ids.device).long()
        targets = torch.cat([own.topk(min(V, PROBE_TARGETS // 2), dim=-1).indices, spread.expand(length, -1)], 1)
        hidden = policy.hidden_states(ids)[0]  # [L, H]
        K = targets.shape[1]
        fused = policy.head_logprobs(hidden.repeat_interleave(K, 0), targets.flatten()).view(length, K)
    finally:
        lm.train(was_training)
    next_own = own[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # [L-1]
    entropy_own = -(own.exp() * own).sum(-1)[:-1]
    diffs = [
        (out["logp"][0, 1:] - next_own).abs().max(),
        (out["entropy"][0, 1:] - entropy_own).abs().max(),
        (fused - own.gather(-1, targets)).abs().max(),
    ]
    diff = max(float(d) for d in diffs)
    tol = probe_tolerance(dtype, float(logits.abs().max()))
    kind = family(lm)
    log.info("parity probe %s (%s): max |log-prob difference| %.2e, tolerance %.1e", what, kind, diff, tol)
    if not diff <= tol:  # also stops on NaN
        raise ModelError(
            f"{what}: the fused head disagrees with the model's own logits for model family {kind} "
            f"({type(lm).__name__}): max |log-prob difference| {diff:.3g} > tolerance {tol:.1g} on a probe "
            "sequence; this family's head is not supported"
        )
    return diff


# ---- packing ----

# Families whose packed (padding-free) forward is not their padded one in this transformers: the attention mask is
# built without the position ids, so packed sequences attend to each other, or a recurrent state runs across the
# sequence boundary (Mamba-style and hybrid layers). Checked with tiny models on the PyTorch path: opt, bloom,
# mpt, falcon_h1, bamba, mamba, mamba2, recurrent_gemma; the other recurrent families by design. Any other family
# goes through the packed probe in `check_packing`.
NO_PACKING = {
    "opt": "its attention mask ignores the position ids",
    "bloom": "its attention mask ignores the position ids",
    "mpt": "its attention mask ignores the position ids",
    "falcon_h1": "its Mamba layers carry state across packed sequences",
    "bamba": "its Mamba layers carry state across packed sequences",
    "jamba": "its Mamba layers carry state across packed sequences",
    "zamba": "its Mamba layers carry state across packed sequences",
    "zamba2": "its Mamba layers carry state across packed sequences",
    "mamba": "its recurrent state runs across packed sequences",
    "mamba2": "its recurrent state runs across packed sequences",
    "falcon_mamba": "its recurrent state runs across packed sequences",
    "rwkv": "its recurrent state runs across packed sequences",
    "xlstm": "its recurrent state runs across packed sequences",
    "recurrent_gemma": "its recurrent state runs across packed sequences",
}


@torch.no_grad()
def check_packing(
    model: nn.Module, what: str, setting: str = "train.packing", dtype: torch.dtype | None = None
) -> None:
    """Refuse padding-free batches (`setting`=true) for `model` (an HF causal LM, or the HF model inside a
    critic or reward model) when its family is known not to support them or when a packed probe of two sequences differs
    from their separate forwards. The probe needs an attention that runs here (sdpa or eager)."""
    kind = family(model)
    where = f"{what}: model family {kind} ({type(model).__name__}) cannot run packed batches"
    if kind in NO_PACKING:
        raise ModelError(f"{where}: {NO_PACKING[kind]}; set {setting}=false")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in (None, "sdpa", "eager"):
        log.info("packing probe %s (%s): skipped under attention %s", what, kind, attn)
        return
    ids = probe_ids(model, 9)
    first, second = ids[:, :5], ids[:, 5:]
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(ids.device)[None]
    was_training = model.training
    model.eval()
    forward = _token_outputs(model)
    try:
        packed = forward(ids, positions)
        alone = torch.cat([forward(x, None) for x in (first, second)], 1)
    finally:
        model.train(was_training)
    diff = float((packed - alone).abs().max())
    dtype = dtype or next(model.parameters()).dtype
    tol = probe_tolerance(dtype, float(alone.abs().max()))
    log.info("packing probe %s (%s): max |logit difference| %.2e, tolerance %.1e", what, kind, diff, tol)
    if not diff <= tol:
        raise ModelError(f"{where}: a packed probe differs from the padded forward by {diff:.3g}; set {setting}=false")


def _token_outputs(model: nn.Module):
    """(ids, position_ids) -> per-token outputs [1, T, ...] fp32: a causal LM's logits, a scalar model's values."""
    from rto.models import ScalarModel  # models imports this module

    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return lambda ids, pos: model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    scalar = ScalarModel(model)
    return lambda ids, pos: scalar(ids, None, pos)


# ---- stop tokens ----


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def generation_eos_ids(model_path: str | None, revision: str | None = None) -> list[int]:
    """`eos_token_id` (int or list) of the model's generation_config.json (at `revision` for a hub id); [] when it
    has none."""
    if not model_path:
        return []
    from transformers import GenerationConfig

    folder = Path(model_path).expanduser()
    if folder.is_dir() and not (folder / "generation_config.json").exists():
        return []
    try:
        gen = GenerationConfig.from_pretrained(str(folder) if folder.is_dir() else model_path, revision=revision)
    except OSError:  # a hub model without generation_config.json
        return []
    return _eos_list(gen.eos_token_id)


def stop_token_ids(
    tokenizer, model_path: str | None, extra: list[str] | tuple[str, ...] = (), revision: str | None = None
) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS first (the primary EOS, written when a response is
    cut at the length cap), then the model's generation_config eos ids, then the `extra` token strings (an
    unknown one is a ConfigError naming it). Each id once, in that order."""
    ids = _eos_list(tokenizer.eos_token_id) + generation_eos_ids(model_path, revision)
    vocab = tokenizer.get_vocab()
    for token in extra:
        if token not in vocab:
            raise ConfigError(f"stop token {token!r} is not in the vocabulary of the tokenizer of {model_path}")
        ids.append(int(vocab[token]))
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ConfigError(f"{model_path}: the tokenizer has no EOS token and the model lists none: set stop tokens")
    return ids


def cut_at_stop(tokens: list[int], stop_ids: list[int] | set[int]) -> tuple[list[int], bool]:
    """tokens up to and including the first stop token, and whether there was one."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return list(tokens[: i + 1]), True
    return list(tokens), False
