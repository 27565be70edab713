"""Pieces both log-prob ops share: the head transform of a logit tile, the online log-sum-exp, a tile's gradient.

Head transform (docs/kernels.md, `linear_logprobs`): from raw logits z (the LM head's matmul plus its bias),
l = z * logit_scale / T, or with a softcap c, l = c * tanh(z * logit_scale / c) / T. The kernels take it as two
scalars, l = tanh(z * pre) * post (softcap) or l = z * post (none), so the plain path is one multiply, as before
the transforms existed; `HAS_SOFTCAP` is a compile-time flag.

The online state per row is (m, s, t): running max, sum exp(l - m), and sum exp(l - m) * (l - m). Keeping
t relative to the running max gives the entropy log(s) - t/s without the cancellation of lse - E[l]
at logits of magnitude 1e4.
"""

from __future__ import annotations

import torch

from rto_kernels._runtime import HAS_TRITON


def head_factors(logit_scale: float, softcap: float | None, temperature: float) -> tuple[float, float]:
    """(pre, post) of the kernels' head transform: l = tanh(z * pre) * post with a softcap, else l = z * post."""
    if softcap is None:
        return 1.0, logit_scale / temperature
    return logit_scale / softcap, softcap / temperature


def incoming_grads(
    grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, stats: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An op's output gradients as its backward op takes them: zeros for an unused logp [N], None for an entropy
    that was unused or never computed."""
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[0])
    return grad_logp, grad_entropy if with_entropy else None


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        # From exp, odd-symmetric: a large |x| gives e = 0 and exactly +-1, never inf / inf. (libdevice's tanh
        # does not run under the interpreter.) Absolute error a few fp32 ulps of 1.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def head_logits(z, pre, post, HAS_SOFTCAP: tl.constexpr):
        # [BM, BV] fp32 raw logits -> the logits l the softmax runs over (module docstring).
        if HAS_SOFTCAP:
            logits = _tanh(z * pre) * post
        else:
            logits = z * post
        return logits

    @triton.jit
    def head_logits_and_slope(z, pre, post, HAS_SOFTCAP: tl.constexpr):
        # (l, dl/dz) of one tile: post, or pre * post * (1 - tanh^2) under a softcap. One return after a
        # compile-time branch: the compiler types every return statement, and the two slopes differ in shape.
        if HAS_SOFTCAP:
            th = _tanh(z * pre)
            logits = th * post
            slope = (pre * post) * (1.0 - th * th)
        else:
            logits = z * post
            slope = post
        return logits, slope

    @triton.jit
    def online_update(m, s, t, logits, valid, ENTROPY: tl.constexpr):
        # Fold one [BM, BV] tile of logits into the per-row state (m, s, t); see the module docstring.
        logits = tl.where(valid, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))  # [BM]
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        shifted = logits - m_new[:, None]
        e = tl.exp(shifted)  # 0 at invalid columns
        s_new = alpha * s + tl.sum(e, axis=1)
        if ENTROPY:
            # s and t are 0 while m is -inf: select the shift rather than form -inf * 0.
            t = alpha * (t + tl.where(s > 0, m - m_new, 0.0) * s)
            t += tl.sum(e * tl.where(valid, shifted, 0.0), axis=1)  # e is 0 where invalid
        return m_new, s_new, t

    @triton.jit
    def target_logit(best, logits, cols, tgt, col_ok):
        # Fold the target's logit, if this tile holds it, into best [BM] (-inf until found).
        hit = (cols[None, :] == tgt[:, None]) & col_ok
        return tl.maximum(best, tl.max(tl.where(hit, logits, float("-inf")), axis=1))

    @triton.jit
    def dlogits(
        logits,
        valid,
        cols,
        rows,
        row_ok,
        N,
        tgt_ptr,
        stats_ptr,
        g_logp_ptr,
        ent_ptr,
        g_ent_ptr,
        ENTROPY: tl.constexpr,
    ):
        # d/dl of g_logp * logp_target + g_entropy * entropy for one [BM, BV] tile of logits l. The log-sum-exp
        # comes as (row max, log sum) so that l - max is exact and the softmax sums to 1 at |l| ~ 1e4.
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        row_max = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        log_sum = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
        g_logp = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
        logp = (logits - row_max[:, None]) - log_sum[:, None]
        p = tl.exp(tl.where(valid, logp, float("-inf")))
        dl = tl.where(cols[None, :] == tgt[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
        if ENTROPY:
            entropy = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            g_entropy = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
            dl -= g_entropy[:, None] * p * (logp + entropy[:, None])
        return dl
