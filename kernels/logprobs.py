"""Triton kernels for per-token log-probs (and entropies) of chosen tokens, with their backward.

`linear_logprobs` fuses the LM head: each program multiplies a block of hidden rows by vocabulary tiles
of the weight and folds every tile into an online log-sum-exp, so the [N, V] logits never exist. The
vocabulary is split across programs when there are too few row blocks to fill the device; the per-split
partial sums are merged afterwards (a few [S, N] torch ops).

The online state per row is (m, s, t): running max, sum exp(l - m), and sum exp(l - m) * (l - m). Keeping
t relative to the running max gives the entropy log(s) - t/s without the cancellation of lse - E[l]
at logits of magnitude 1e4.

Backward of `linear_logprobs` goes over vocabulary chunks: a kernel recomputes the logits of a chunk and
writes dL/dlogits for it (in the input dtype, never the full [N, V]); cuBLAS then gives the chunk's rows
of dW directly and adds its share of dH into an fp32 accumulator.
"""

from __future__ import annotations

import torch

from rto_kernels._runtime import HAS_TRITON, interpreting, row_major

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
        if DOT_FP32:  # the interpreter's dot is wrong on bf16 operands (DESIGN.md): compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs keep fp32 precision (Triton's default for fp32 dots is tf32)
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _online_update(m, s, t, logits, valid, ENTROPY: tl.constexpr):
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
    def _dlogits(
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
        inv_temp,
        ENTROPY: tl.constexpr,
    ):
        # d/dz of g_logp * logp_target + g_entropy * entropy for one [BM, BV] tile, logits l = z * inv_temp.
        # The log-sum-exp comes as (row max, log sum) so that l - max is exact and the softmax sums to 1 at
        # |l| ~ 1e4.
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
        return dl * inv_temp

    @triton.jit
    def _logits_tile(
        h_ptr,
        w_ptr,
        rows,
        row_ok,
        cols,
        col_ok,
        H,
        stride_h,
        stride_w,
        BM: tl.constexpr,
        BV: tl.constexpr,
        BH: tl.constexpr,
        DOT_FP32: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # hidden[rows] @ weight[cols].T in fp32: [BM, BV]
        acc = tl.zeros([BM, BV], dtype=tl.float32)
        for h0 in range(0, H, BH):
            k = h0 + tl.arange(0, BH)
            k_ok = k < H
            a = tl.load(
                h_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )  # [BM, BH]
            b = tl.load(
                w_ptr + cols[None, :] * stride_w + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0
            )  # [BH, BV]
            acc = _dot(a, b, acc, DOT_FP32, IEEE)
        return acc

    @triton.jit
    def _linear_fwd_kernel(
        h_ptr,
        w_ptr,
        tgt_ptr,
        m_ptr,
        s_ptr,
        t_ptr,
        tgt_logit_ptr,
        N,
        V,
        H,
        stride_h,
        stride_w,
        inv_temp,
        cols_per_split,
        ENTROPY: tl.constexpr,
        DOT_FP32: tl.constexpr,
        IEEE: tl.constexpr,
        BM: tl.constexpr,
        BV: tl.constexpr,
        BH: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = (pid_n * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        m = tl.full([BM], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BM], dtype=tl.float32)
        t = tl.zeros([BM], dtype=tl.float32)
        tgt_logit = tl.full([BM], float("-inf"), dtype=tl.float32)
        v_start = split * cols_per_split
        v_end = tl.minimum(v_start + cols_per_split, V)
        for v0 in range(v_start, v_end, BV):
            cols = (v0 + tl.arange(0, BV)).to(tl.int64)
            col_ok = cols < v_end
            logits = (
                _logits_tile(
                    h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, BM, BV, BH, DOT_FP32, IEEE
                )
                * inv_temp
            )
            hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
            tgt_logit = tl.maximum(tgt_logit, tl.max(tl.where(hit, logits, float("-inf")), axis=1))
            m, s, t = _online_update(m, s, t, logits, col_ok[None, :], ENTROPY)
        out = split * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(tgt_logit_ptr + out, tgt_logit, mask=row_ok)
        if ENTROPY:
            tl.store(t_ptr + out, t, mask=row_ok)

    @triton.jit
    def _linear_dz_kernel(
        h_ptr,
        w_ptr,
        tgt_ptr,
        stats_ptr,
        g_logp_ptr,
        ent_ptr,
        g_ent_ptr,
        dz_ptr,
        N,
        H,
        v_start,
        v_end,
        stride_h,
        stride_w,
        stride_dz,
        inv_temp,
        ENTROPY: tl.constexpr,
        DOT_FP32: tl.constexpr,
        IEEE: tl.constexpr,
        BM: tl.constexpr,
        BV: tl.constexpr,
        BH: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < N
        local = (tl.program_id(1) * BV + tl.arange(0, BV)).to(tl.int64)  # column inside the chunk
        cols = v_start + local
        col_ok = cols < v_end
        logits = (
            _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, BM, BV, BH, DOT_FP32, IEEE)
            * inv_temp
        )
        dz = _dlogits(
            logits,
            col_ok[None, :],
            cols,
            rows,
            row_ok,
            N,
            tgt_ptr,
            stats_ptr,
            g_logp_ptr,
            ent_ptr,
            g_ent_ptr,
            inv_temp,
            ENTROPY,
        )
        tl.store(
            dz_ptr + rows[:, None] * stride_dz + local[None, :],
            dz.to(dz_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )

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
        inv_temp,
        ENTROPY: tl.constexpr,
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
            logits = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
            logits = logits.to(tl.float32) * inv_temp
            hit = (cols[None, :] == tgt[:, None]) & col_ok
            tgt_logit = tl.maximum(tgt_logit, tl.max(tl.where(hit, logits, float("-inf")), axis=1))
            m, s, t = _online_update(m, s, t, logits, col_ok, ENTROPY)
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
        inv_temp,
        ENTROPY: tl.constexpr,
        BM: tl.constexpr,
        BV: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < N
        cols = (tl.program_id(1) * BV + tl.arange(0, BV)).to(tl.int64)
        valid = row_ok[:, None] & (cols < V)[None, :]
        logits = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=valid, other=0.0)
        logits = logits.to(tl.float32) * inv_temp
        dx = _dlogits(
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
            inv_temp,
            ENTROPY,
        )
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=valid)


# ---- launch parameters ----
# The dz chunk of the backward holds [N, chunk] values in the input dtype; 256 MiB keeps it under 10% of
# an eager head's peak at N=16384, V=128256 while giving cuBLAS matmuls large enough to run at speed.
DZ_CHUNK_BYTES = 256 * 2**20


def _linear_blocks(dtype: torch.dtype) -> dict:
    if interpreting():  # small tiles: test shapes span several tiles in every dimension
        return dict(BM=16, BV=32, BH=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # 4-byte operands: halve the K tile to stay within shared memory
        return dict(BM=128, BV=128, BH=32, num_warps=8, num_stages=3)
    return dict(BM=128, BV=128, BH=64, num_warps=8, num_stages=3)


def _logits_blocks() -> dict:
    if interpreting():
        return dict(BM=4, BV=64, num_warps=1)
    return dict(BM=4, BV=1024, num_warps=8)


def _num_splits(N: int, V: int, BM: int, BV: int, device: torch.device) -> tuple[int, int]:
    """How many vocabulary splits to give each row block, and the columns per split (a multiple of BV)."""
    row_blocks = triton.cdiv(N, BM)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: a few splits, so the merge is exercised
    splits = max(1, min(triton.cdiv(V, BV), triton.cdiv(target, row_blocks)))
    cols = triton.cdiv(triton.cdiv(V, splits), BV) * BV
    return triton.cdiv(V, cols), cols


def _dot_flags(x: torch.Tensor) -> dict:
    return dict(DOT_FP32=interpreting(), IEEE=x.dtype == torch.float32 and not interpreting())


# aten::mm.dtype (low-precision operands, fp32 result) exists in recent PyTorch, on CUDA only.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation) for low-precision operands."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.is_cuda:  # older PyTorch: fp32 accumulation inside cuBLAS, rounded once per chunk
        return (a @ b).float()
    return a.float() @ b.float()


# ---- linear_logprobs as a PyTorch op ----


@torch.library.custom_op("rto::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp [N], entropy [N] or [0], stats [2, N]), all fp32; stats = (row max, log sum exp(l - max)),
    the log-sum-exp in two parts, kept for the backward."""
    hidden, weight = row_major(hidden), row_major(weight)
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _linear_blocks(hidden.dtype)
    splits, cols = _num_splits(N, V, cfg["BM"], cfg["BV"], hidden.device)
    part = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)  # m, s, t, target logit
    if N > 0:
        _linear_fwd_kernel[(triton.cdiv(N, cfg["BM"]), splits)](
            hidden,
            weight,
            targets,
            part[0],
            part[1],
            part[2],
            part[3],
            N,
            V,
            H,
            hidden.stride(0),
            weight.stride(0),
            1.0 / temperature,
            cols,
            ENTROPY=with_entropy,
            **_dot_flags(hidden),
            **cfg,
        )
    m, s, t, tgt_logit = part.unbind(0)  # each [S, N]
    m_max = m.amax(0)  # [N]
    w = torch.exp(m - m_max)  # [S, N]
    s_tot = (w * s).sum(0)
    log_sum = torch.log(s_tot)
    logp = (tgt_logit.amax(0) - m_max) - log_sum
    if with_entropy:
        t_tot = (w * (t + (m - m_max) * s)).sum(0)
        entropy = log_sum - t_tot / s_tot
    else:
        entropy = hidden.new_empty(0, dtype=torch.float32)
    return logp, entropy, torch.stack([m_max, log_sum])


@linear_logprobs_op.register_fake
def _(hidden, weight, targets, temperature, with_entropy):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(N, **f32), hidden.new_empty(N if with_entropy else 0, **f32), hidden.new_empty(2, N, **f32)


@torch.library.custom_op("rto::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_hidden [N, H], grad_weight [V, H]) in the input dtype."""
    hidden, weight = row_major(hidden), row_major(weight)
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _linear_blocks(hidden.dtype)
    grad_w = torch.empty_like(weight)
    grad_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    with_entropy = grad_entropy is not None
    g_logp = grad_logp.float().contiguous()
    g_ent = grad_entropy.float().contiguous() if with_entropy else g_logp
    chunk = max(cfg["BV"], (DZ_CHUNK_BYTES // max(1, N * hidden.element_size())) // cfg["BV"] * cfg["BV"])
    dz = torch.empty(N, min(chunk, V), dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        dz_c = dz[:, : v1 - v0]
        if N > 0:
            _linear_dz_kernel[(triton.cdiv(N, cfg["BM"]), triton.cdiv(v1 - v0, cfg["BV"]))](
                hidden,
                weight,
                targets,
                stats,
                g_logp,
                entropy if with_entropy else g_logp,
                g_ent,
                dz_c,
                N,
                H,
                v0,
                v1,
                hidden.stride(0),
                weight.stride(0),
                dz.stride(0),
                1.0 / temperature,
                ENTROPY=with_entropy,
                **_dot_flags(hidden),
                **cfg,
            )
        torch.mm(dz_c.T, hidden, out=grad_w[v0:v1])  # [chunk, H]: these rows of dW are complete
        grad_h += _mm_fp32(dz_c, weight[v0:v1])  # [N, H]
    return grad_h.to(hidden.dtype), grad_w


@linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, stats, entropy, temperature):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _save_for_backward(ctx, inputs, output):
    *tensors, temperature, with_entropy = inputs  # (hidden, weight, targets) or (logits, targets)
    _, entropy, stats = output
    ctx.save_for_backward(*tensors, stats, entropy)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy


def _backward_through(backward_op):
    """The autograd backward of a log-prob op: its saved tensors through `backward_op`."""

    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        *tensors, stats, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(stats[0])
        grad_entropy = grad_entropy if ctx.with_entropy else None
        grads = backward_op(grad_logp, grad_entropy, *tensors, stats, entropy, ctx.temperature)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return (*grads, None, None, None)  # targets, temperature, with_entropy

    return backward


torch.library.register_autograd(
    "rto::linear_logprobs", _backward_through(linear_logprobs_backward_op), setup_context=_save_for_backward
)


# ---- logprobs_from_logits as a PyTorch op ----


@torch.library.custom_op("rto::logprobs_from_logits", mutates_args=())
def logprobs_from_logits_op(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp [N], entropy [N] or [0], stats [2, N]), all fp32, as for linear_logprobs."""
    logits = row_major(logits)
    N, V = logits.shape
    cfg = _logits_blocks()
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    stats = torch.empty(2, N, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if N > 0:
        _logits_fwd_kernel[(triton.cdiv(N, cfg["BM"]),)](
            logits,
            targets,
            logp,
            stats,
            entropy if with_entropy else logp,
            N,
            V,
            logits.stride(0),
            1.0 / temperature,
            ENTROPY=with_entropy,
            **cfg,
        )
    return logp, entropy, stats


@logprobs_from_logits_op.register_fake
def _(logits, targets, temperature, with_entropy):
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
    temperature: float,
) -> torch.Tensor:
    """Returns grad_logits [N, V] in the logits' dtype, computed tile by tile (no fp32 copy of the logits)."""
    logits = row_major(logits)
    N, V = logits.shape
    cfg = _logits_blocks()
    grad = torch.empty_like(logits)
    with_entropy = grad_entropy is not None
    g_logp = grad_logp.float().contiguous()
    g_ent = grad_entropy.float().contiguous() if with_entropy else g_logp
    if N > 0:
        _logits_bwd_kernel[(triton.cdiv(N, cfg["BM"]), triton.cdiv(V, cfg["BV"]))](
            logits,
            targets,
            stats,
            g_logp,
            entropy if with_entropy else g_logp,
            g_ent,
            grad,
            N,
            V,
            logits.stride(0),
            grad.stride(0),
            1.0 / temperature,
            ENTROPY=with_entropy,
            **cfg,
        )
    return grad


@logprobs_from_logits_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, targets, stats, entropy, temperature):
    return torch.empty_like(logits)


torch.library.register_autograd(
    "rto::logprobs_from_logits", _backward_through(logprobs_from_logits_backward_op), setup_context=_save_for_backward
)
