"""The rollout protocol: what an engine takes (prompt token ids) and what it returns (a RolloutBatch).

Both engines (`hf`, built in; `vllm`, colocated) return right-padded sequences, prompt then response, so the
trainer's forwards need no position-id handling. A response that reaches the length cap without EOS gets EOS
forced on its last token (OpenRLHF's behaviour, REFERENCE.md); such rows are flagged in `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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


def assemble(prompts: list[list[int]], responses: list[list[int]], logps: list[list[float]], *, eos_id: int,
             pad_id: int, max_new_tokens: int, device) -> RolloutBatch:  # fmt: skip
    """Right-padded batch from per-row prompt ids, sampled response ids (cut after the first EOS) and their
    log-probs. A response without EOS at the cap gets its last token replaced by EOS (its log-prob kept as
    sampled: `truncated` marks those rows)."""
    rows, masks, lps, cut = [], [], [], []
    for p, r, lp in zip(prompts, responses, logps):
        r, lp = list(r), list(lp)
        if eos_id in r:
            end = r.index(eos_id) + 1
            r, lp = r[:end], lp[:end]
            cut.append(False)
        else:
            if len(r) < max_new_tokens:  # an engine stopped early without EOS: not a cap, keep as is
                cut.append(False)
            else:
                r[-1] = eos_id
                cut.append(True)
        rows.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
        lps.append([0.0] * len(p) + lp)
    T = max(len(x) for x in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    logp = torch.zeros(B, T, dtype=torch.float32)
    for b, (x, m, lp) in enumerate(zip(rows, masks, lps)):
        ids[b, : len(x)] = torch.tensor(x)
        attn[b, : len(x)] = 1
        resp[b, : len(x)] = torch.tensor(m)
        logp[b, : len(x)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(ids.to(device), attn.to(device), resp.to(device), logp.to(device),
                        torch.tensor(cut, dtype=torch.bool, device=device))  # fmt: skip
