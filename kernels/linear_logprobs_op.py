"""The fused LM head `rto::linear_logprobs`: log-probs (and entropies) of chosen tokens from hidden states.

Each program multiplies a block of hidden rows by vocabulary tiles of the weight, adds the bias, applies the
head transform (logit multiplier, softcap, temperature: `_online_softmax`) and folds every tile into an online
log-sum-exp, so the [N, V] logits never exist. The vocabulary is split across programs when there are too few
row blocks to fill the device; the per-split partial sums are merged afterwards (a few [S, N] torch ops).

The backward goes over vocabulary chunks: a kernel recomputes the logits of a chunk and writes dL/dz for it (z
the raw logits, in the input dtype, never the full [N, V]); cuBLAS then gives the chunk's rows of dW directly
and adds its share of dH into an fp32 accumulator; the bias gradient is the chunk's column sums.
Bias and softcap are compile-time flags (HAS_BIAS, HAS_SOFTCAP): without them the kernels are the plain ones.
"""

from __future__ import annotations

import torch

from rto_kernels import _autotune
from rto_kernels._online_softmax import head_factors, incoming_grads
from rto_kernels._runtime import HAS_TRITON, interpreting, row_major

if HAS_TRITON:
    import triton
    import triton.language as tl

    from rto_kernels._online_softmax import dlogits, head_logits, head_logits_and_slope, online_update, target_logit

    @triton.jit
    def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
        if DOT_FP32:  # the interpreter's dot is wrong on bf16 operands (docs/kernels.md): compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs keep fp32 precision (Triton's default for fp32 dots is tf32)
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _raw_logits(
        h_rows,
        w_cols,
        b_cols,
        row_ok,
        col_ok,
        H,
        HAS_BIAS: tl.constexpr,
        BM: tl.constexpr,
        BV: tl.constexpr,
        BH: tl.constexpr,
        DOT_FP32: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # hidden[rows] @ weight[cols].T + bias[cols] in fp32: [BM, BV]; the bias seeds the accumulator.
        # h_rows [BM, 1] and w_cols [1, BV] point at the rows' and columns' first element, b_cols [BV].
        acc = tl.zeros([BM, BV], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        for h0 in range(0, H, BH):
            k = h0 + tl.arange(0, BH)
            k_ok = k < H
            a = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BH]
            b = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BH, BV]
            acc = _dot(a, b, acc, DOT_FP32, IEEE)
        return acc

    @triton.jit
    def _linear_fwd_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
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
        pre,
        post,
        cols_per_split,
        N_BUCKET,  # unread: the autotune key's row bucket (rto_kernels._autotune)
        ENTROPY: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
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
        h_rows = h_ptr + rows[:, None] * stride_h  # [BM, 1]
        v_start = split * cols_per_split
        v_end = tl.minimum(v_start + cols_per_split, V)
        for v0 in range(v_start, v_end, BV):
            cols = (v0 + tl.arange(0, BV)).to(tl.int64)
            col_ok = cols < v_end
            w_cols = w_ptr + cols[None, :] * stride_w  # [1, BV]
            z = _raw_logits(h_rows, w_cols, b_ptr + cols, row_ok, col_ok, H, HAS_BIAS, BM, BV, BH, DOT_FP32, IEEE)
            logits = head_logits(z, pre, post, HAS_SOFTCAP)
            tgt_logit = target_logit(tgt_logit, logits, cols, tgt, col_ok[None, :])
            m, s, t = online_update(m, s, t, logits, col_ok[None, :], ENTROPY)
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
        b_ptr,
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
        pre,
        post,
        N_BUCKET,  # unread: the autotune key's row bucket (rto_kernels._autotune)
        ENTROPY: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
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
        h_rows = h_ptr + rows[:, None] * stride_h  # [BM, 1]
        w_cols = w_ptr + cols[None, :] * stride_w  # [1, BV]
        z = _raw_logits(h_rows, w_cols, b_ptr + cols, row_ok, col_ok, H, HAS_BIAS, BM, BV, BH, DOT_FP32, IEEE)
        logits, slope = head_logits_and_slope(z, pre, post, HAS_SOFTCAP)
        in_chunk = col_ok[None, :]
        dl = dlogits(
            logits, in_chunk, cols, rows, row_ok, N, tgt_ptr, stats_ptr, g_logp_ptr, ent_ptr, g_ent_ptr, ENTROPY
        )
        dz = dl * slope  # [BM, BV]: d/dz of the raw logits
        dz_mask = row_ok[:, None] & in_chunk
        tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=dz_mask)


