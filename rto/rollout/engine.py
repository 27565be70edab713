"""The rollout protocol: what an engine takes (prompt token ids) and what it returns (a RolloutBatch).

Both engines (`hf`, built in; `vllm`, colocated) return right-padded sequences, prompt then response, so the
trainer's forwards need no position-id handling. A response ends at its first stop token (the tokenizer's EOS,
the model's generation-config EOS ids, extra stop tokens: `rto.families.stop_token_ids`). One that reaches the
length cap without one gets the primary EOS forced on its last token (OpenRLHF's behaviour,
docs/algorithm.md); such rows are flagged in `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rto.families import cut_at_stop
from rto.tensors import pad_rows


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, T] long: prompt, response, padding
    attention_mask: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] bool: the response tokens (the actions)
    rollout_logp: torch.Tensor  # [B, T] fp32: the engine's log-prob of each response token, 0 elsewhere
    truncated: torch.Tensor  # [B] bool: the response hit max_new_tokens and got EOS forced

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def select(self, index: torch.Tensor | list[int]) -> RolloutBatch:
        return RolloutBatch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


class Engine(Protocol):
    def generate(self, prompts: list[list[int]]) -> RolloutBatch:
        """Sample one response per prompt (repeat prompts for several samples)."""
        ...

    def sync_weights(self) -> None:
        """Make the engine generate with the actor's current weights."""
        ...


def assemble(
    prompts: list[list[int]],
    responses: list[list[int]],
    logps: list[list[float]],
    *,
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    device,
) -> RolloutBatch:
    """Right-padded batch from per-row prompt ids, sampled response ids (cut after the first stop token) and
    their log-probs. A response without a stop token at the cap gets its last token replaced by the primary
    EOS, `stop_ids[0]` (its log-prob kept as sampled: `truncated` marks those rows)."""
    rows, masks, lps, cut = [], [], [], []
    for p, r, lp in zip(prompts, responses, logps):
        r, stopped = cut_at_stop(r, stop_ids)
        lp = list(lp[: len(r)])
        capped = not stopped and len(r) >= max_new_tokens  # an engine that stopped early without one: kept
        if capped:
            r[-1] = stop_ids[0]
        cut.append(capped)
        rows.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
        lps.append([0.0] * len(p) + lp)
    ids, valid = pad_rows(rows, pad_id, device=device)  # [B, T]
    resp, _ = pad_rows(masks, False, dtype=torch.bool, device=device)
    logp, _ = pad_rows(lps, 0.0, dtype=torch.float32, device=device)
    truncated = torch.tensor(cut, dtype=torch.bool, device=device)
    return RolloutBatch(ids, valid.long(), resp, logp, truncated)
