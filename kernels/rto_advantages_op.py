"""Triton kernels for the per-token RL math: token rewards (KL + DPO term + score), GAE, and both fused.

One kernel serves the three ops, selected by compile-time flags, so that `rto_advantages` reads each row
once and keeps rewards in registers. One program handles one row, walking it from the right in tiles of
BLOCK_T positions. Each tile is loaded in reversed order and scanned forward (Triton's reverse scan has
had bugs) with the affine combine (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), carried across tiles:
- next value: for position t, the value of the nearest valid position strictly to its right (0 if none),
  from the elements of t + 1: valid -> (0, v), masked -> (1, 0). The product of the a's also says whether
  any valid position lies to the right, which marks a row's last valid position (where the score goes).
- advantage: valid -> (gamma * lam, delta), masked -> (1, 0), so masked positions pass the carry on.
Masked inputs are never loaded (masked loads), so NaN there cannot leak; masked outputs are stored as 0.
"""

from __future__ import annotations

import torch

from rto_kernels._checks import KL_ESTIMATORS, SHAPINGS
from rto_kernels._runtime import HAS_TRITON, interpreting, row_major

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _affine(a1, b1, a2, b2):
        # Compose x -> a1 x + b1, then x -> a2 x + b2.
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _last_of(x, idx, BLOCK: tl.constexpr):
        # The value at the end of a tile (its leftmost position), as a scalar carry.
        return tl.sum(tl.where(idx == BLOCK - 1, x, 0.0), axis=0)

    @triton.jit
    def _dpo_term(dpo_ptr, ref, pos, valid, dpo_scale, dpo_clip, HAS_DPO_CLIP: tl.constexpr):
        dpo = tl.load(dpo_ptr + pos, mask=valid, other=0.0).to(tl.float32)
        z = dpo_scale * (dpo - ref)
        if HAS_DPO_CLIP:
            z = tl.minimum(tl.maximum(z, -dpo_clip), dpo_clip)
        return tl.where(valid, z, 0.0)

    @triton.jit
    def _advantages_kernel(
        logp_ptr,
        ref_ptr,
        dpo_ptr,
        score_ptr,
        rewards_in_ptr,
        values_ptr,
        mask_ptr,
        rewards_out_ptr,
        adv_ptr,
        ret_ptr,
        T,
        kl_coef,
        dpo_scale,
        dpo_clip,
        score_clip,
        gamma,
        lam,
        COMPUTE_REWARDS: tl.constexpr,  # rewards from logp/ref/dpo/score; else read rewards_in
        STORE_REWARDS: tl.constexpr,
        DO_GAE: tl.constexpr,
        KL_EST: tl.constexpr,  # 0: k1, 1: k2, 2: k3
        SHAPING: tl.constexpr,  # 0: ppo, 1: rto, 2: rs-ppo, 3: ddpo
        HAS_DPO_CLIP: tl.constexpr,
        HAS_SCORE_CLIP: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        idx = tl.arange(0, BLOCK_T)
        n_tiles = tl.cdiv(T, BLOCK_T)

        if COMPUTE_REWARDS:
            score = tl.load(score_ptr + row).to(tl.float32)
            if HAS_SCORE_CLIP:
                score = tl.minimum(tl.maximum(score, -score_clip), score_clip)
            z_sum = 0.0
            if SHAPING >= 2:  # rs-ppo and ddpo need the row's summed DPO term before the walk starts
                for i in range(0, n_tiles):
                    t = i * BLOCK_T + idx
                    valid = (t < T) & (tl.load(mask_ptr + base + t, mask=t < T, other=0) != 0)
                    ref = tl.load(ref_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
                    z_sum += tl.sum(_dpo_term(dpo_ptr + base, ref, t, valid, dpo_scale, dpo_clip, HAS_DPO_CLIP), axis=0)

        carry_none = 1.0  # 1.0 while no valid position has been seen to the right
        carry_next_v = 0.0  # value of the nearest valid position to the right
        carry_adv = 0.0  # advantage of the nearest valid position to the right
        for i in range(0, n_tiles):
            t = T - 1 - i * BLOCK_T - idx  # reversed positions; t < 0 past the row's start
            in_row = t >= 0
            valid = in_row & (tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0)
            t1 = t + 1
            in_row1 = in_row & (t1 < T)
            valid1 = in_row1 & (tl.load(mask_ptr + base + t1, mask=in_row1, other=0) != 0)
            if DO_GAE:
                v1 = tl.load(values_ptr + base + t1, mask=valid1, other=0.0).to(tl.float32)
            else:
                v1 = tl.zeros([BLOCK_T], dtype=tl.float32)
            a_nv, b_nv = tl.associative_scan((tl.where(valid1, 0.0, 1.0), tl.where(valid1, v1, 0.0)), 0, _affine)
            none_right = a_nv * carry_none  # exact 0.0/1.0 products
            next_v = b_nv + a_nv * carry_next_v

            if COMPUTE_REWARDS:
                is_last = valid & (none_right == 1.0)
                logp = tl.load(logp_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
                ref = tl.load(ref_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
                d = logp - ref
                if KL_EST == 0:
                    kl = d
                elif KL_EST == 1:
                    kl = 0.5 * d * d
                else:
                    kl = tl.exp(-d) - 1.0 + d
                r = -kl_coef * kl
                if SHAPING == 1 or SHAPING == 2:  # rto, rs-ppo: the DPO term at every valid token
                    r += _dpo_term(dpo_ptr + base, ref, t, valid, dpo_scale, dpo_clip, HAS_DPO_CLIP)
                if SHAPING == 2:
                    r = tl.where(is_last, r - z_sum, r)
                if SHAPING == 3:
                    r = tl.where(is_last, r + z_sum, r)
                r = tl.where(is_last, r + score, r)
                r = tl.where(valid, r, 0.0)
                if STORE_REWARDS:
                    tl.store(rewards_out_ptr + base + t, r, mask=in_row)
            else:
                r = tl.load(rewards_in_ptr + base + t, mask=valid, other=0.0).to(tl.float32)

            if DO_GAE:
                v = tl.load(values_ptr + base + t, mask=valid, other=0.0).to(tl.float32)
                delta = r + gamma * next_v - v
                a_adv, b_adv = tl.associative_scan(
                    (tl.where(valid, gamma * lam, 1.0), tl.where(valid, delta, 0.0)), 0, _affine
                )
                adv = b_adv + a_adv * carry_adv
                tl.store(adv_ptr + base + t, tl.where(valid, adv, 0.0), mask=in_row)
                tl.store(ret_ptr + base + t, tl.where(valid, adv + v, 0.0), mask=in_row)
                carry_adv = _last_of(adv, idx, BLOCK_T)

            carry_none = _last_of(none_right, idx, BLOCK_T)
            carry_next_v = _last_of(next_v, idx, BLOCK_T)


def _block_t(T: int) -> int:
    # Small tiles under the interpreter so that test rows span several tiles and exercise the carries.
    cap = 16 if interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(T)))


def _launch(
    *,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    rewards_in: torch.Tensor | None = None,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    dpo_logp: torch.Tensor | None = None,
    score: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    dpo_scale: float = 0.0,
    dpo_clip: float | None = None,
    score_clip: float | None = None,
    kl_estimator: str = "k1",
    shaping: str = "ppo",
    gamma: float = 1.0,
    lam: float = 1.0,
    store_rewards: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    B, T = mask.shape
    device = mask.device
    compute_rewards = rewards_in is None
    do_gae = values is not None
    out = {
        name: torch.empty(B, T, dtype=torch.float32, device=device) if wanted else None
        for name, wanted in (("rewards", store_rewards), ("adv", do_gae), ("ret", do_gae))
    }
    # Unused pointer slots get any live tensor; the compile-time flags keep them unread.
    mask_u8 = row_major(mask).view(torch.uint8)
    dummy = mask_u8
    ins = [logp, ref_logp, dpo_logp, score, rewards_in, values]
    ins = [row_major(x) if x is not None else dummy for x in ins]
    outs = [o if o is not None else dummy for o in out.values()]
    if B > 0 and T > 0:
        _advantages_kernel[(B,)](
            *ins,
            mask_u8,
            *outs,
            T,
            float(kl_coef),
            float(dpo_scale),
            float(dpo_clip or 0.0),
            float(score_clip or 0.0),
            float(gamma),
            float(lam),
            COMPUTE_REWARDS=compute_rewards,
            STORE_REWARDS=store_rewards,
            DO_GAE=do_gae,
            KL_EST=KL_ESTIMATORS.index(kl_estimator),
            SHAPING=SHAPINGS.index(shaping),
            HAS_DPO_CLIP=dpo_clip is not None,
            HAS_SCORE_CLIP=score_clip is not None,
            BLOCK_T=_block_t(T),
        )
    else:  # nothing to compute: outputs are empty or all rows are empty
        for o in out.values():
            if o is not None:
                o.zero_()
    return out["rewards"], out["adv"], out["ret"]


# ---- PyTorch ops (custom ops with fake kernels, so torch.compile and opcheck see through them) ----


@torch.library.custom_op("rto::token_rewards", mutates_args=())
def token_rewards_op(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    dpo_scale: float,
    dpo_clip: float | None,
    score_clip: float | None,
    kl_estimator: str,
    shaping: str,
) -> torch.Tensor:
    rewards, _, _ = _launch(
        mask=mask,
        values=None,
        logp=logp,
        ref_logp=ref_logp,
        dpo_logp=dpo_logp,
        score=score,
        kl_coef=kl_coef,
        dpo_scale=dpo_scale,
        dpo_clip=dpo_clip,
        score_clip=score_clip,
        kl_estimator=kl_estimator,
        shaping=shaping,
        store_rewards=True,
    )
    return rewards


@token_rewards_op.register_fake
def _(logp, ref_logp, dpo_logp, score, mask, kl_coef, dpo_scale, dpo_clip, score_clip, kl_estimator, shaping):
    return torch.empty_like(logp, dtype=torch.float32)


@torch.library.custom_op("rto::gae", mutates_args=())
def gae_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _, adv, ret = _launch(mask=mask, values=values, rewards_in=rewards, gamma=gamma, lam=lam, store_rewards=False)
    return adv, ret


@gae_op.register_fake
def _(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards, dtype=torch.float32), torch.empty_like(rewards, dtype=torch.float32)


@torch.library.custom_op("rto::rto_advantages", mutates_args=())
def rto_advantages_op(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    dpo_scale: float,
    dpo_clip: float | None,
    score_clip: float | None,
    kl_estimator: str,
    shaping: str,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(
        mask=mask,
        values=values,
        logp=logp,
        ref_logp=ref_logp,
        dpo_logp=dpo_logp,
        score=score,
        kl_coef=kl_coef,
        dpo_scale=dpo_scale,
        dpo_clip=dpo_clip,
        score_clip=score_clip,
        kl_estimator=kl_estimator,
        shaping=shaping,
        gamma=gamma,
        lam=lam,
        store_rewards=True,
    )


@rto_advantages_op.register_fake
def _(
    logp,
    ref_logp,
    dpo_logp,
    score,
    values,
    mask,
    kl_coef,
    dpo_scale,
    dpo_clip,
    score_clip,
    kl_estimator,
    shaping,
    gamma,
    lam,
):
    return tuple(torch.empty_like(logp, dtype=torch.float32) for _ in range(3))
