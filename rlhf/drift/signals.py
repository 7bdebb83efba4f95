"""Compare a traffic window's features with the baseline: ``drift/*`` metrics and the signals that breach.

Each signal has a category that the diagnosis (diagnosis.py) reads:

- ``input``: the prompts moved (token JS, intent PSI, embedding MMD, prompt
  length KS, and the champion's KL to the reference on live prompts: both models
  are frozen, so that KL moves only when the prompts do);
- ``response``: the served responses moved (reward-model score, length, NLL under
  the champion, refusal and violation rates);
- ``quality``: the responses got worse by a judge other than the reward model
  (gold judge, user feedback);
- ``judge``: quality fell while the reward model's score did not (rm_gold_gap).

Multiple testing (Holm 1979): every signal with a p-value is one test of the
window's family; a signal breaches when its effect crosses its threshold and its
Holm-adjusted p-value is below ``alpha``, so a window with no drift alarms with
probability at most ``alpha`` (the window-level false-alarm rate), however many
signals there are and however they correlate. ``rm_gold_gap`` is no test of its
own: it qualifies a breached quality signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from rlhf.config import DriftThresholds
from rlhf.drift import stats
from rlhf.drift.features import PromptFeatures, ResponseFeatures
from rlhf.drift.profile import Baseline

Category = Literal["input", "response", "quality", "judge"]


@dataclass
class WindowFeatures:
    """Everything measured on one window of the monitored version's traffic."""

    prompts: PromptFeatures
    embeddings: np.ndarray  # (M, H) of a random subset of the window's prompts
    responses: ResponseFeatures
    kl: np.ndarray  # (K,) sequence KL(champion || reference) on live prompts
    feedback: np.ndarray  # (F,) feedback values of the rows that have one, in [0, 1]
    scored: list[int]
    """Window rows (indices) behind `responses`: every row, or a random subset of a large window."""


@dataclass(frozen=True)
class Signal:
    """One drift test: its effect, threshold, p-value and verdict."""

    name: str
    """The threshold's name in DriftThresholds (the metric is drift/<name>)."""
    category: Category
    value: float
    threshold: float
    pvalue: float | None
    breached: bool
    summary: str
    """One line for the report: what moved and how much."""
    adjusted_pvalue: float | None = None
    """The p-value after Holm's adjustment over the window's tests (what `breached` compares with alpha)."""


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _ks_signal(
    name: str, category: Category, baseline: np.ndarray, window: np.ndarray, thr: float, what: str
) -> tuple[Signal, dict[str, float]]:
    """KS signal of two scalar samples, with means and Wasserstein-1 for the record."""
    b, w = _finite(baseline), _finite(window)
    d, p = stats.ks_two_sample(b, w)
    metrics = {f"drift/{name}": d, f"drift/{name}_pvalue": p}
    summary = f"{what}: mean {b.mean():.3f} -> {w.mean():.3f} (KS {d:.3f}, p={p:.2g})"
    return Signal(name, category, d, thr, p, d >= thr, summary), metrics


def _rate_signal(
    name: str,
    k0: int,
    n0: int,
    k1: int,
    n1: int,
    thr: float,
    what: str,
    direction: Literal["both", "drop"],
) -> tuple[Signal, dict[str, float]]:
    """Two-proportion signal on the change of a rate (both directions, or a drop only)."""
    diff, p = stats.two_proportion_test(k0, n0, k1, n1)
    effect = -diff if direction == "drop" else abs(diff)
    summary = f"{what}: {k0 / n0:.3f} -> {k1 / n1:.3f} (p={p:.2g})"
    metric = "drift/" + name.replace("_drop", "_delta")  # the metric is the signed change
    return Signal(name, "quality" if direction == "drop" else "response", effect, thr, p, effect >= thr, summary), {
        metric: diff,
        f"{metric}_pvalue": p,
    }


def _tail_signal(
    name: str,
    category: Category,
    baseline: np.ndarray,
    window: np.ndarray,
    thr: float,
    tail: float,
    side: Literal["upper", "lower"],
    what: str,
) -> tuple[Signal, dict[str, float]]:
    """Tail-exceedance signal: the window's share beyond the baseline's `tail` cut (stats.exceedance_test)."""
    share, p = stats.exceedance_test(_finite(baseline), _finite(window), tail, side)
    summary = f"{what}: {share:.1%} of rows beyond the baseline's {side} {tail:.0%} cut (p={p:.2g})"
    return Signal(name, category, share, thr, p, share >= thr, summary), {
        f"drift/{name}": share,
        f"drift/{name}_pvalue": p,
    }


def holm_breaches(signals: list[Signal], alpha: float) -> list[Signal]:
    """The signals with Holm-adjusted p-values; a tested signal breaches when its effect crosses its threshold
    and its adjusted p-value is below alpha (family-wise). A signal without a p-value keeps its effect verdict."""
    tested = [j for j, s in enumerate(signals) if s.pvalue is not None]
    adjusted = stats.holm_adjust([float(signals[j].pvalue) for j in tested])  # type: ignore[arg-type]
    out = list(signals)
    for j, adj in zip(tested, adjusted):
        s = signals[j]
        out[j] = replace(s, adjusted_pvalue=adj, breached=s.value >= s.threshold and adj < alpha)
    return out


