"""`rto::logprobs_from_logits`: log-probs (and entropies) of chosen tokens for callers that already hold logits.

The forward walks each block of rows over vocabulary tiles into an online log-sum-exp; the backward writes
grad_logits tile by tile in the logits' dtype, with no fp32 copy of the logits. The head transform (logit
multiplier, softcap, temperature: `_online_softmax`) is applied to each tile as it is loaded, for callers holding
the raw logits of a family that scales or softcaps them.
"""

from __future__ import annotations

import torch

from rto_kernels import _autotune
from rto_kernels._online_softmax import head_factors, incoming_grads
from rto_kernels._runtime import HAS_TRITON, row_major

if HAS_TRITON:
    import triton
    import triton.language as tl

    from rto_kernels._online_softmax import dlogits, head_logits, head_logits_and_slope, online_update, target_logit

    @triton.jit
    def _logits_fwd_kernel(
        x_ptr,
        tgt_ptr,
        logp_ptr,
        stats_ptr,
        ent_ptr,
        N,
        V,
        stride_x,
        pre,
        post,
        N_BUCKET,  # unread: the autotune key's row bucket (rto_kernels._autotune)
        ENTROPY: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BM: tl.constexpr,
        BV: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        m = tl.full([BM], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BM], dtype=tl.float32)
        t = tl.zeros([BM], dtype=tl.float32)
        tgt_logit = tl.full([BM], float("-inf"), dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = (v0 + tl.arange(0, BV)).to(tl.int64)
            col_ok = (cols < V)[None, :]
            # rows past N read zeros (finite), so no -inf - -inf arises in their discarded state
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
            logits = head_logits(x.to(tl.float32), pre, post, HAS_SOFTCAP)
            tgt_logit = target_logit(tgt_logit, logits, cols, tgt, col_ok)
            m, s, t = online_update(m, s, t, logits, col_ok, ENTROPY)
        log_s = tl.log(s)
        tl.store(logp_ptr + rows, (tgt_logit - m) - log_s, mask=row_ok)
        tl.store(stats_ptr + rows, m, mask=row_ok)
        tl.store(stats_ptr + N + rows, log_s, mask=row_ok)
        if ENTROPY:
            tl.store(ent_ptr + rows, log_s - t / s, mask=row_ok)

    @triton.jit
    def _logits_bwd_kernel(
        x_ptr,
        tgt_ptr,
        stats_ptr,
        g_logp_ptr,
        ent_ptr,
        g_ent_ptr,
        dx_ptr,
        N,
        V,
        stride_x,
        stride_dx,
        pre,
        post,
        N_BUCKET,  # unread: the autotune key's row bucket (rto_kernels._autotune)
        ENTROPY: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BM: tl.constexpr,
        BV: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < N
        cols = (tl.program_id(1) * BV + tl.arange(0, BV)).to(tl.int64)
        valid = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=valid, other=0.0)
        logits, slope = head_logits_and_slope(x.to(tl.float32), pre, post, HAS_SOFTCAP)
        dl = dlogits(logits, valid, cols, rows, row_ok, N, tgt_ptr, stats_ptr, g_logp_ptr, ent_ptr, g_ent_ptr, ENTROPY)
        dx = dl * slope  # [BM, BV]
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=valid)


# Tiles under the interpreter: small, so that test shapes span several tiles.
INTERPRETER_TILES = dict(BM=4, BV=64, num_warps=1, num_stages=1)

