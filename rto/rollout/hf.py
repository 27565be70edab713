"""The built-in rollout engine: the FSDP2 actor itself generates with Hugging Face `generate`.

For the generation phase every FSDP2 unit of the actor is gathered once and kept whole (no per-token
all-gathers), then resharded for training. Sampling follows the rollout settings (temperature, top-p, top-k,
max new tokens, stop at EOS); the engine's log-prob of each sampled token is taken from the raw logits at the
rollout temperature. Weight sync is free: the engine is the actor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from rto.config import RolloutConfig
from rto.rollout.engine import RolloutBatch, assemble


@contextmanager
def gathered(root: nn.Module):
    """All FSDP2 units of `root` unsharded for the duration (the root must have run one forward already)."""
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


class HFEngine:
    def __init__(self, actor: nn.Module, lm: nn.Module, tokenizer, cfg: RolloutConfig, device: torch.device):
        """actor: the FSDP2 root (a PolicyModel); lm: the HF causal LM inside it."""
        self.actor, self.lm, self.cfg, self.device = actor, lm, cfg, device
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self._initialised = False

    def sync_weights(self) -> None:
        """Nothing to do: the engine generates with the actor's own parameters."""

    def _lazy_init(self) -> None:
        # FSDP2 initialises lazily on the root's first forward; generate() calls the layers directly, so run
        # one tiny root forward first or the layers would each become a root.
        ids = torch.tensor([[self.eos_id, self.eos_id]], device=self.device)
        with torch.no_grad():
            self.actor(ids, torch.ones_like(ids), loss_mask=torch.ones_like(ids, dtype=torch.bool))
        self._initialised = True

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> RolloutBatch:
        if not self._initialised:
            self._lazy_init()
        c = self.cfg
        responses, logps = [], []
        was_training = self.lm.training
        self.lm.eval()
        with gathered(self.actor):
            for i in range(0, len(prompts), c.micro_batch_size):
                r, lp = self._generate_chunk(prompts[i : i + c.micro_batch_size])
                responses += r
                logps += lp
        self.lm.train(was_training)
        return assemble(prompts, responses, logps, eos_id=self.eos_id, pad_id=self.pad_id,
                        max_new_tokens=c.max_new_tokens, device=self.device)  # fmt: skip

    def _generate_chunk(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        c = self.cfg
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_id, dtype=torch.long, device=self.device)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding for batched decoding
            ids[b, P - len(p) :] = torch.tensor(p, device=self.device)
            attn[b, P - len(p) :] = 1
        out = self.lm.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=c.temperature, top_p=c.top_p,
            top_k=c.top_k or None, max_new_tokens=c.max_new_tokens, eos_token_id=self.eos_id,
            pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
        new = out.sequences[:, P:]  # [B, L]
        logits = torch.stack(out.logits, dim=1).float() / c.temperature  # [B, L, V]
        logp = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)  # [B, L]
        return new.tolist(), logp.tolist()