def compute_signals(
    baseline: Baseline,
    window: WindowFeatures,
    thresholds: DriftThresholds,
    permutations: int,
    seed: int,
) -> tuple[dict[str, float], list[Signal]]:
    """All drift metrics (``drift/*``) of the window and the signals tested on them (Holm over the family)."""
    t, prof = thresholds, baseline.profile
    out: list[Signal] = []
    metrics: dict[str, float] = {"drift/rows": float(len(window.prompts.intents))}

    # 1. Prompt tokens: Jensen-Shannon divergence of the unigram distributions; a permutation p-value over
    #    prompts when the baseline keeps each prompt's tokens (baselines computed before it did: none).
    b_ids, w_ids = prof["prompts"].get("token_ids"), window.prompts.token_ids
    if b_ids is not None and w_ids is not None:
        vocab = 1 + max((max(ids) for ids in (*b_ids, *w_ids) if ids), default=0)
        js, p_js = stats.js_permutation_test(
            stats.token_count_matrix(b_ids, vocab), stats.token_count_matrix(w_ids, vocab), permutations, seed
        )
        metrics["drift/prompt_token_js_pvalue"] = p_js
    else:
        b_tok, w_tok, _ = stats.align_counts(prof["prompts"]["token_counts"], window.prompts.token_counts)
        js, p_js = stats.js_divergence(b_tok, w_tok), None
    metrics["drift/prompt_token_js"] = js
    # Without a p-value the calibrated floor alone would alarm on the sampling noise of small windows: reported only.
    p_text = " (untested: recompute the baseline with run_baseline)" if p_js is None else f" (p={p_js:.2g})"
    out.append(
        Signal(
            "prompt_token_js",
            "input",
            js,
            t.prompt_token_js,
            p_js,
            p_js is not None and js >= t.prompt_token_js,
            f"prompt tokens: Jensen-Shannon {js:.4f} bits{p_text}",
        )
    )

    # 2. Intents: PSI over the intents seen on either side ("other" = no known intent).
    w_int = {i: window.prompts.intents.count(i) for i in set(window.prompts.intents)}
    b_int, w_int_v, keys = stats.align_counts(prof["prompts"]["intent_counts"], w_int)
    value = stats.psi(b_int, w_int_v)
    _, p = stats.chi2_homogeneity(b_int, w_int_v)
    metrics.update({"drift/prompt_intent_psi": value, "drift/prompt_intent_pvalue": p})
    b_share = b_int / b_int.sum()
    w_share = w_int_v / w_int_v.sum()
    moved = max(range(len(keys)), key=lambda j: abs(w_share[j] - b_share[j]))
    out.append(
        Signal(
            "prompt_intent_psi",
            "input",
            value,
            t.prompt_intent_psi,
            p,
            value >= t.prompt_intent_psi,
            f"intents: PSI {value:.3f} (p={p:.2g}); '{keys[moved]}' {b_share[moved]:.1%} -> {w_share[moved]:.1%}",
        )
    )

    # 3. Prompt embeddings: unbiased MMD^2 with the baseline's bandwidth, permutation p-value.
    mmd2, p = stats.mmd_permutation_test(
        baseline.embeddings, window.embeddings, prof["embeddings"]["bandwidth"], permutations, seed
    )
    metrics.update({"drift/prompt_mmd2": mmd2, "drift/prompt_mmd_pvalue": p})
    out.append(
        Signal(
            "prompt_mmd2",
            "input",
            mmd2,
            t.prompt_mmd2,
            p,
            mmd2 >= t.prompt_mmd2,
            f"prompt embeddings: MMD^2 {mmd2:.4f} (p={p:.2g})",
        )
    )

    # 4. Prompt length.
    signal, m = _ks_signal(
        "prompt_length_ks",
        "input",
        baseline.array("prompts", "lengths"),
        window.prompts.lengths,
        t.prompt_length_ks,
        "prompt length (tokens)",
    )
    out.append(signal)
    metrics.update(m)
    metrics["drift/prompt_length_mean"] = float(window.prompts.lengths.mean())

    # 5. KL(champion || reference) on live prompts against the baseline's.
    b_kl, w_kl = _finite(baseline.array("kl", "values")), _finite(window.kl)
    diff, p = stats.welch_t_test(b_kl, w_kl)
    metrics.update({"drift/kl_live_mean": float(w_kl.mean()), "drift/kl_live_delta": diff, "drift/kl_live_pvalue": p})
    out.append(
        Signal(
            "kl_live_delta",
            "input",
            abs(diff),
            t.kl_live_delta,
            p,
            abs(diff) >= t.kl_live_delta,
            f"KL(champion || reference) on live prompts: {b_kl.mean():.3f} -> {w_kl.mean():.3f} nats (p={p:.2g})",
        )
    )

    # 6. Responses: reward-model score, length, NLL under the champion (whole distribution and upper tail).
    r = window.responses
    b_rm = baseline.array("responses", "rm_scores")
    signal, m = _ks_signal("rm_score_ks", "response", b_rm, r.rm_scores, t.rm_score_ks, "reward-model score")
    out.append(signal)
    metrics.update(m)
    metrics["drift/rm_score_mean"] = float(r.rm_scores.mean())
    metrics["drift/rm_score_wasserstein"] = stats.wasserstein_1(_finite(b_rm), _finite(r.rm_scores))
    signal, m = _ks_signal(
        "response_length_ks",
        "response",
        baseline.array("responses", "lengths"),
        r.lengths,
        t.response_length_ks,
        "response length (tokens)",
    )
    out.append(signal)
    metrics.update(m)
    metrics["drift/response_length_mean"] = float(r.lengths.mean())
    b_nll = baseline.array("responses", "nll")
    signal, m = _ks_signal(
        "response_nll_ks",
        "response",
        b_nll,
        r.nll,
        t.response_nll_ks,
        "response NLL under the champion (nats/token)",
    )
    out.append(signal)
    metrics.update(m)
    metrics["drift/response_nll_mean"] = float(np.nanmean(r.nll)) if np.isfinite(r.nll).any() else float("nan")
    signal, m = _tail_signal(
        "response_nll_tail",
        "response",
        b_nll,
        r.nll,
        t.response_nll_tail,
        t.tail_share,
        "upper",
        "responses the champion would hardly say (NLL)",
    )
    out.append(signal)
    metrics.update(m)

    # 7. Refusal and violation rates.
    resp, n = prof["responses"], len(r.refusal)
    for name, k0, flags, what in (
        ("refusal_rate_delta", resp["refusals"], r.refusal, "refusal rate"),
        ("violation_rate_delta", resp["violations"], r.violation, "policy-violation rate"),
    ):
        signal, m = _rate_signal(name, k0, resp["n"], int(flags.sum()), n, getattr(t, name), what, "both")
        out.append(signal)
        metrics.update(m)
    metrics["drift/refusal_rate"] = float(r.refusal.mean())
    metrics["drift/violation_rate"] = float(r.violation.mean())

    # 8. Quality by judges other than the reward model: gold reward, user feedback.
    quality: list[tuple[float, int]] = []  # (standardised shift, index of the signal in `out`)
    if r.gold is not None and resp["gold"] is not None:
        b_gold = _finite(baseline.array("responses", "gold"))
        diff, p = stats.welch_t_test(b_gold, r.gold)
        metrics.update(
            {
                "drift/gold_reward_mean": float(r.gold.mean()),
                "drift/gold_reward_delta": diff,
                "drift/gold_reward_pvalue": p,
            }
        )
        out.append(
            Signal(
                "gold_reward_drop",
                "quality",
                -diff,
                t.gold_reward_drop,
                p,
                -diff >= t.gold_reward_drop,
                f"gold reward: {b_gold.mean():.3f} -> {r.gold.mean():.3f} (p={p:.2g})",
            )
        )
        quality.append((diff / max(b_gold.std(ddof=1), 1e-8), len(out) - 1))
    metrics["drift/feedback_rows"] = float(len(window.feedback))
    rate0 = resp["feedback_positive_rate"]
    if len(window.feedback) and rate0 is not None:
        k1 = int(round(float(np.sum(window.feedback))))
        signal, m = _rate_signal(
            "feedback_rate_drop",
            int(round(rate0 * resp["n"])),
            resp["n"],
            k1,
            len(window.feedback),
            t.feedback_rate_drop,
            "positive feedback rate",
            "drop",
        )
        out.append(signal)
        metrics.update(m)
        metrics["drift/feedback_rate"] = k1 / len(window.feedback)
        shift = (k1 / len(window.feedback) - rate0) / max(math.sqrt(rate0 * (1 - rate0)), 1e-8)
        quality.append((shift, len(out) - 1))

    # 9. Holm over the family: the window-level false-alarm rate is alpha.
    out = holm_breaches(out, t.alpha)

    # 10. Reward-model blind spot: quality fell (a breached quality signal), the reward model's score held or rose.
    if quality:
        d_quality, j = min(quality, key=lambda x: x[0])
        quality_signal = out[j]
        b_rm_f = _finite(b_rm)
        rm_diff, rm_p = stats.welch_t_test(b_rm_f, r.rm_scores)
        d_rm = rm_diff / max(b_rm_f.std(ddof=1), 1e-8)
        gap = d_rm - d_quality
        rm_fell = rm_diff < 0 and rm_p < t.alpha
        metrics["drift/rm_gold_gap"] = float(gap)
        out.append(
            Signal(
                "rm_gold_gap",
                "judge",
                gap,
                t.rm_gold_gap,
                quality_signal.pvalue,
                quality_signal.breached and gap >= t.rm_gold_gap and not rm_fell,
                f"reward model vs {quality_signal.name.split('_')[0]}: shifts {d_rm:+.2f} vs {d_quality:+.2f} baseline std "
                f"(gap {gap:.2f})",
                quality_signal.adjusted_pvalue,
            )
        )
    metrics["drift/signals_breached"] = float(sum(s.breached for s in out))
    metrics["drift/alert"] = float(any(s.breached for s in out))
    return metrics, out
