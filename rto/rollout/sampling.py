"""Token sampling for the built-in engine: a few passes over the vocabulary per step, no host syncs.

`sample` draws from softmax(logits) restricted by top-k / top-p with inverse-CDF sampling: one uniform number
per row against the running sum of exp(logits - max). That is the distribution `torch.multinomial(softmax)`
draws from, but with one random number per row instead of one exponential draw per vocabulary entry (most of
`multinomial`'s cost at vocabulary sizes). The running sum is two-level so that it stays exact and cheap: fp64
running sums of blocks of `BLOCK` tokens, then an fp64 running sum inside the chosen block only.
A token of zero mass (a -inf logit, or one cut by top-k / top-p) is never drawn: the draw is u in (0, total] and
the first running sum >= u always ends on a token of mass > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 256


def sample(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V] (fp32, temperature already applied).

    Returns (tokens [B] int64, logp [B] fp32), where logp is the token's log-prob under the full softmax of
    `logits` (no top-k / top-p renormalisation: the policy's log-prob, which the trainer recomputes).
    """
    cand, index = logits, None  # candidates and their vocabulary ids (None: all of them, in order)
    if top_k and top_k < logits.shape[-1]:
        cand, index = logits.topk(top_k, dim=-1)  # sorted, largest first
    if top_p < 1.0:
        if index is None:
            cand, index = cand.sort(dim=-1, descending=True)
        probs = torch.softmax(cand, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        cand = cand.masked_fill(before >= top_p, float("-inf"))  # the top token always stays (before = 0)
    top = cand.amax(dim=-1, keepdim=True)  # [B, 1]
    weight = torch.exp(cand - top)  # [B, K], the largest is 1
    pick = draw(weight)
    tokens = pick if index is None else index.gather(-1, pick[:, None]).squeeze(-1)
    if index is None:  # the weights are the full softmax's: reuse them for the normaliser
        lse = top.squeeze(-1) + torch.log(weight.sum(-1))
    else:
        lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    return tokens, logp


def draw(weight: torch.Tensor) -> torch.Tensor:
    """Index [B] drawn from each row of weight [B, K] (non-negative, a positive entry in every row) with
    probability proportional to the weight."""
    B, K = weight.shape
    blocks = -(-K // BLOCK)
    w = F.pad(weight, (0, blocks * BLOCK - K)).view(B, blocks, BLOCK)  # zero mass past K: never drawn
    mass = w.sum(-1).double()  # [B, blocks]
    running = mass.cumsum(-1)  # monotone: a zero-mass block repeats the sum before it
    u = (1.0 - torch.rand(B, 1, dtype=torch.float64, device=weight.device)) * running[:, -1:]  # (0, total]
    b = torch.searchsorted(running, u).clamp_(max=blocks - 1)  # [B, 1]: the first block whose sum >= u
    before = torch.where(b > 0, running.gather(-1, (b - 1).clamp(min=0)), 0.0)  # < u, so u - before > 0
    inner = w.gather(1, b[..., None].expand(B, 1, BLOCK)).squeeze(1).double().cumsum(-1)  # [B, BLOCK]
    rest = torch.minimum(u - before, inner[:, -1:])  # in (0, block mass]: rounding cannot step past the block
    j = torch.searchsorted(inner, rest)  # first sum >= rest: a token of mass > 0
    return (b * BLOCK + j).squeeze(-1)
