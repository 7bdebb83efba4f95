"""Hand-worked checks of the PPO/RLHF math in rlhf.rl (expected values derived in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf.rl.advantages import compute_gae, masked_mean, masked_var, masked_whiten
from rlhf.rl.kl import AdaptiveKLController, FixedKLController, kl_mean_upper_bound, kl_per_token, make_kl_controller
from rlhf.rl.losses import (
    entropy_from_logits,
    entropy_shortfall,
    explained_variance,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from rlhf.rl.normalize import RunningMoments, normalize_scores

F64 = torch.float64
ATOL = 1e-6


def t(values: list, dtype: torch.dtype = F64) -> torch.Tensor:
    """Shorthand for a float64 tensor."""
    return torch.tensor(values, dtype=dtype)


def assert_close(actual: torch.Tensor, expected: list | float, atol: float = ATOL) -> None:
    """Tight elementwise comparison against hand-worked numbers."""
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------- KL
# logprobs - ref_logprobs = log_ratio r = [0, -0.5, 0.5]
LOGPROBS = [-1.0, -2.0, -0.5]
REF_LOGPROBS = [-1.0, -1.5, -1.0]


def test_kl_k1_is_log_ratio_and_can_be_negative() -> None:
    # k1 = r = [0, -0.5, 0.5]
    k1 = kl_per_token(t(LOGPROBS), t(REF_LOGPROBS), "k1")
    assert_close(k1, [0.0, -0.5, 0.5])
    assert (k1 < 0).any()


def test_kl_default_estimator_is_k1() -> None:
    assert_close(kl_per_token(t(LOGPROBS), t(REF_LOGPROBS)), [0.0, -0.5, 0.5])


def test_kl_k2_half_squared_log_ratio() -> None:
    # k2 = 0.5 r^2 = [0, 0.125, 0.125]
    assert_close(kl_per_token(t(LOGPROBS), t(REF_LOGPROBS), "k2"), [0.0, 0.125, 0.125])


def test_kl_k3_nonnegative() -> None:
    # k3 = exp(-r) - 1 + r
    # r =  0.0: 1 - 1 + 0                          = 0
    # r = -0.5: e^0.5 - 1 - 0.5 = 1.6487212707 - 1.5 = 0.1487212707
    # r =  0.5: e^-0.5 - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597
    k3 = kl_per_token(t(LOGPROBS), t(REF_LOGPROBS), "k3")
    assert_close(k3, [0.0, 0.1487212707, 0.1065306597])
    assert (k3 >= 0).all()
    # still >= 0 (and finite) for large log ratios of either sign
    wide = kl_per_token(t([5.0, -5.0, 0.0]), t([0.0, 0.0, 0.0]), "k3")
    assert (wide >= 0).all() and torch.isfinite(wide).all()


def test_kl_preserves_shape() -> None:
    lp = torch.zeros(2, 3, dtype=F64)
    for est in ("k1", "k2", "k3"):
        assert kl_per_token(lp, lp, est).shape == (2, 3)  # type: ignore[arg-type]


def test_kl_unknown_estimator_raises() -> None:
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(t(LOGPROBS), t(REF_LOGPROBS), "k4")  # type: ignore[arg-type]


def test_kl_mean_upper_bound_hand_worked() -> None:
    # [-1, -2, -3]: mean -2, unbiased std 1, stderr 1/sqrt(3) = 0.5773503
    #   z=2: -2 + 1.1547005 = -0.8452995 (negative beyond noise) ; z=1: -1.4226497
    seq = t([-1.0, -2.0, -3.0])
    assert kl_mean_upper_bound(seq) == pytest.approx(-2 + 2 / math.sqrt(3), abs=1e-12)
    assert kl_mean_upper_bound(seq) == pytest.approx(-0.8452995, abs=1e-7)
    assert kl_mean_upper_bound(seq, z=1.0) == pytest.approx(-1.4226497, abs=1e-7)
    # [0.5, -0.5]: mean 0, std sqrt(0.5), stderr 0.5 -> upper bound 1.0 (noise, no alarm)
    assert kl_mean_upper_bound(t([0.5, -0.5])) == pytest.approx(1.0, abs=1e-12)
    # one episode: its estimate as is
    assert kl_mean_upper_bound(t([-0.3])) == pytest.approx(-0.3, abs=1e-12)
    with pytest.raises(ValueError, match="per-sequence"):
        kl_mean_upper_bound(torch.zeros(2, 3))


def test_adaptive_controller_steers_beta_both_ways_over_steps() -> None:
    # target 2, horizon 16, batch 16 -> n/H = 1: beta moves by the clipped error itself each step.
    # KL 4 (error +1 -> +0.2): 0.1 -> 0.12 -> 0.144 ; KL 2.2 (error +0.1): 0.144 * 1.1 = 0.1584
    # KL 1.0 (error -0.5 -> -0.2): 0.1584 * 0.8 = 0.12672
    ctl = AdaptiveKLController(value=0.1, target=2.0, horizon=16)
    for kl, expected in ((4.0, 0.12), (4.0, 0.144), (2.2, 0.1584), (1.0, 0.12672)):
        ctl.update(current_kl=kl, n_steps=16)
        assert ctl.value == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------ KL controllers
def test_fixed_controller_never_changes() -> None:
    ctl = FixedKLController(value=0.05)
    ctl.update(current_kl=100.0, n_steps=256)
    ctl.update(current_kl=0.0, n_steps=256)
    assert ctl.value == 0.05
    other = FixedKLController(value=1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_clips_high_error() -> None:
    # error = clip(12 / 6 - 1, -0.2, 0.2) = clip(1.0) = 0.2
    # mult  = 1 + 0.2 * 256 / 10000 = 1.00512 -> value = 0.1 * 1.00512 = 0.100512
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)


def test_adaptive_controller_clips_low_error() -> None:
    # error = clip(0 / 6 - 1) = clip(-1.0) = -0.2
    # mult  = 1 - 0.2 * 256 / 10000 = 0.99488 -> value = 0.099488
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=0.0, n_steps=256)
    assert ctl.value == pytest.approx(0.099488, abs=1e-12)


def test_adaptive_controller_unclipped_error() -> None:
    # error = 6.6 / 6 - 1 = 0.1 (inside the clip) ; mult = 1 + 0.1 * 256 / 10000 = 1.00256
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.100256, abs=1e-12)
    # error = 5.7 / 6 - 1 = -0.05 ; mult = 1 - 0.05 * 512 / 10000 = 0.99744 (compounds)
    ctl.update(current_kl=5.7, n_steps=512)
    assert ctl.value == pytest.approx(0.100256 * 0.99744, abs=1e-12)


def test_adaptive_controller_at_target_is_unchanged() -> None:
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.0, n_steps=256)
    assert ctl.value == 0.1


def test_adaptive_controller_state_dict_round_trip() -> None:
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)
    restored = AdaptiveKLController(value=1.0, target=1.0, horizon=1)
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl
    # the restored one continues identically
    ctl.update(current_kl=3.0, n_steps=128)
    restored.update(current_kl=3.0, n_steps=128)
    assert restored.value == ctl.value


def test_make_kl_controller() -> None:
    fixed = make_kl_controller("fixed", init_coef=0.05, target=None, horizon=10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = make_kl_controller("adaptive", init_coef=0.2, target=6.0, horizon=10000)
    assert adaptive == AdaptiveKLController(value=0.2, target=6.0, horizon=10000)


def test_make_kl_controller_errors() -> None:
    with pytest.raises(ValueError, match="kl_target"):
        make_kl_controller("adaptive", init_coef=0.2, target=None, horizon=10000)
    with pytest.raises(ValueError, match="fixed, adaptive"):
        make_kl_controller("pid", init_coef=0.2, target=6.0, horizon=10000)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ masked stats
# masked entries of X are [1, 2, 3, 4, 5]: mean 3, sum sq dev = 4+1+0+1+4 = 10
# biased var = 10/5 = 2.0, unbiased var = 10/4 = 2.5. Padded entries hold garbage (100, nan).
X = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), -7.0]]
X_MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_masked_mean_and_var() -> None:
    x, m = t(X), torch.tensor(X_MASK)
    assert_close(masked_mean(x, m), 3.0)
    assert_close(masked_mean(x, m, dim=1), [2.0, 4.5])  # (1+2+3)/3, (4+5)/2
    assert_close(masked_var(x, m), 2.5)
    assert_close(masked_var(x, m, unbiased=False), 2.0)


def test_masked_whiten() -> None:
    x, m = t(X), torch.tensor(X_MASK)
    w = masked_whiten(x, m)
    # (x - 3) / sqrt(2.5 + 1e-8): 1 -> -2/1.5811388 = -1.2649110 ; 3 -> 0 ; padded -> 0
    s = math.sqrt(2.5 + 1e-8)
    assert_close(w, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    real = w[m.bool()]
    assert_close(real.mean(), 0.0)
    assert_close(real.std(), 1.0)  # unbiased std, matching masked_var's default
    assert (w[~m.bool()] == 0).all()

    w_keep = masked_whiten(x, m, shift_mean=False)
    assert_close(w_keep, [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]])
    assert_close(w_keep[m.bool()].mean(), 3.0)


# ---------------------------------------------------------------------------------------- GAE
# row 0: rewards [0, 0, 1], values [0.5, 0.2, 0.3], all real.
# row 1: rewards [0, 2, pad], values [1.0, 0.5, pad], last token is padding (garbage 9 / nan).
ROW0_R, ROW0_V = [0.0, 0.0, 1.0], [0.5, 0.2, 0.3]
ROW1_R, ROW1_V = [0.0, 2.0, 9.0], [1.0, 0.5, float("nan")]


def test_gae_single_row_gamma1_lam1() -> None:
    # gamma = lam = 1 => A_t = sum_{k>=t} r_k - V_t:
    # t=2: delta = 1 - 0.3 = 0.7                A = 0.7
    # t=1: delta = 0 + 0.3 - 0.2 = 0.1          A = 0.1 + 0.7 = 0.8
    # t=0: delta = 0 + 0.2 - 0.5 = -0.3         A = -0.3 + 0.8 = 0.5
    # returns = A + V = [1, 1, 1]
    adv, ret = compute_gae(t([ROW0_R]), t([ROW0_V]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(adv, [[0.5, 0.8, 0.7]])
    assert_close(ret, [[1.0, 1.0, 1.0]])


def test_gae_single_row_gamma09_lam095() -> None:
    # gamma*lam = 0.855
    # t=2: delta = 1 - 0.3 = 0.7                        A2 = 0.7
    # t=1: delta = 0 + 0.9*0.3 - 0.2 = 0.07             A1 = 0.07 + 0.855*0.7 = 0.6685
    # t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32            A0 = -0.32 + 0.855*0.6685 = 0.2515675
    # returns = [0.2515675+0.5, 0.6685+0.2, 0.7+0.3] = [0.7515675, 0.8685, 1.0]
    adv, ret = compute_gae(t([ROW0_R]), t([ROW0_V]), torch.ones(1, 3), gamma=0.9, lam=0.95)
    assert_close(adv, [[0.2515675, 0.6685, 0.7]])
    assert_close(ret, [[0.7515675, 0.8685, 1.0]])


def test_gae_padded_batch_gamma1_lam1() -> None:
    # row 1 (mask [1, 1, 0]): padded t=2 -> A = 0, and V_2 is treated as 0 (episode ends at t=1)
    # t=1: delta = 2 + 1*V_2*m_2 - 0.5 = 1.5               A1 = 1.5
    # t=0: delta = 0 + 0.5 - 1.0 = -0.5                    A0 = -0.5 + 1.5 = 1.0
    # returns = [2.0, 2.0, 0]
    rewards, values = t([ROW0_R, ROW1_R]), t([ROW0_V, ROW1_V])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(adv, [[0.5, 0.8, 0.7], [1.0, 1.5, 0.0]])
    assert_close(ret, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])


def test_gae_padded_batch_gamma09_lam095() -> None:
    # row 1: t=1: delta = 2 - 0.5 = 1.5                     A1 = 1.5
    #        t=0: delta = 0 + 0.9*0.5 - 1.0 = -0.55         A0 = -0.55 + 0.855*1.5 = 0.7325
    #        returns = [0.7325 + 1.0, 1.5 + 0.5, 0] = [1.7325, 2.0, 0]
    rewards, values = t([ROW0_R, ROW1_R]), t([ROW0_V, ROW1_V])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.95)
    assert_close(adv, [[0.2515675, 0.6685, 0.7], [0.7325, 1.5, 0.0]])
    assert_close(ret, [[0.7515675, 0.8685, 1.0], [1.7325, 2.0, 0.0]])


def test_gae_rejects_bad_shapes_and_coefs() -> None:
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(3), torch.zeros(3), torch.ones(3), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), gamma=1.5, lam=1.0)


# -------------------------------------------------------------------------------- policy loss
def test_policy_loss_unclipped() -> None:
    # ratios [1.1, 0.9] lie inside [0.8, 1.2]; advantages [1, -2]
    # per-token loss = -A * r = [-1.1, 1.8]  -> mean 0.35 ; clipfrac 0
    # approxkl = 0.5 * mean(ln(1.1)^2, ln(0.9)^2) = 0.5 * (0.0090840 + 0.0111008)/2 = 0.0050462
    old = t([[-1.0, -2.0]])
    new = old + torch.log(t([[1.1, 0.9]]))
    loss, stats = policy_loss(new, old, t([[1.0, -2.0]]), torch.ones(1, 2), clip_range=0.2)
    assert_close(loss, 0.35)
    assert_close(stats["clipfrac"], 0.0)
    assert_close(stats["approxkl"], 0.5 * (math.log(1.1) ** 2 + math.log(0.9) ** 2) / 2)
    assert_close(stats["approxkl"], 0.0050462, atol=1e-7)
    assert_close(stats["ratio_mean"], 1.0)
    assert_close(stats["ratio_max"], 1.1)


def test_policy_loss_clipped() -> None:
    # clip_range 0.2; ratios r = [1.5, 0.5, 1.5, 0.5, (pad 3.0)], A = [1, 1, -1, -1, (pad 5)]
    #  pos | -A*r | -A*clamp(r) | max  | clipped term larger?
    #   0  | -1.5 |    -1.2     | -1.2 | yes
    #   1  | -0.5 |    -0.8     | -0.5 | no
    #   2  |  1.5 |     1.2     |  1.5 | no
    #   3  |  0.5 |     0.8     |  0.8 | yes
    # loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15 ; clipfrac = 2/4 = 0.5
    # approxkl = 0.5 * (2 ln(1.5)^2 + 2 ln(2)^2) / 4 = 0.25 * (0.1644019 + 0.4804530) = 0.1612137
    # ratio_mean = 4/4 = 1.0 ; ratio_max = 1.5 (padding's 3.0 ignored)
    old = t([[-1.0, -1.0, -2.0, -2.0, -3.0]])
    new = (old + torch.log(t([[1.5, 0.5, 1.5, 0.5, 3.0]]))).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2)
    assert_close(loss.detach(), 0.15)
    assert_close(stats["clipfrac"], 0.5)
    assert_close(stats["approxkl"], 0.1612137, atol=1e-7)
    assert_close(stats["ratio_mean"], 1.0)
    assert_close(stats["ratio_max"], 1.5)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # gradient: zero where the clipped branch is active or padded, d(-A r)/dlogp / 4 = -A r / 4 elsewhere
    loss.backward()
    assert new.grad is not None
    assert_close(new.grad, [[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]])


def test_policy_loss_rejects_bad_clip() -> None:
    with pytest.raises(ValueError, match="clip_range"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), clip_range=0.0)


# --------------------------------------------------------------------------------- value loss
def test_value_loss_unclipped() -> None:
    # values - old = [0.1, -0.1] inside +-0.2 -> v_clipped = values
    # (v - R)^2 = [(1-1.5)^2, (2-1)^2] = [0.25, 1.0] ; loss = 0.5 * 1.25/2 = 0.3125
    loss, stats = value_loss(t([[1.0, 2.0]]), t([[0.9, 2.1]]), t([[1.5, 1.0]]), torch.ones(1, 2), 0.2)
    assert_close(loss, 0.3125)
    assert_close(stats["clipfrac"], 0.0)


def test_value_loss_clipped() -> None:
    # c = 0.2 ; V = [1, 2, 0, 3, (pad)], V_old = [0.5, 2.5, 0, 2, (pad)], R = [2, 2, 0, 0, (pad)]
    #  pos | v_clip | (V-R)^2 | (Vc-R)^2 | max  | clipped larger?
    #   0  |  0.7   |  1.0    |  1.69    | 1.69 | yes
    #   1  |  2.3   |  0.0    |  0.09    | 0.09 | yes
    #   2  |  0.0   |  0.0    |  0.0     | 0.0  | no (tie)
    #   3  |  2.2   |  9.0    |  4.84    | 9.0  | no
    # loss = 0.5 * (1.69 + 0.09 + 0 + 9) / 4 = 1.3475 ; clipfrac = 2/4 = 0.5
    values = t([[1.0, 2.0, 0.0, 3.0, 50.0]])
    old = t([[0.5, 2.5, 0.0, 2.0, -50.0]])
    returns = t([[2.0, 2.0, 0.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert_close(loss, 1.3475)
    assert_close(stats["clipfrac"], 0.5)


# ------------------------------------------------------------------------- logits utilities
def test_entropy_uniform_is_log_vocab() -> None:
    logits = torch.full((2, 3, 5), 7.0, dtype=F64)  # (B, T, V)
    ent = entropy_from_logits(logits)
    assert ent.shape == (2, 3)
    assert_close(ent, torch.full((2, 3), math.log(5), dtype=F64).tolist())


def test_entropy_hand_worked_and_stable() -> None:
    # logits [0, ln 3] -> p = [0.25, 0.75]
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    assert_close(entropy_from_logits(t([0.0, math.log(3)])), 0.5623351, atol=1e-7)
    # shift invariance with huge logits (no overflow)
    assert_close(entropy_from_logits(t([1e4, 1e4 + math.log(3)])), 0.5623351, atol=1e-7)
    # masked vocab entries (-inf) contribute nothing: [0, 0, -inf] -> ln 2
    assert_close(entropy_from_logits(t([0.0, 0.0, -math.inf])), math.log(2))


def test_entropy_shortfall_hand_worked() -> None:
    # per token H = [0.2, 0.9, 0.5, 0.1], reference [0.6, 0.4, 0.3, 0.8], last token masked out
    # shortfall max(H_ref - H, 0) = [0.4, 0, 0, (0.7 masked)] -> mean over 3 tokens = 0.4 / 3
    entropy, ref = t([[0.2, 0.9], [0.5, 0.1]]), t([[0.6, 0.4], [0.3, 0.8]])
    mask = t([[1.0, 1.0], [1.0, 0.0]])
    assert_close(entropy_shortfall(entropy, ref, mask), 0.4 / 3)
    # the gradient pushes the entropy up only where it is below the reference: d/dH = -1/3 at token 0, else 0
    entropy.requires_grad_(True)
    entropy_shortfall(entropy, ref, mask).backward()
    assert_close(entropy.grad, [[-1 / 3, 0.0], [0.0, 0.0]])


def test_logprobs_from_logits_with_temperature() -> None:
    # logits per position [ln 4, 0]:
    #   T=1: softmax = [4/5, 1/5]
    #   T=2: logits/T = [ln 2, 0] -> softmax = [2/3, 1/3]
    logits = t([[[math.log(4), 0.0], [math.log(4), 0.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[0, 1]])  # (1, 2)
    assert_close(logprobs_from_logits(logits, tokens), [[math.log(4 / 5), math.log(1 / 5)]])
    assert_close(logprobs_from_logits(logits, tokens, temperature=2.0), [[math.log(2 / 3), math.log(1 / 3)]])
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, tokens, temperature=0.0)


def test_explained_variance() -> None:
    returns = t([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # perfect prediction -> 1.0
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0, abs=1e-12)
    # predicting 0 -> Var[R - 0] / Var[R] = 1 -> 0.0
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0, abs=1e-12)
    # values [1, 2, 2]: residual [0, 0, 1], Var = 2/9 ; Var[R] = 2/3 -> 1 - 1/3 = 2/3
    values = t([[1.0, 2.0, 2.0, -5.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(2 / 3, abs=1e-12)
    # constant returns -> nan
    assert math.isnan(explained_variance(values, t([[4.0, 4.0, 4.0, 1.0]]), mask))


# ---------------------------------------------------------------------------- normalisation
def test_running_moments_hand_worked() -> None:
    rm = RunningMoments()
    # first batch [1, 2, 3]: mean 2, population var 2/3 (prior count 1e-24 is negligible)
    batch_mean, batch_std = rm.update(t([1.0, 2.0, 3.0]))
    assert batch_mean == pytest.approx(2.0, abs=1e-12)
    assert batch_std == pytest.approx(math.sqrt(2 / 3), abs=1e-12)
    assert rm.mean == pytest.approx(2.0, abs=1e-12)
    assert rm.var == pytest.approx(2 / 3, abs=1e-12)
    # add [5]: all = [1, 2, 3, 5], mean 2.75, var = (3.0625 + 0.5625 + 0.0625 + 5.0625)/4 = 2.1875
    assert rm.update(t([5.0])) == pytest.approx((5.0, 0.0), abs=1e-12)
    assert rm.mean == pytest.approx(2.75, abs=1e-12)
    assert rm.var == pytest.approx(2.1875, abs=1e-12)
    assert rm.std == pytest.approx(math.sqrt(2.1875), abs=1e-12)
    assert rm.count == pytest.approx(4.0)


def test_running_moments_matches_numpy_over_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen, dtype=torch.float32) * 3.0 + 1.5 for n in (7, 1, 16, 5, 32)]
    rm = RunningMoments()
    for b in batches:
        bm, bs = rm.update(b)
        assert bm == pytest.approx(float(np.mean(b.numpy().astype(np.float64))), abs=ATOL)
        assert bs == pytest.approx(float(np.std(b.numpy().astype(np.float64))), abs=ATOL)
    allx = np.concatenate([b.numpy() for b in batches]).astype(np.float64)
    assert rm.mean == pytest.approx(float(np.mean(allx)), abs=ATOL)
    assert rm.var == pytest.approx(float(np.var(allx)), abs=ATOL)
    assert rm.std == pytest.approx(float(np.std(allx)), abs=ATOL)
    assert rm.count == pytest.approx(float(allx.size))


def test_running_moments_state_dict_round_trip() -> None:
    rm = RunningMoments()
    rm.update(t([1.0, 2.0, 3.0]))
    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert restored == rm


def test_normalize_scores() -> None:
    rm = RunningMoments(mean=2.0, var=4.0, count=10.0)  # std 2
    scores = t([2.0, 4.0, 10.0, -10.0])
    # (s - 2) / 2 = [0, 1, 4, -6]
    assert_close(normalize_scores(scores, rm, clip=None), [0.0, 1.0, 4.0, -6.0])
    assert_close(normalize_scores(scores, rm, clip=3.0), [0.0, 1.0, 3.0, -3.0])
    with pytest.raises(ValueError, match="clip"):
        normalize_scores(scores, rm, clip=0.0)
    # the caller owns updates: normalising does not touch the moments
    assert rm == RunningMoments(mean=2.0, var=4.0, count=10.0)
