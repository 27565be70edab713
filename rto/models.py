"""Models: HF causal LMs with the fused log-prob head, scalar-head models (critic, reward model), tokenizers.

- `PolicyModel` wraps any HF causal LM; its forward returns per-token log-probs of chosen tokens through
  `rto_kernels.linear_logprobs`, so the [tokens, vocab] logits never exist. It is the FSDP2 root unit, so the
  LM-head weight is unsharded while its forward runs.
- `ScalarModel` wraps an HF `AutoModelForTokenClassification` with one label: per-token values for the
  critic, the value at the last valid token for the reward model. Both save as ordinary HF checkpoints.
- `tiny_tokenizer` / `tiny_causal_lm` build small models in code for tests and the toy world (no downloads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import rto_kernels
from rto.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_model_path(path: str, what: str = "model.path") -> None:
    """A local folder must exist; anything else must look like a hub id ("org/name" or "name")."""
    p = Path(path).expanduser()
    if p.exists():
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ConfigError(f"{what}: no such file or folder: {path}")


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a chat template and a pad token, or an error saying which is missing."""
    path = cfg.tokenizer or cfg.path
    check_model_path(path, "model.tokenizer" if cfg.tokenizer else "model.path")
    tok = AutoTokenizer.from_pretrained(path)
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if not tok.chat_template:
        raise ConfigError(f"the tokenizer of {path} has no chat template: set model.chat_template to a Jinja "
                          "template (or use a chat/instruct tokenizer)")  # fmt: skip
    if tok.pad_token is None:
        if cfg.pad_token is None:
            raise ConfigError(f"the tokenizer of {path} has no pad token: set model.pad_token (often its EOS "
                              f"token, {tok.eos_token!r})")  # fmt: skip
        if tok.convert_tokens_to_ids(cfg.pad_token) in (None, tok.unk_token_id):
            raise ConfigError(f"model.pad_token {cfg.pad_token!r} is not in the vocabulary of {path}")
        tok.pad_token = cfg.pad_token
    return tok


def load_causal_lm(path: str, cfg: ModelConfig, what: str = "model.path") -> nn.Module:
    check_model_path(path, what)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation
    )


def load_scalar_model(path: str, cfg: ModelConfig, what: str = "model.path") -> nn.Module:
    """A one-label token-classification model: a causal LM checkpoint gets a new scalar head; a reward model or
    critic checkpoint loads as it was saved. Dropout before the head is off (it would add noise to values)."""
    check_model_path(path, what)
    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    return AutoModelForTokenClassification.from_pretrained(
        path, config=config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation
    )


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for next-token prediction: the hidden state at t-1 predicts token t.

    Returns (sel [B, T-1] bool: which predictions count, targets [B, T-1])."""
    return loss_mask[:, 1:], input_ids[:, 1:]


class PolicyModel(nn.Module):
    """An HF causal LM whose per-token log-probs come from the fused head."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Final hidden states [B, T, H] (after the last norm)."""
        # no KV cache: with one, HF would also skip reading packed sequences' boundaries from the position ids
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)  # fmt: skip
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor,
        temperature: float = 1.0,
        kl_ref: tuple[torch.Tensor, torch.Tensor] | None = None,
        kl_chunk: int = 256,
        return_hidden: bool = False,
        return_entropy: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Log-probs of the tokens where `loss_mask` [B, T] is true, aligned to those tokens.

        Returns {"logp": [B, T] fp32, 0 elsewhere}; with `kl_ref` = (reference hidden states [N, H] at the
        same selected positions, reference head weight [V, H]) also {"kl": [B, T]} = KL(ref || policy) over
        the full vocabulary at each selected position (TDPO); with `return_hidden`, {"hidden": [N, H]}; with
        `return_entropy`, {"entropy": [B, T]} (the policy's entropy at each selected position).
        """
        from rto.losses import full_vocab_kl

        hidden = self.hidden_states(input_ids, attention_mask, position_ids)[:, :-1]  # [B, T-1, H]
        sel, targets = shift_targets(input_ids, loss_mask)
        h = hidden[sel]  # [N, H]
        res = rto_kernels.linear_logprobs(
            h, self.head_weight, targets[sel], temperature=temperature, return_entropy=return_entropy
        )
        logp = res[0] if return_entropy else res
        out = {"logp": _scatter_tokens(logp, loss_mask)}
        if return_entropy:
            out["entropy"] = _scatter_tokens(res[1], loss_mask)
        if kl_ref is not None:
            ref_hidden, ref_weight = kl_ref
            out["kl"] = _scatter_tokens(full_vocab_kl(h, self.head_weight, ref_hidden, ref_weight, kl_chunk), loss_mask)
        if return_hidden:
            out["hidden"] = h
        return out


def _scatter_tokens(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-prediction values [N] back to token positions [B, T] (position 0 never predicted)."""
    full = torch.zeros(loss_mask.shape, dtype=values.dtype, device=values.device)
    sel = torch.zeros_like(loss_mask)
    sel[:, 1:] = loss_mask[:, 1:]
    return full.masked_scatter(sel, values)


class ScalarModel(nn.Module):
    """A one-label HF token-classification model: values [B, T] for every token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)  # fmt: skip
        return out.logits.squeeze(-1).float()  # [B, T]


def last_valid(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last position where attention_mask[b] is set] -> [B] (the reward model's score)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), pos, -1).amax(dim=1)  # [B]
    if (last < 0).any():  # host sync: an empty row here is a data bug, not a case to score
        raise ValueError("a row has no valid token to score")
    return values.gather(1, last[:, None]).squeeze(1)


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
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )  # fmt: skip
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_causal_lm(vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                   max_positions: int = 512) -> LlamaForCausalLM:  # fmt: skip
    """A small Llama with random weights (a few hundred thousand parameters at the defaults)."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=False, pad_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