# ---- launch parameters ----
# The dz chunk of the backward holds [N, chunk] values in the input dtype; 256 MiB keeps it under 10% of
# an eager head's peak at N=16384, V=128256 while giving cuBLAS matmuls large enough to run at speed.
DZ_CHUNK_BYTES = 256 * 2**20


# Tiles under the interpreter: small, so that test shapes span several tiles in every dimension.
INTERPRETER_TILES = dict(BM=16, BV=32, BH=16, num_warps=1, num_stages=1)

if HAS_TRITON:
    _c = _autotune.config
    # Autotune lists (rto_kernels._autotune), by operand width; the first of each is the tuned tile, the one
    # RTO_AUTOTUNE=0 uses. Tile [BM rows, BV vocabulary columns], BH the K step. The first: BV=64, not 128: with a
    # [128, 128] tile the fp32 accumulator plus the online-softmax and dz math of the same tile sit at the
    # 255-register ceiling and spill (ragged shapes, entropy on; sm_80 and sm_90, worst in fp32), while [128, 64]
    # compiles with no spill in every variant and keeps wgmma on sm_90; fp32 operands halve the K step and take 2
    # stages (3 spill 8 B on sm_80, ragged). Every configuration passes benchmarks/compile_check.py on sm_80 and
    # sm_90 with no spill (benchmarks/results/compile_table_*.md); those that did not are listed in docs/kernels.md.
    FWD_CONFIGS = {
        "16-bit": [
            _c(8, 3, BM=128, BV=64, BH=64),
            _c(8, 4, BM=128, BV=64, BH=64),
            _c(8, 2, BM=128, BV=64, BH=128),
            _c(4, 3, BM=64, BV=64, BH=64),
            _c(8, 3, BM=64, BV=128, BH=64),
        ],
        "fp32": [
            _c(8, 2, BM=128, BV=64, BH=32),
            _c(8, 3, BM=128, BV=64, BH=16),
        ],
    }
    DZ_CONFIGS = {
        "16-bit": [
            _c(8, 3, BM=128, BV=64, BH=64),
            _c(8, 4, BM=128, BV=64, BH=64),
            _c(4, 4, BM=64, BV=64, BH=64),
            _c(8, 3, BM=64, BV=128, BH=64),
        ],
        "fp32": [
            _c(8, 2, BM=128, BV=64, BH=32),
            _c(8, 3, BM=128, BV=64, BH=16),
            _c(4, 2, BM=64, BV=64, BH=32),
            _c(8, 2, BM=64, BV=128, BH=32),
        ],
    }
    # Keys: the flags, the exact H (and V), the row bucket N_BUCKET; Triton adds the tensors' dtypes. The dz
    # kernel's vocabulary chunk follows from N and the dtype (DZ_CHUNK_BYTES).
    _linear_fwd_tuned = _autotune.autotuner(
        _linear_fwd_kernel, FWD_CONFIGS, ["N_BUCKET", "H", "V", "ENTROPY", "HAS_BIAS", "HAS_SOFTCAP"], "h_ptr"
    )
    _linear_dz_tuned = _autotune.autotuner(
        _linear_dz_kernel, DZ_CONFIGS, ["N_BUCKET", "H", "ENTROPY", "HAS_BIAS", "HAS_SOFTCAP"], "h_ptr"
    )


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


def _flags(hidden: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, with_entropy: bool) -> dict:
    """The compile-time flags of one launch (each combination is its own compiled kernel)."""
    fp32 = hidden.dtype == torch.float32
    return dict(
        ENTROPY=with_entropy,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        DOT_FP32=interpreting(),
        IEEE=fp32 and not interpreting(),
    )


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


# ---- the PyTorch ops ----


