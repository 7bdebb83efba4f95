"""Tier 1: drift statistics on hand-worked numbers, and the diagnosis rules on hand-made signals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf.drift import stats
from rlhf.drift.diagnosis import diagnose
from rlhf.drift.signals import Signal


def test_psi_hand_worked():
    # (0.25-0.5) ln(0.25/0.5) + (0.75-0.5) ln(0.75/0.5) = 0.25*0.693147 + 0.25*0.405465
    assert stats.psi(np.array([50, 50]), np.array([25, 75]), eps=0.0) == pytest.approx(0.2746531, abs=1e-6)
    assert stats.psi(np.array([3, 1]), np.array([6, 2]), eps=0.0) == pytest.approx(0.0, abs=1e-12)


def test_psi_smoothing_keeps_a_new_category_finite():
    # e = (1+eps)/(1+2eps), eps/(1+2eps); a = 0.5, 0.5 with eps=0.01: e = 0.990196, 0.009804
    # (0.5-0.990196) ln(0.5/0.990196) + (0.5-0.009804) ln(0.5/0.009804) = 0.334949 + 1.927365
    assert stats.psi(np.array([10, 0]), np.array([5, 5]), eps=0.01) == pytest.approx(2.262314, abs=1e-5)
    with pytest.raises(ValueError, match="eps > 0"):
        stats.psi(np.array([10, 0]), np.array([5, 5]), eps=0.0)


def test_chi2_homogeneity_hand_worked():
    # rows 30/30, columns 30/30 -> every expected count 15; X^2 = 4 * 5^2 / 15 = 6.6667, df = 1, p = 0.009823
    x2, p = stats.chi2_homogeneity(np.array([10, 20, 0]), np.array([20, 10, 0]))
    assert x2 == pytest.approx(20 / 3, abs=1e-9)
    assert p == pytest.approx(0.0098232, abs=1e-6)
    assert stats.chi2_homogeneity(np.array([4, 0]), np.array([9, 0])) == (0.0, 1.0)


def test_js_divergence_hand_worked():
    assert stats.js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0, abs=1e-12)
    # m = (0.75, 0.25); KL(p||m) = 0.5 log2(2/3) + 0.5 log2(2) = 0.2075187; KL(q||m) = log2(4/3) = 0.4150375
    assert stats.js_divergence(np.array([5, 5]), np.array([4, 0])) == pytest.approx(0.3112781, abs=1e-6)
    assert stats.js_divergence(np.array([2, 6]), np.array([1, 3])) == pytest.approx(0.0, abs=1e-12)


def test_align_counts_unions_keys():
    a, b, keys = stats.align_counts({"x": 2, "y": 1}, {"y": 3, "z": 4})
    assert keys == ["x", "y", "z"]
    assert a.tolist() == [2.0, 1.0, 0.0] and b.tolist() == [0.0, 3.0, 4.0]


def test_ks_statistic_and_pvalue_hand_worked():
    # CDFs at 3: F_a = 1, F_b = 1/3 -> D = 2/3
    d, _ = stats.ks_two_sample(np.array([1.0, 2.0, 3.0]), np.array([2.5, 4.0, 5.0]))
    assert d == pytest.approx(2 / 3, abs=1e-12)
    # n = m = 100, D = 0.2: lambda = (sqrt(50) + 0.12 + 0.11/sqrt(50)) * 0.2 = 1.441325
    # Q(lambda) = 2 sum_k (-1)^(k-1) exp(-2 k^2 lambda^2) = 2 (0.0156884 - 6.06e-8) = 0.0313767
    a = np.arange(100, dtype=float)
    d, p = stats.ks_two_sample(a, a + 20.0)
    assert d == pytest.approx(0.2, abs=1e-12)
    assert p == pytest.approx(0.0313767, abs=1e-6)


def test_wasserstein_hand_worked():
    assert stats.wasserstein_1(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(1.0, abs=1e-12)
    # F_a - F_b: 0.5 - 2/3 on [0, 1), 1 - 2/3 on [1, 3): 1/6 + 2/3 = 5/6
    assert stats.wasserstein_1(np.array([0.0, 1.0]), np.array([0.0, 0.0, 3.0])) == pytest.approx(5 / 6, abs=1e-12)


def test_mmd2_unbiased_hand_worked():
    # h = 1: k(0,1) = k(3,4) = e^-0.5 = 0.6065307; cross: e^-4.5, e^-8, e^-2, e^-4.5 sum to 0.1578878
    # MMD^2 = 0.6065307 + 0.6065307 - 2 * 0.1578878 / 4 = 1.1341175
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0], [4.0]])
    assert stats.mmd2_unbiased(x, y, 1.0) == pytest.approx(1.1341175, abs=1e-6)
    mmd2, _ = stats.mmd_permutation_test(x, y, 1.0, n_permutations=20, seed=0)
    assert mmd2 == pytest.approx(1.1341175, abs=1e-6)


def test_mmd_permutation_pvalue_separates_shift_from_no_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    same = rng.normal(size=(60, 3))
    shifted = rng.normal(size=(60, 3)) + np.array([1.0, 0.0, 0.0])
    h = stats.median_bandwidth(np.concatenate([x, same]))
    _, p_same = stats.mmd_permutation_test(x, same, h, n_permutations=199, seed=1)
    _, p_shift = stats.mmd_permutation_test(x, shifted, h, n_permutations=199, seed=1)
    assert p_shift == pytest.approx(1 / 200, abs=1e-12)  # no relabelling beats the real split
    assert p_same > 0.05


def test_median_bandwidth_hand_worked():
    # distances 1, 3, 2 -> median 2
    assert stats.median_bandwidth(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0, abs=1e-12)


def test_two_proportion_test_hand_worked():
    # pooled 0.2, se = sqrt(0.2*0.8*0.02) = 0.0565685, z = 3.535534, p = erfc(z / sqrt 2) = 4.07e-4
    diff, p = stats.two_proportion_test(10, 100, 30, 100)
    assert diff == pytest.approx(0.2, abs=1e-12)
    assert p == pytest.approx(math.erfc(3.5355339 / math.sqrt(2)), rel=1e-6)
    assert p == pytest.approx(4.0695e-4, rel=1e-3)
    assert stats.two_proportion_test(0, 50, 0, 80) == (0.0, 1.0)


def test_welch_t_test_hand_worked():
    # means 2.5, 5; var/n = 1.6667/4, 6.6667/4 -> se 1.443376, t = 1.732051, df = 4.411765
    from scipy import stats as sps

    diff, p = stats.welch_t_test(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0]))
    assert diff == pytest.approx(2.5, abs=1e-12)
    assert p == pytest.approx(2 * sps.t.sf(1.7320508, 4.4117647), rel=1e-6)
    assert 0.14 < p < 0.16


def _signal(name: str, category: str, breached: bool) -> Signal:
    return Signal(name, category, 1.0, 0.5, 0.0, breached, name)  # type: ignore[arg-type]


def test_diagnosis_rules_in_order():
    quiet = [_signal("prompt_token_js", "input", False), _signal("rm_score_ks", "response", False)]
    assert diagnose(quiet).cause is None
    shift = diagnose([_signal("prompt_intent_psi", "input", True), _signal("gold_reward_drop", "quality", True)])
    assert shift.cause == "input_shift" and shift.also == ("policy_drift",)
    blind = diagnose(
        [
            _signal("gold_reward_drop", "quality", True),
            _signal("rm_gold_gap", "judge", True),
            _signal("rm_score_ks", "response", True),
        ]
    )
    assert blind.cause == "reward_model_blind_spot" and blind.breached == (
        "gold_reward_drop",
        "rm_gold_gap",
        "rm_score_ks",
    )
    drift = diagnose([_signal("response_nll_ks", "response", True), _signal("rm_gold_gap", "judge", False)])
    assert drift.cause == "policy_drift" and drift.also == ()


def test_holm_adjust_hand_worked():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, 1*0.04 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert stats.holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], abs=1e-12)
    assert stats.holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0], abs=1e-12)
    assert stats.holm_adjust([]) == []
    with pytest.raises(ValueError, match="p-values in"):
        stats.holm_adjust([0.5, 1.5])


def test_wilson_interval_hand_worked():
    # 0 of 300: centre = half = z^2 / (2n (1 + z^2/n)) = 3.841459 / (600 * 1.0128049) = 0.0063215
    low, high = stats.wilson_interval(0, 300)
    assert low == 0.0 and high == pytest.approx(0.012643, abs=1e-6)
    # 5 of 10: centre 0.5, half = z / 1.3841459 * sqrt(0.025 + 3.841459 / 400) = 1.4160 * 0.18602 = 0.263407
    assert stats.wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert stats.wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.wilson_interval(3, 2)


def test_cusum_hand_worked():
    # S = max(0, S + x - 1): 0, 2, 1, 2, 3 -> first >= 3 at t = 4
    s, first = stats.cusum(np.array([0.0, 3.0, 0.0, 2.0, 2.0]), drift=1.0, threshold=3.0)
    assert s.tolist() == [0.0, 2.0, 1.0, 2.0, 3.0] and first == 4
    assert stats.cusum(np.zeros(5), 1.0, 3.0)[1] is None


def test_exceedance_test_hand_worked():
    # M = 100 values 1..100, tail 0.05 -> k = 5, cut 96; window values above it: 97, 98 -> count 2 of 4
    # beta-binomial(4, 5, 96): P(0) = (96/101)(97/102)(98/103)(99/104) = 0.818676,
    # P(1) = 4 * 5 * 96*97*98 / (101*102*103*104) = 0.165389 -> P(X >= 2) = 0.015935
    baseline = np.arange(1.0, 101.0)
    share, p = stats.exceedance_test(baseline, np.array([97.0, 98.0, 50.0, 10.0]), tail=0.05)
    assert share == 0.5 and p == pytest.approx(0.015935, abs=1e-5)
    # lower side: the cut is the 5th smallest value, 5; values below it: 1 and 2 -> the same law
    share, p_low = stats.exceedance_test(baseline, np.array([1.0, 2.0, 50.0, 96.0]), tail=0.05, side="lower")
    assert share == 0.5 and p_low == pytest.approx(p, abs=1e-12)
    assert stats.exceedance_test(baseline, np.array([50.0]), tail=0.05) == (0.0, 1.0)


def test_token_count_matrix_and_js_permutation_test():
    m = stats.token_count_matrix([[0, 2, 2], [1]], 3).toarray()
    assert m.tolist() == [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="vocabulary size"):
        stats.token_count_matrix([[5]], 3)
    # disjoint tokens: JS = 1 bit, and no relabelling of 12 + 8 prompts reaches it
    base = stats.token_count_matrix([[0, 0]] * 12, 2)
    js, p = stats.js_permutation_test(base, stats.token_count_matrix([[1]] * 8, 2), n_permutations=99, seed=0)
    assert js == pytest.approx(1.0, abs=1e-12) and p == pytest.approx(1 / 100, abs=1e-12)
    # the statistic is the JS divergence of the pooled counts: (5, 5) vs (4, 0) -> 0.3112781 (as above)
    js, p = stats.js_permutation_test(
        stats.token_count_matrix([[0, 1]] * 5, 2), stats.token_count_matrix([[0]] * 4, 2), 99, 0
    )
    assert js == pytest.approx(0.3112781, abs=1e-6)
    # permutations run in blocks (memory for big windows): the block size does not change the answer
    a, b = stats.token_count_matrix([[0, 1]] * 5, 2), stats.token_count_matrix([[0]] * 4, 2)
    assert stats.js_permutation_test(a, b, 99, 0, block=7) == stats.js_permutation_test(a, b, 99, 0, block=500)
    # the same composition on both sides: JS = 0, every relabelling reaches it, p = 1
    same = stats.token_count_matrix([[0], [1]] * 5, 2)
    assert stats.js_permutation_test(same, same, 99, 0) == pytest.approx((0.0, 1.0), abs=1e-12)


def test_upper_quantile_is_an_observed_value():
    assert stats.upper_quantile(np.array([4.0, 1.0, 3.0, 2.0]), 0.5) == 2.0
    assert stats.upper_quantile(np.array([4.0, 1.0, 3.0, 2.0, np.nan]), 0.99) == 4.0
    with pytest.raises(ValueError, match="calibration windows"):
        stats.upper_quantile(np.array([np.nan]), 0.5)


def test_holm_breaches_need_the_effect_and_the_adjusted_p():
    from rlhf.drift.signals import holm_breaches

    signals = [
        Signal("a", "input", 0.5, 0.1, 0.004, True, ""),  # second smallest of 3: adjusted 2 * 0.004 = 0.008
        Signal("b", "input", 0.05, 0.1, 0.001, False, ""),  # adjusted 3 * 0.001, but the effect is below its floor
        Signal("c", "response", 0.5, 0.1, 0.2, True, ""),
        Signal("d", "input", 0.5, 0.1, None, True, ""),  # no p-value: outside the family, its verdict kept
    ]
    out = holm_breaches(signals, alpha=0.01)
    assert [s.adjusted_pvalue for s in out[:3]] == pytest.approx([0.008, 0.003, 0.2], abs=1e-12)
    assert out[3].adjusted_pvalue is None
    assert [s.breached for s in out] == [True, False, False, True]
    assert [s.breached for s in holm_breaches(signals, alpha=0.005)] == [False, False, False, True]


def test_token_js_is_tested_only_when_the_baseline_keeps_each_prompts_tokens():
    from rlhf.config import DriftThresholds
    from rlhf.drift.features import PromptFeatures, ResponseFeatures
    from rlhf.drift.profile import build_profile
    from rlhf.drift.signals import WindowFeatures, compute_signals

    rng = np.random.default_rng(0)

    def responses(n: int) -> ResponseFeatures:
        flags = np.zeros(n, dtype=bool)
        return ResponseFeatures(rng.normal(size=n), rng.normal(10, 1, n), rng.normal(1, 0.1, n), flags, flags, None)

    ids = [[1, 2]] * 20
    prompts = PromptFeatures({"1": 20, "2": 20}, ["a"] * 20, np.full(20, 2.0), ids)
    baseline = build_profile(prompts, rng.normal(size=(20, 2)), responses(20), rng.normal(size=20), {}, {})
    new = [[3, 4]] * 20  # every window token unseen at baseline: JS = 1 bit
    window = WindowFeatures(
        PromptFeatures({"3": 20, "4": 20}, ["a"] * 20, np.full(20, 2.0), new),
        rng.normal(size=(20, 2)),
        responses(20),
        rng.normal(size=20),
        np.zeros(0),
        list(range(20)),
    )
    _, signals = compute_signals(baseline, window, DriftThresholds(), 1999, 0)
    js = next(s for s in signals if s.name == "prompt_token_js")
    assert js.value == pytest.approx(1.0) and js.pvalue == pytest.approx(1 / 2000) and js.breached
    del baseline.profile["prompts"]["token_ids"]  # a baseline from before the profile kept them
    _, signals = compute_signals(baseline, window, DriftThresholds(), 1999, 0)
    js = next(s for s in signals if s.name == "prompt_token_js")
    assert js.value == pytest.approx(1.0) and js.pvalue is None and not js.breached and "untested" in js.summary
