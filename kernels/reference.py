"""Plain PyTorch versions of every `rto_kernels` op, with the same signatures.

They are the CPU path of the trainer and the oracle of the kernel tests, so they favour clarity over
speed and run in any floating dtype, float64 included. Outputs are float32, or float64 for float64
inputs. Mask semantics (docs/kernels.md): masked inputs never reach an output (select, never multiply),
masked outputs are exactly 0, GAE skips masked positions and the sequence score goes to a row's last
valid position.
"""

from __future__ import annotations

import torch

from rto_kernels._checks import check_advantage_inputs, check_gae_inputs, check_linear_inputs, check_logprob_inputs

__all__ = [
    "dpo_token_reward",
    "gae",
    "head_logits",
    "linear_logprobs",
    "logprobs_from_logits",
    "rto_advantages",
    "token_rewards",
]


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation and output dtype."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def head_logits(
    logits: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """The logits the softmax runs over, from a head's raw logits [N, V]: times `logit_scale`, then softcapped
    (softcap * tanh(z / softcap)) when a softcap is given, then over the temperature; in the input's dtype."""
    z = logits if logit_scale == 1.0 else logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z if temperature == 1.0 else z / temperature


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(head_logits(logits))[i, targets[i]] (and the entropy of each row).

    logits [N, V] any float dtype; targets [N] int64 in [0, V). Returns logp [N] (, entropy [N]).
    """
    check_logprob_inputs(logits, targets, temperature, logit_scale, softcap)
    scaled = head_logits(
        logits.to(_acc_dtype(logits)), logit_scale=logit_scale, softcap=softcap, temperature=temperature
    )
    logp_all = torch.log_softmax(scaled, dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    return logp, entropy


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
    """log_softmax(head_logits(hidden @ weight.T + bias))[i, targets[i]] (and entropy).

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64. The reference materialises the [N, V]
    logits in the accumulation dtype; the Triton kernel never does.
    """
    check_linear_inputs(hidden, weight, targets, temperature, bias, logit_scale, softcap)
    acc = _acc_dtype(hidden, weight)
    logits = hidden.to(acc) @ weight.to(acc).T  # [N, V]
    if bias is not None:
        logits = logits + bias.to(acc)
    head = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    return logprobs_from_logits(logits, targets, **head, return_entropy=return_entropy)


def dpo_token_reward(
    dpo_logp: torch.Tensor, ref_logp: torch.Tensor, *, scale: float, clip: float | None
) -> torch.Tensor:
    """The DPO token term clip(scale * (dpo_logp - ref_logp), -clip, clip) [B, T] (no clip when clip is None).

    fp32 (fp64 for fp64 inputs); no mask: callers select the valid positions (docs/algorithm.md).
    """
    acc = _acc_dtype(dpo_logp, ref_logp)
    z = scale * (dpo_logp.to(acc) - ref_logp.to(acc))  # [B, T]
    return z if clip is None else z.clamp(-clip, clip)


def _kl(d: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d  # k3 = exp(-d) - 1 + d


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """The last position where mask [B, T] is set, per row -> [B] long; -1 for a row with none (also when T = 0).
    The one definition of "a row's last valid position" (the trainer imports it through `rto.tensors`)."""
    if mask.shape[1] == 0:
        return torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask.bool(), pos, -1).amax(dim=1)


def last_valid_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: true only at each row's last valid position (all false for an empty row)."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    return mask.bool() & (pos == last_valid_index(mask)[:, None])


def token_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    dpo_scale: float,
    dpo_clip: float | None,
    score_clip: float | None,
    kl_estimator: str = "k1",
    shaping: str = "rto",
) -> torch.Tensor:
    """Per-token reward [B, T]: -kl_coef * KL + DPO token term (per `shaping`) + clipped score at the last token.

    logp, ref_logp, dpo_logp [B, T]; score [B]; mask [B, T] bool. The shapings: docs/algorithm.md.
    """
    check_advantage_inputs(logp, ref_logp, dpo_logp, score, mask, kl_estimator=kl_estimator, shaping=shaping)
    acc = _acc_dtype(logp, ref_logp, dpo_logp, score)
    zero = torch.zeros((), dtype=acc, device=logp.device)
    ref = ref_logp.to(acc)
    d = torch.where(mask, logp.to(acc) - ref, zero)  # [B, T]
    rewards = torch.where(mask, -kl_coef * _kl(d, kl_estimator), zero)  # [B, T]
    last = last_valid_mask(mask)  # [B, T]

    if shaping != "ppo":
        z = torch.where(mask, dpo_token_reward(dpo_logp, ref, scale=dpo_scale, clip=dpo_clip), zero)  # [B, T]
        z_sum = z.sum(dim=1, keepdim=True)  # [B, 1]
        if shaping == "rto":
            rewards = rewards + z
        elif shaping == "rs-ppo":
            rewards = rewards + z - torch.where(last, z_sum, zero)
        else:  # ddpo
            rewards = rewards + torch.where(last, z_sum, zero)

    s = score.to(acc)
    if score_clip is not None:
        s = s.clamp(-score_clip, score_clip)
    return rewards + torch.where(last, s.unsqueeze(1), zero)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid positions of each row.

    rewards, values [B, T]; mask [B, T] bool. Masked positions are skipped (carry and next value pass
    across them), the value after a row's last valid position is 0. Returns (advantages, returns) [B, T].
    This is the Python loop over time that peer trainers use; the Triton kernel replaces it.
    """
    check_gae_inputs(rewards, values, mask)
    acc = _acc_dtype(rewards, values)
    B, T = rewards.shape
    zero = torch.zeros((), dtype=acc, device=rewards.device)
    r, v = rewards.to(acc), values.to(acc)
    adv = torch.zeros(B, T, dtype=acc, device=rewards.device)
    next_value = torch.zeros(B, dtype=acc, device=rewards.device)  # value of the next valid position
    carry = torch.zeros(B, dtype=acc, device=rewards.device)  # advantage of the next valid position
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * carry
        adv[:, t] = torch.where(m, a, zero)
        carry = torch.where(m, a, carry)
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(mask, adv + v, zero)
    return adv, returns


def rto_advantages(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    dpo_logp: torch.Tensor | None,
    score: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    dpo_scale: float,
    dpo_clip: float | None,
    score_clip: float | None,
    kl_estimator: str = "k1",
    shaping: str = "rto",
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_rewards then gae. Returns (rewards, advantages, returns), each [B, T]."""
    rewards = token_rewards(
        logp,
        ref_logp,
        dpo_logp,
        score,
        mask,
        kl_coef=kl_coef,
        dpo_scale=dpo_scale,
        dpo_clip=dpo_clip,
        score_clip=score_clip,
        kl_estimator=kl_estimator,
        shaping=shaping,
    )
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    return rewards, adv, returns