@torch.library.custom_op("rto::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp [N], entropy [N] or [0], stats [2, N]), all fp32; stats = (row max, log sum exp(l - max)),
    the log-sum-exp in two parts, kept for the backward."""
    hidden, weight = row_major(hidden), row_major(weight)
    bias = row_major(bias) if bias is not None else None
    N, H = hidden.shape
    V = weight.shape[0]
    fixed = _autotune.fixed(FWD_CONFIGS, hidden.dtype, INTERPRETER_TILES)
    # The split is sized for the first configuration's rows and the largest BV (which every BV divides), so that
    # it does not depend on the configuration the autotuner picks.
    bv = _autotune.largest(FWD_CONFIGS, hidden.dtype, INTERPRETER_TILES, "BV")
    splits, cols = _num_splits(N, V, fixed["BM"], bv, hidden.device)
    part = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)  # m, s, t, target logit
    pre, post = head_factors(logit_scale, softcap, temperature)
    if N > 0:

        def grid(meta):
            return triton.cdiv(N, meta["BM"]), splits

        args = (hidden, weight, weight if bias is None else bias, targets, *part)  # an unread bias pointer without one
        args += (N, V, H, hidden.stride(0), weight.stride(0), pre, post, cols, _autotune.n_bucket(N))
        flags = _flags(hidden, bias, softcap, with_entropy)
        if _autotune.enabled():
            _linear_fwd_tuned[grid](*args, **flags)
        else:
            _linear_fwd_kernel[grid](*args, **flags, **fixed)
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
def _(hidden, weight, targets, bias, logit_scale, softcap, temperature, with_entropy):
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
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    logit_scale: float,
    softcap: float | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_hidden [N, H], grad_weight [V, H], grad_bias [V], or [0] without a bias), in the inputs'
    dtypes."""
    hidden, weight = row_major(hidden), row_major(weight)
    bias = row_major(bias) if bias is not None else None
    N, H = hidden.shape
    V = weight.shape[0]
    fixed = _autotune.fixed(DZ_CONFIGS, hidden.dtype, INTERPRETER_TILES)
    bv = _autotune.largest(DZ_CONFIGS, hidden.dtype, INTERPRETER_TILES, "BV")  # chunks: whole tiles of every BV
    grad_w = torch.empty_like(weight)
    grad_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    grad_b = torch.empty(V if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    with_entropy = grad_entropy is not None
    g_logp = grad_logp.float().contiguous()
    g_ent = grad_entropy.float().contiguous() if with_entropy else g_logp
    pre, post = head_factors(logit_scale, softcap, temperature)
    chunk = max(bv, (DZ_CHUNK_BYTES // max(1, N * hidden.element_size())) // bv * bv)
    dz = torch.empty(N, min(chunk, V), dtype=hidden.dtype, device=hidden.device)
    flags = _flags(hidden, bias, softcap, with_entropy)
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        dz_c = dz[:, : v1 - v0]
        if N > 0:

            def grid(meta, width=v1 - v0):
                return triton.cdiv(N, meta["BM"]), triton.cdiv(width, meta["BV"])

            args = (hidden, weight, weight if bias is None else bias, targets, stats, g_logp)
            args += (entropy if with_entropy else g_logp, g_ent, dz_c, N, H, v0, v1)
            args += (hidden.stride(0), weight.stride(0), dz.stride(0), pre, post, _autotune.n_bucket(N))
            if _autotune.enabled():
                _linear_dz_tuned[grid](*args, **flags)
            else:
                _linear_dz_kernel[grid](*args, **flags, **fixed)
        torch.mm(dz_c.T, hidden, out=grad_w[v0:v1])  # [chunk, H]: these rows of dW are complete
        grad_h += _mm_fp32(dz_c, weight[v0:v1])  # [N, H]
        if bias is not None:
            torch.sum(dz_c, dim=0, dtype=torch.float32, out=grad_b[v0:v1])  # [chunk]
    grad_b = grad_b.to(bias.dtype) if bias is not None else grad_b
    return grad_h.to(hidden.dtype), grad_w, grad_b


@linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, stats, entropy, logit_scale, softcap, temperature):
    grad_b = torch.empty_like(bias) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_b


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, logit_scale, softcap, temperature, with_entropy = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, targets, bias, stats, entropy)
    ctx.head = (logit_scale, softcap, temperature)
    ctx.with_entropy = with_entropy


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, targets, bias, stats, entropy = ctx.saved_tensors
    grad_logp, grad_entropy = incoming_grads(grad_logp, grad_entropy, stats, ctx.with_entropy)
    grads = linear_logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, targets, bias, stats, entropy, *ctx.head
    )
    grad_h, grad_w, grad_b = grads
    # targets, bias (None when absent), logit_scale, softcap, temperature, with_entropy
    return grad_h, grad_w, None, grad_b if bias is not None else None, None, None, None, None


torch.library.register_autograd("rto::linear_logprobs", _backward, setup_context=_setup_context)
