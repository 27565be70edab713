"""`linear_logprobs` for devices without Triton (the trainer's CPU path): rows in chunks, recompute in backward.

The Triton kernel tiles the vocabulary; this path tiles the rows instead, with plain matmuls, so it runs
anywhere PyTorch does. Each chunk of rows gets its [rows, V] logits (at most `CHUNK_BYTES`), its log-sum-exp,
target log-prob and entropy, and the logits are dropped; only the per-row log-sum-exp is kept for the backward,
which recomputes each chunk's logits and accumulates grad_weight in fp32. Peak extra memory: one chunk of
logits (and, with gradients, an fp32 [V, H] accumulator), instead of the reference's [N, V] logits and their
log-softmax. Accumulation is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs. The oracle stays
`rto_kernels.reference.linear_logprobs`; the tests check this path against it in fp64.
"""

from __future__ import annotations

import torch

from rto_kernels._checks import check_linear_inputs
from rto_kernels.reference import head_logits

CHUNK_BYTES = 16 * 2**20  # fp32 logits per chunk


def _rows_per_chunk(vocab: int, acc: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (vocab * torch.finfo(acc).bits // 8))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, weight_acc: torch.Tensor, bias_acc: torch.Tensor | None, head: dict) -> torch.Tensor:
    """The logits [rows, V] the softmax runs over, in the accumulation dtype (bf16 logits would lose 3 digits)."""
    z = h.to(weight_acc.dtype) @ weight_acc.T
    if bias_acc is not None:
        z += bias_acc
    return head_logits(z, **head)


def _to_raw_grad_(dl: torch.Tensor, logits: torch.Tensor, head: dict) -> torch.Tensor:
    """dL/dl -> dL/dz in place, through the head transform at logits l [rows, V]: times 1 - tanh^2 under a
    softcap (tanh = l * T / softcap, read back from the logits), times logit_scale, over T."""
    scale, softcap, t = head["logit_scale"], head["softcap"], head["temperature"]
    if softcap is not None:
        th = logits * (t / softcap)
        dl *= 1.0 - th * th
    if scale != 1.0:
        dl *= scale
    return dl if t == 1.0 else dl.div_(t)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, head, return_entropy):
        acc = _acc(hidden.dtype)
        N, V = hidden.shape[0], weight.shape[0]
        step = _rows_per_chunk(V, acc)
        weight_acc = weight.to(acc)  # one copy per call for bf16/fp16 weights; none for fp32/fp64
        bias_acc = bias.to(acc) if bias is not None else None
        logp = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        entropy = torch.empty(N, dtype=acc, device=hidden.device) if return_entropy else None
        for i in range(0, N, step):
            z = _logits(hidden[i : i + step], weight_acc, bias_acc, head)  # [rows, V]
            lse[i : i + step] = s = torch.logsumexp(z, dim=-1)
            logp[i : i + step] = z.gather(-1, targets[i : i + step, None]).squeeze(-1) - s
            if return_entropy:
                entropy[i : i + step] = s - (torch.softmax(z, dim=-1) * z).sum(-1)  # H = lse - E_p[z]
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.head = head
        if entropy is None:
            entropy = lse.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        acc, head = lse.dtype, ctx.head
        N, V = hidden.shape[0], weight.shape[0]
        step = _rows_per_chunk(V, acc)
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if want_b else None
        weight_acc = weight.to(acc)
        bias_acc = bias.to(acc) if bias is not None else None
        with_entropy = grad_entropy is not None and grad_entropy.numel() == N
        for i in range(0, N, step):
            rows = slice(i, i + step)
            z = _logits(hidden[rows], weight_acc, bias_acc, head)
            p = torch.exp(z - lse[rows, None])  # softmax
            g = grad_logp[rows].to(acc) if grad_logp is not None else torch.zeros_like(lse[rows])
            # d logp_target / dl = onehot(target) - p; dz holds dL/dl until the head transform's slope
            dz = p * -g[:, None]
            dz.scatter_add_(-1, targets[rows, None], g[:, None])
            if with_entropy:  # dH/dl_j = -p_j (log p_j + H), log p_j = l_j - lse, H = lse - sum p l
                ent = lse[rows] - (p * z).sum(-1)
                dz -= grad_entropy[rows].to(acc)[:, None] * p * (z - lse[rows, None] + ent[:, None])
            dz = _to_raw_grad_(dz, z, head)  # d/dz of the raw logits (matmul + bias)
            if want_w:
                grad_w.addmm_(dz.T, hidden[rows].to(acc))
            if want_h:
                grad_h[rows] = dz @ weight_acc
            if want_b:
                grad_b += dz.sum(0)
        grad_w = grad_w.to(weight.dtype) if want_w else None
        grad_b = grad_b.to(bias.dtype) if want_b else None
        return grad_h, grad_w, None, grad_b, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `rto_kernels.linear_logprobs` (fp32 outputs; fp64 for fp64 inputs)."""
    check_linear_inputs(hidden, weight, targets, temperature, bias, logit_scale, softcap)
    head = dict(logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap))
    head["temperature"] = float(temperature)
    logp, entropy = _LinearLogprobs.apply(hidden, weight, targets, bias, head, bool(return_entropy))
    return (logp, entropy) if return_entropy else logp