if HAS_TRITON:
    _c = _autotune.config
    # Autotune lists (rto_kernels._autotune), by the logits' width; the first is the tuned tile, the one
    # RTO_AUTOTUNE=0 uses. Tile [BM rows, BV columns]; both kernels stream the logits once, so the lists trade rows
    # against columns at 2-8K elements a tile. Every configuration passes benchmarks/compile_check.py on sm_80 and
    # sm_90 with no spill; [16, 512] spills 12 B in the fp32 forward on sm_90 (entropy and softcap on), so the fp32
    # forward goes without it (docs/kernels.md lists what was left out).
    _LOGITS = [
        _c(8, 3, BM=4, BV=1024),
        _c(8, 3, BM=8, BV=1024),
        _c(8, 3, BM=2, BV=2048),
        _c(4, 3, BM=2, BV=1024),
        _c(8, 3, BM=16, BV=512),
    ]
    FWD_CONFIGS = {"16-bit": _LOGITS, "fp32": _LOGITS[:4]}
    BWD_CONFIGS = {"16-bit": _LOGITS, "fp32": _LOGITS}
    # Keys: the flags, the exact V, the row bucket N_BUCKET; Triton adds the tensors' dtypes.
    _logits_fwd_tuned = _autotune.autotuner(
        _logits_fwd_kernel, FWD_CONFIGS, ["N_BUCKET", "V", "ENTROPY", "HAS_SOFTCAP"], "x_ptr"
    )
    _logits_bwd_tuned = _autotune.autotuner(
        _logits_bwd_kernel, BWD_CONFIGS, ["N_BUCKET", "V", "ENTROPY", "HAS_SOFTCAP"], "x_ptr"
    )


@torch.library.custom_op("rto::logprobs_from_logits", mutates_args=())
def logprobs_from_logits_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp [N], entropy [N] or [0], stats [2, N]), all fp32, as for linear_logprobs."""
    logits = row_major(logits)
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty(2, N, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=logits.device)
    pre, post = head_factors(logit_scale, softcap, temperature)
    if N > 0:

        def grid(meta):
            return (triton.cdiv(N, meta["BM"]),)

        args = (logits, targets, logp, stats, entropy if with_entropy else logp, N, V, logits.stride(0), pre, post)
        args += (_autotune.n_bucket(N),)
        flags = dict(ENTROPY=with_entropy, HAS_SOFTCAP=softcap is not None)
        if _autotune.enabled():
            _logits_fwd_tuned[grid](*args, **flags)
        else:
            _logits_fwd_kernel[grid](*args, **flags, **_autotune.fixed(FWD_CONFIGS, logits.dtype, INTERPRETER_TILES))
    return logp, entropy, stats


@logprobs_from_logits_op.register_fake
def _(logits, targets, logit_scale, softcap, temperature, with_entropy):
    N = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return logits.new_empty(N, **f32), logits.new_empty(N if with_entropy else 0, **f32), logits.new_empty(2, N, **f32)


@torch.library.custom_op("rto::logprobs_from_logits_backward", mutates_args=())
def logprobs_from_logits_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    """Returns grad_logits [N, V] in the logits' dtype, computed tile by tile (no fp32 copy of the logits)."""
    logits = row_major(logits)
    N, V = logits.shape
    grad = torch.empty_like(logits)
    with_entropy = grad_entropy is not None
    g_logp = grad_logp.float().contiguous()
    g_ent = grad_entropy.float().contiguous() if with_entropy else g_logp
    pre, post = head_factors(logit_scale, softcap, temperature)
    if N > 0:

        def grid(meta):
            return triton.cdiv(N, meta["BM"]), triton.cdiv(V, meta["BV"])

        args = (logits, targets, stats, g_logp, entropy if with_entropy else g_logp, g_ent, grad, N, V)
        args += (logits.stride(0), grad.stride(0), pre, post, _autotune.n_bucket(N))
        flags = dict(ENTROPY=with_entropy, HAS_SOFTCAP=softcap is not None)
        if _autotune.enabled():
            _logits_bwd_tuned[grid](*args, **flags)
        else:
            _logits_bwd_kernel[grid](*args, **flags, **_autotune.fixed(BWD_CONFIGS, logits.dtype, INTERPRETER_TILES))
    return grad


@logprobs_from_logits_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, targets, stats, entropy, logit_scale, softcap, temperature):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, logit_scale, softcap, temperature, with_entropy = inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, targets, stats, entropy)
    ctx.head = (logit_scale, softcap, temperature)
    ctx.with_entropy = with_entropy


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, targets, stats, entropy = ctx.saved_tensors
    grad_logp, grad_entropy = incoming_grads(grad_logp, grad_entropy, stats, ctx.with_entropy)
    grad = logprobs_from_logits_backward_op(grad_logp, grad_entropy, logits, targets, stats, entropy, *ctx.head)
    return grad, None, None, None, None, None  # targets, logit_scale, softcap, temperature, with_entropy


torch.library.register_autograd("rto::logprobs_from_logits", _backward, setup_context=_setup_context)
