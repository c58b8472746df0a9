"""The RL math behind ``gptlab ppo``, ``rm`` and ``dpo``: pure tensor functions, no models.

Response tensors are (B, T), left-aligned at the response start and right-padded;
``mask`` (B, T), float or bool, is 1 on real response tokens and a prefix of each
row. Every reduction runs over masked elements only and padded entries never reach
an output or a gradient, whatever they hold. Everything is computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AdaptiveKLController", "KL_KINDS", "dpo_loss", "entropy_from_logits", "gae", "kl_penalty",
    "masked_mean", "masked_var", "masked_whiten", "per_token_rewards", "ppo_policy_loss",
    "ranking_loss", "token_logprobs", "value_loss",
]

KL_KINDS = ("k1", "k2", "k3")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x in float32 with padded entries set to 0, so even inf there cannot leak into a result or gradient."""
    return torch.where(mask.bool(), x.float(), 0.0)


def _scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in float32, dividing a fresh float32 copy in place rather than making a second."""
    _positive("temperature", temperature)
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature if x is logits else x.div_(temperature)
    return x


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at ``targets``: (B, T, V), (B, T) -> (B, T) float32.

    Computed as gathered logit - logsumexp, so no (B, T, V) log-softmax is materialised.
    """
    x = _scaled_logits(logits, temperature)
    picked = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature): (B, T, V) -> (B, T), as logsumexp(x) - E_p[x]."""
    x = _scaled_logits(logits, temperature)
    return torch.logsumexp(x, dim=-1) - (torch.softmax(x, dim=-1) * x).sum(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over ``dim`` (None: everything); an empty row or total gives 0, not NaN."""
    m = mask.bool()
    if dim is None:
        return _masked(x, m).sum() / m.sum().clamp(min=1)
    return _masked(x, m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements; 0 when there are too few of them (none, or one if unbiased)."""
    m = mask.bool()
    n = m.sum()
    sq = _masked(x - masked_mean(x, m), m).square().sum()
    return sq / ((n - 1) if unbiased else n).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked elements, 0 at padding.

    ``shift_mean=False`` adds the mean back: rewards are rescaled but keep their sign and offset.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    return _masked(out if shift_mean else out + mean, mask)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3).

    k1 = log r is unbiased but can go negative; k2 = (log r)^2 / 2 is biased, low variance;
    k3 = 1/r - 1 + log r (r = pi / pi_ref) is unbiased and never negative.
    """
    d = logp.float() - ref_logp.float()  # log(pi / pi_ref)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")


def per_token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float,
                      kind: str = "k1") -> tuple[Tensor, Tensor]:
    """InstructGPT / Ziegler et al. rewards: -kl_coef * kl_t per token, plus ``score`` (B,) on the last real token.

    Returns (rewards, kl), both (B, T) and 0 at padding. A row with no real tokens has
    nowhere to put its score, so it gets none: all its rewards are 0.
    """
    m = mask.bool()
    kl = _masked(kl_penalty(_masked(logp, m), _masked(ref_logp, m), kind), m)
    length = m.sum(1)  # (B,)
    last = F.one_hot((length - 1).clamp(min=0), m.shape[1]).bool() & (length > 0).unsqueeze(1)  # (B, T)
    return -kl_coef * kl + torch.where(last, score.float().unsqueeze(1), 0.0), kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation per row; the value after the last real token is 0 (episode ends).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), (B, T), detached (they are
    targets), 0 at padding.
    """
    _unit("gamma", gamma)
    _unit("lam", lam)
    m = mask.bool()
    r, v = _masked(rewards.detach(), m), _masked(values.detach(), m)
    next_v = next_a = torch.zeros_like(r[:, 0])  # (B,)
    advs = []
    for t in reversed(range(r.shape[1])):
        # padding has v = 0 and A = 0, so the first padded step already acts as the terminal state
        next_a = torch.where(m[:, t], r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a, 0.0)
        next_v = v[:, t]
        advs.append(next_a)
    adv = torch.stack(advs[::-1], dim=1)
    return adv, adv + v


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, masked_mean(max(-A r, -A clip(r, 1-eps, 1+eps))) with r = pi / pi_old.

    Stats (detached): ``clip_frac``, the share of tokens whose clipped term is the one
    used (strictly larger); ``approx_kl``, masked_mean((log r)^2 / 2).
    """
    _positive("clip_range", clip_range)
    m = mask.bool()
    log_ratio = _masked(logp - old_logp.detach(), m)  # zeroed before exp so padding cannot overflow
    ratio, adv = torch.exp(log_ratio), _masked(advantages.detach(), m)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    stats = {"clip_frac": masked_mean((clipped > unclipped).float(), m).detach(),
             "approx_kl": masked_mean(0.5 * log_ratio.square(), m).detach()}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, 0.5 masked_mean(max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2)).

    Stats (detached): ``vf_clip_frac``, the share of tokens where the clipped error is strictly larger.
    """
    _positive("clip_range", clip_range)
    m = mask.bool()
    v, old_v, ret = _masked(values, m), _masked(old_values.detach(), m), _masked(returns.detach(), m)
    v_clipped = old_v + (v - old_v).clamp(-clip_range, clip_range)
    err, err_clipped = (v - ret).square(), (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), m)
    return loss, {"vf_clip_frac": masked_mean((err_clipped > err).float(), m).detach()}


def ranking_loss(scores: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """InstructGPT reward-model loss over all C(K_g, 2) pairs of each group, in one batch element per group.

    ``scores`` (G, K) are ordered best -> worst; ``valid`` (G, K) is a prefix per row.
    loss = mean_g [-1/C(K_g, 2) sum_{i<j<K_g} log sigmoid(s_gi - s_gj)], averaged over the
    groups with at least one pair (all-invalid padding groups are ignored). Also returns
    (correct, total): pairs ranked strictly right and pairs counted, detached floats, so
    accuracy aggregates exactly across batches.
    """
    ok = valid.bool()
    s = _masked(scores, ok)
    k = s.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=s.device).triu(1)
    pairs = upper & ok.unsqueeze(2) & ok.unsqueeze(1)  # (G, K, K): i < j, both valid
    diff = s.unsqueeze(2) - s.unsqueeze(1)  # (G, K, K): s_i - s_j
    n_pairs = pairs.sum((1, 2))  # (G,)
    group_loss = -torch.where(pairs, F.logsigmoid(diff), 0.0).sum((1, 2)) / n_pairs.clamp(min=1)
    loss = masked_mean(group_loss, n_pairs > 0)
    correct = (pairs & (diff > 0)).sum().float()
    return loss, correct.detach(), n_pairs.sum().float().detach()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al. 2023) on summed sequence log-probs (N,): mean(-log sigmoid(beta (dc - dr))).

    The implicit rewards beta * (log pi - log pi_ref) are reported (detached) as stats.
    """
    _positive("beta", beta)
    chosen = beta * (policy_chosen.float() - ref_chosen.float().detach())
    rejected = beta * (policy_rejected.float() - ref_rejected.float().detach())
    margin = chosen - rejected
    stats = {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
             "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}
    return -F.logsigmoid(margin).mean(), {name: value.detach() for name, value in stats.items()}


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller: nudges ``kl_coef`` so the measured KL tracks ``target``.

    The error is clipped to +-0.2, so one update moves the coefficient by at most 20% x n_steps / horizon.
    """

    kl_coef: float
    target: float
    horizon: int = 10000

    def __post_init__(self) -> None:
        _positive("target", self.target)
        _positive("horizon", self.horizon)
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update after ``n_steps`` samples with mean KL ``current_kl``; returns the new coefficient."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef
