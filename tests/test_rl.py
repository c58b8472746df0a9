"""RLHF math (PPO, reward model, DPO) against values worked out by hand, plus masking and gradient properties."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.rl import (
    AdaptiveKLController, dpo_loss, entropy_from_logits, gae, kl_penalty, masked_mean, masked_var,
    masked_whiten, per_token_rewards, ppo_policy_loss, ranking_loss, token_logprobs, value_loss,
)

TOL = 1e-6


def close(actual: torch.Tensor, expected, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=tol, atol=tol)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def pad_with(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ------------------------------------------------------------------ log-probs and entropy
def test_token_logprobs_hand_values_and_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[2, 1]])
    lse = math.log(math.e + math.e ** 2 + math.e ** 3)
    close(token_logprobs(logits, targets), [[3.0 - lse, -math.log(3.0)]])
    lse_t2 = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))  # logits / 2
    close(token_logprobs(logits, targets, temperature=2.0), [[1.5 - lse_t2, -math.log(3.0)]])


def test_token_logprobs_matches_log_softmax_and_is_float32():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    for temp in (1.0, 0.7):
        expected = torch.log(torch.softmax(logits / temp, dim=-1)).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        close(token_logprobs(logits, targets, temp), expected, 1e-5)
    low = token_logprobs(logits.bfloat16(), targets, 0.7)
    assert low.dtype == torch.float32
    close(low, token_logprobs(logits.bfloat16().float(), targets, 0.7))


def test_token_logprobs_leaves_float32_logits_untouched():
    logits = torch.randn(1, 2, 4)
    before = logits.clone()
    token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long), temperature=3.0)
    token_logprobs(logits.bfloat16(), torch.zeros(1, 2, dtype=torch.long), temperature=3.0)
    assert torch.equal(logits, before)


def test_entropy_uniform_is_log_v_and_hand_two_way():
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    close(entropy_from_logits(torch.full((1, 1, 5), 7.0), temperature=0.3), [[math.log(5)]])
    # logits [0, ln 3] -> p = [1/4, 3/4]; the same p from [0, 2 ln 3] at temperature 2
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(torch.tensor([[[0.0, math.log(3)]]])), [[h]])
    close(entropy_from_logits(torch.tensor([[[0.0, 2 * math.log(3)]]]), temperature=2.0), [[h]])


def test_temperature_must_be_positive():
    for fn in (lambda t: token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), t),
               lambda t: entropy_from_logits(torch.zeros(1, 1, 2), t)):
        with pytest.raises(ValueError, match="temperature"):
            fn(0.0)


# ------------------------------------------------------------------ masked statistics
def test_masked_mean_hand_values_and_empty_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(masked_mean(x, mask), (1 + 2 + 4) / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0, 0.0])
    close(masked_mean(x, mask.bool(), dim=0), [2.5, 2.0, 0.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_var_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 1e6]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    close(masked_var(x, mask), 1.0)  # squared deviations 1 + 0 + 1 over n - 1 = 2
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    close(masked_var(x, torch.tensor([[1.0, 0.0, 0.0, 0.0]])), 0.0)  # one element: no spread to measure


def test_masked_whiten_properties():
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 5
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]]).float()
    w = masked_whiten(pad_with(x, mask, 1e6), mask)
    close(masked_mean(w, mask), 0.0, 1e-5)
    close(masked_var(w, mask), 1.0, 1e-5)
    assert torch.all(w[mask == 0] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(kept, mask), masked_mean(x, mask), 1e-5)
    close(masked_var(kept, mask), 1.0, 1e-5)
    close(w, masked_whiten(pad_with(x, mask, -3e7), mask))


def test_masked_whiten_hand_values():
    # mean 2, unbiased var 1: [1, 2, 3] -> [-1, 0, 1]; with shift_mean=False -> [1, 2, 3]
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1, 1, 1, 0]])
    close(masked_whiten(x, mask, eps=0.0), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False, eps=0.0), [[1.0, 2.0, 3.0, 0.0]])


# ------------------------------------------------------------------ KL estimators and rewards
def test_kl_kinds_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log r = ln 2
    ln2 = math.log(2)
    close(kl_penalty(logp, ref, "k1"), [ln2])
    close(kl_penalty(logp, ref, "k2"), [0.5 * ln2 ** 2])
    close(kl_penalty(logp, ref, "k3"), [0.5 - 1 + ln2])  # pi_ref/pi - 1 - log(pi_ref/pi)
    close(kl_penalty(ref, logp, "k3"), [2 - 1 - ln2])


def test_k3_is_nonnegative_and_zero_when_equal():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    close(kl_penalty(logp, logp, "k3"), torch.zeros(1000))


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for kind in ("k1", "k3"):  # E_{x~p}[estimator(x)], summed over the support
        close((p * kl_penalty(p.log(), q.log(), kind)).sum(), true_kl)
    assert (p * kl_penalty(p.log(), q.log(), "k2")).sum() != pytest.approx(true_kl, abs=1e-3)


def test_unknown_kl_kind_names_allowed():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_per_token_rewards_put_score_on_last_real_token():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 9e5, 9e5], [9e5, 9e5, 9e5], [-0.3, -0.3, -9e5]])
    ref = torch.tensor([[-1.2, -1.9, -0.8], [-1.5, -9e5, 0.0], [0.0, -9e5, 0.0], [-0.3, -0.5, 9e5]])
    score = torch.tensor([2.0, -1.0, 5.0, 0.5])
    rewards, kl = per_token_rewards(score, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.2, -0.1, 0.3], [0.5, 0, 0], [0, 0, 0], [0.0, 0.2, 0]])
    close(rewards, [[-0.02, 0.01, -0.03 + 2.0],
                    [-0.05 - 1.0, 0, 0],
                    [0, 0, 0],  # no real tokens: nowhere to put the score
                    [0.0, -0.02 + 0.5, 0]])
    _, kl3 = per_token_rewards(score, logp, ref, mask, 0.1, kind="k3")
    close(kl3[1, 0], math.exp(-0.5) - 1 + 0.5)
    assert torch.all(kl3[mask == 0] == 0)


# ------------------------------------------------------------------ GAE
def test_gae_three_token_hand_example():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), r = [1, 0, 2], V = [0.5, 1.0, 1.5], V after the end = 0
    #   t=2: delta = 2 + 0.9*0   - 1.5 = 0.5    A2 = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35   A1 = 0.35 + 0.72*0.5  = 0.71
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4    A0 = 1.4  + 0.72*0.71 = 1.9112
    # Row 2 ends after two tokens (garbage after):
    #   t=1: delta = 2 + 0 - 1.0 = 1.0          A1 = 1.0
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4    A0 = 1.4 + 0.72*1.0 = 2.12
    # Row 3 is empty.
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 1e6], [3e5, 3e5, 3e5]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, -1e6], [-7e5, 7e5, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0], [0.0, 0.0, 0.0]])


def test_gae_lambda_one_is_reward_to_go_minus_values():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]])
    adv, ret = gae(pad_with(rewards, mask, 4e4), pad_with(values, mask, -4e4), mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    close(adv, (to_go - values) * mask, 1e-5)
    close(ret, to_go * mask, 1e-5)


def test_gae_lambda_zero_is_one_step_td_and_detaches():
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[3.0, 4.0]], requires_grad=True)
    adv, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    close(adv, [[1.0 + 0.5 * 4.0 - 3.0, 2.0 - 4.0]])
    assert not adv.requires_grad


@pytest.mark.parametrize("kwargs", [{"gamma": 1.5}, {"gamma": -0.1}, {"lam": 1.01}, {"lam": -1.0}])
def test_gae_rejects_out_of_range(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), **kwargs)


# ------------------------------------------------------------------ PPO losses
def ppo_case():
    # ratio, advantage ->  -A*r, -A*clip(r)  -> max (clipped used?)
    #   1.5, +1         ->  -1.5, -1.2         -> -1.2 (yes)
    #   0.5, +1         ->  -0.5, -0.8         -> -0.5 (no)
    #   1.5, -2         ->   3.0,  2.4         ->  3.0 (no)
    #   0.5, -2         ->   1.0,  1.6         ->  1.6 (yes)
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, 0.0]])
    logp = old + torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), 0.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 0.0]])
    return logp, old, adv, torch.tensor([[1, 1, 1, 1, 0]])


def test_ppo_policy_loss_hand_values_and_gradient():
    logp, old, adv, mask = ppo_case()
    logp = pad_with(logp, mask, 1e4).requires_grad_()
    loss, stats = ppo_policy_loss(logp, pad_with(old, mask, -1e4), pad_with(adv, mask, 1e6), mask, 0.2)
    close(loss, (-1.2 - 0.5 + 3.0 + 1.6) / 4)
    close(stats["clip_frac"], 0.5)
    close(stats["approx_kl"], 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens, 0 on clipped ones and padding; /4 from the mean
    close(logp.grad, [[0.0, -0.5 / 4, 3.0 / 4, 0.0, 0.0]])


def test_ppo_ratio_one_gives_minus_mean_advantage():
    torch.manual_seed(0)
    logp, adv = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask)
    close(loss, -masked_mean(adv, mask))
    close(stats["clip_frac"], 0.0)
    close(stats["approx_kl"], 0.0)


def test_value_loss_hand_values_and_gradient():
    # old, v, R  ->  (v-R)^2, (old + clip(v-old, +-0.2) - R)^2  -> max (clipped used?)
    #   0, 0.5, 1 ->  0.25, (0.2-1)^2 = 0.64                      -> 0.64 (yes)
    #   0, 0.1, 1 ->  0.81, 0.81                                  -> 0.81 (tie: no)
    #   0, 0.5, 0 ->  0.25, 0.04                                  -> 0.25 (no)
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.tensor([[0.5, 0.1, 0.5, 8e5]], requires_grad=True)
    old, returns = torch.tensor([[0.0, 0.0, 0.0, -8e5]]), torch.tensor([[1.0, 1.0, 0.0, 3e5]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss, 0.5 * (0.64 + 0.81 + 0.25) / 3)
    close(stats["vf_clip_frac"], 1 / 3)
    loss.backward()
    # clipped term is flat in v; unclipped: 0.5 * 2 (v - R) / 3; the tie sends its gradient through either branch
    assert values.grad[0, 0] == 0 and values.grad[0, 3] == 0
    close(values.grad[0, 2], (0.5 - 0.0) / 3)


@pytest.mark.parametrize("clip", [0.0, -0.1])
def test_ppo_losses_reject_bad_clip_range(clip):
    x, m = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(x, x, x, m, clip)
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(x, x, x, m, clip)


# ------------------------------------------------------------------ reward model and DPO
def test_ranking_loss_mixed_group_sizes_hand_sum():
    # group 0: K=3, scores 2 > 1 > 0.5 -> pairs (2-1), (2-0.5), (1-0.5) = 1, 1.5, 0.5, all right
    # group 1: K=2, scores 0.3, 0.7    -> pair 0.3-0.7 = -0.4, wrong; its third slot is padding
    scores = torch.tensor([[2.0, 1.0, 0.5], [0.3, 0.7, 4e5]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    loss, correct, total = ranking_loss(scores, valid)
    g0 = -(logsig(1.0) + logsig(1.5) + logsig(0.5)) / 3
    g1 = -logsig(-0.4)
    close(loss, (g0 + g1) / 2)
    close(correct, 3.0)
    close(total, 4.0)
    loss.backward()
    assert scores.grad[1, 2] == 0
    close(scores.grad[1, 0], -torch.sigmoid(torch.tensor(0.4)) / 2)  # d/ds_i of -log sig(s_i - s_j) = -sig(s_j - s_i)


def test_ranking_loss_counts_ties_as_wrong_and_ignores_empty_groups():
    scores = torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.0, 2.0, 9.0, 9.0], [5.0, -5.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    loss, correct, total = ranking_loss(scores, valid)
    close(correct, 5.0)  # group 0: the tie is not correct, the other 5 of 6 are; group 1: wrong
    close(total, 7.0)
    close(loss, ranking_loss(scores[:2], valid[:2])[0])


def test_dpo_loss_hand_values():
    # pair 1: chosen reward 0.1*(-1+1.5) = 0.05, rejected 0.1*(-2+1.5) = -0.05, margin 0.1
    # pair 2: chosen 0.1*(-3+2) = -0.1, rejected 0.1*(-1+2) = 0.1, margin -0.2
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    close(loss, (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2)
    close(stats["reward_chosen"], (0.05 - 0.1) / 2)
    close(stats["reward_rejected"], (-0.05 + 0.1) / 2)
    close(stats["reward_margin"], (0.1 - 0.2) / 2)
    close(stats["reward_accuracy"], 0.5)
    loss.backward()
    close(pc.grad, [-0.1 * torch.sigmoid(torch.tensor(-0.1)) / 2, -0.1 * torch.sigmoid(torch.tensor(0.2)) / 2])
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


# ------------------------------------------------------------------ padding and gradients
def test_padding_never_reaches_outputs_or_gradients():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    base = {name: torch.randn(3, 4) for name in ("logp", "old", "adv", "v", "old_v", "ret")}

    def run(fill: float):
        ins = {k: pad_with(x, mask, fill * (i + 1)).requires_grad_() for i, (k, x) in enumerate(base.items())}
        pl, ps = ppo_policy_loss(ins["logp"], ins["old"], ins["adv"], mask)
        vl, vs = value_loss(ins["v"], ins["old_v"], ins["ret"], mask)
        (pl + vl).backward()
        rew, _ = per_token_rewards(torch.ones(3), ins["logp"], ins["old"], mask, 0.1, "k3")
        adv, ret = gae(rew, ins["v"], mask, 0.9, 0.8)
        outs = [pl, vl, *ps.values(), *vs.values(), rew, adv, ret, masked_whiten(ins["adv"], mask),
                masked_var(ins["v"], mask)]
        return [o.detach() for o in outs], ins["logp"].grad, ins["v"].grad

    outs_a, glogp_a, gv_a = run(1e6)
    outs_b, glogp_b, gv_b = run(-3e4)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g_a, g_b in ((glogp_a, glogp_b), (gv_a, gv_b)):
        assert torch.isfinite(g_a).all() and torch.all(g_a[mask == 0] == 0)
        torch.testing.assert_close(g_a, g_b, rtol=0, atol=0)


# ------------------------------------------------------------------ adaptive KL controller
def test_adaptive_kl_controller_proportional_and_capped():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10000)
    assert ctl.update(current_kl=6.6, n_steps=1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # error 0.1
    ctl.kl_coef = 0.1
    assert ctl.update(current_kl=100.0, n_steps=1000) == pytest.approx(0.1 * 1.02)  # error capped at +0.2
    assert ctl.kl_coef == pytest.approx(0.102)
    ctl.kl_coef = 0.1
    assert ctl.update(current_kl=0.0, n_steps=1000) == pytest.approx(0.1 * 0.98)  # error -1 capped at -0.2
    assert ctl.update(current_kl=6.0, n_steps=1000) == pytest.approx(0.098)  # on target: unchanged
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(kl_coef=0.1, target=0.0)
