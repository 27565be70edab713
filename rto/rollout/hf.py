"""The built-in rollout engine: the FSDP2 actor itself decodes, with a KV cache and its own sampling loop.

For the generation phase every FSDP2 unit of the actor is gathered once and kept whole (no per-token all-gathers),
then resharded for training; a one-rank actor (unsharded: `rto.parallel.OneRankModule`) under mixed precision holds
bf16 copies of its parameters for the phase instead, as gathered bf16 units would. Each step runs the decoder on the
new token, the LM head on the last position only ([B, V] logits: nothing of size [B, L, V] is kept), and samples
with `rollout.sampling.sample` (temperature, top-k, top-p; one random number per row); the engine's log-prob of each
sampled token is taken from the full softmax at the rollout temperature. The head applies the model family's
transforms (bias, logit scale, softcap: `rto.families.head_logits`), as the fused head does. Sampling stops at any
stop token (`stop_ids`: the tokenizer's EOS and the model's generation-config EOS ids by default) or at max new
tokens. Weight sync is free: the engine is the actor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache, StaticCache

from rto.config import RolloutConfig
from rto.families import head_form, head_logits, head_spec
from rto.parallel import compute_parameters
from rto.rollout.engine import RolloutBatch, assemble
from rto.rollout.sampling import sample
from rto.tensors import pad_rows

_STOP_EVERY = 8  # decode steps between checks that every row has ended (each check is a host sync on GPU)


@contextmanager
def gathered(root: nn.Module):
    """All FSDP2 units of `root` unsharded for the duration (the root must have run one forward already); for a
    one-rank root, its parameters in the compute dtype (`rto.parallel.compute_parameters`)."""
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not units:
        with compute_parameters(root):
            yield
        return
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
    def __init__(
        self,
        actor: nn.Module,
        lm: nn.Module,
        tokenizer,
        cfg: RolloutConfig,
        device: torch.device,
        stop_ids: list[int] | None = None,
    ):
        """actor: the FSDP2 root (a PolicyModel; unsharded on one rank); lm: the HF causal LM inside it; stop_ids:
        the tokens that end a response, primary EOS first (`rto.families.stop_token_ids`; default: the tokenizer's
        EOS alone)."""
        self.actor, self.lm, self.cfg, self.device = actor, lm, cfg, device
        self.stop_ids = [tokenizer.eos_token_id] if stop_ids is None else [int(t) for t in stop_ids]
        if not self.stop_ids or self.stop_ids[0] is None:
            raise ValueError("HFEngine: no stop token (the tokenizer has no EOS and no stop_ids were given)")
        self.eos_id, self.pad_id = self.stop_ids[0], tokenizer.pad_token_id
        self.head_form = head_form(lm)
        self._initialised = not isinstance(actor, FSDPModule)  # an unsharded actor needs no first root forward
        self._compiled = None

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
        return assemble(
            prompts,
            responses,
            logps,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            max_new_tokens=c.max_new_tokens,
            device=self.device,
        )

    def _generate_chunk(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """Decode one micro-batch: prefill the left-padded prompts, then one token per step from the last
        hidden state. The head runs on one position per row ([B, V] logits, never [B, L, V]); the loop does
        not sync with the host except to stop early once every row has ended (checked every `_STOP_EVERY`
        steps). With `kv_cache=static` the cache and the attention mask are preallocated at full length, so
        every decode step has the same shapes (what `compile_decode` and CUDA graphs need)."""
        c = self.cfg
        B, P = len(prompts), max(len(p) for p in prompts)
        L = P + c.max_new_tokens
        ids, attn = self.left_padded(prompts, L)
        positions = (attn[:, :P].cumsum(-1) - 1).clamp_(min=0)  # pads take position 0; they are masked anyway
        static = c.kv_cache == "static"
        if static:
            cache = StaticCache(config=self.lm.config, max_cache_len=L)
        else:
            cache = DynamicCache(config=self.lm.config)
        tokens = torch.full((B, c.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        logps = torch.zeros((B, c.max_new_tokens), dtype=torch.float32, device=self.device)
        ended = torch.zeros(B, dtype=torch.bool, device=self.device)
        stops = torch.tensor(self.stop_ids, device=self.device)
        # prefill (never compiled: its shape changes with every micro-batch's prompt length)
        prefill_position = torch.arange(P, device=self.device)
        logits = self._logits(ids, positions, attn if static else attn[:, :P], cache, prefill_position)
        step_fn = self._compiled_step() if c.compile_decode else self._logits
        pos = positions[:, -1:]
        for t in range(c.max_new_tokens):
            tok, lp = sample(logits, top_k=c.top_k, top_p=c.top_p)
            tokens[:, t] = torch.where(ended, self.pad_id, tok)
            logps[:, t] = torch.where(ended, 0.0, lp)
            ended |= torch.isin(tok, stops)
            if t + 1 == c.max_new_tokens or ((t + 1) % _STOP_EVERY == 0 and bool(ended.all())):
                break
            attn[:, P + t] = 1
            pos = pos + 1
            cache_position = torch.full((1,), P + t, dtype=torch.long, device=self.device)
            logits = step_fn(tok[:, None], pos, attn if static else attn[:, : P + t + 1], cache, cache_position)
        return tokens.tolist(), logps.tolist()  # `assemble` cuts each row after its first stop token

    def left_padded(self, prompts: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts left-padded to the longest one (batched decoding): ids [B, P] and an attention mask [B, width]
        (width >= P) that is 1 on each prompt's tokens and 0 on the padding and on the room after P."""
        ids, valid = pad_rows(prompts, self.pad_id, side="left", device=self.device)  # [B, P]
        attn = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        attn[:, : ids.shape[1]] = valid
        return ids, attn

    def _logits(self, ids, positions, attn, cache, cache_position) -> torch.Tensor:
        """fp32 logits [B, V] at the last position, with the head's transforms, at the rollout temperature."""
        decoder = self.lm.get_decoder()
        out = decoder(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            cache=cache,
            cache_position=cache_position,
            use_cache=True,
        )
        h = out.last_hidden_state[:, -1]  # [B, H]
        head = head_spec(self.lm, self.head_form)  # the bias as it is now: unsharded while generating
        logits = head_logits(h, self.lm.get_output_embeddings().weight, head)
        return logits if self.cfg.temperature == 1.0 else logits / self.cfg.temperature

    def _compiled_step(self):
        if self._compiled is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on GPU
            self._compiled = torch.compile(self._logits, mode=mode, dynamic=False)
        return self._compiled
