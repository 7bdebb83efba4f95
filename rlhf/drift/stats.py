"""Two-sample drift statistics: a baseline sample against a window of production traffic.

Pure numpy (scipy only for the tail probabilities of known distributions), so every
function is tested on hand-worked numbers. Each test returns an effect size and,
where the statistic has a null distribution, a p-value; the monitor raises an alert
only when both cross their thresholds, so big windows do not alarm on negligible
shifts and small windows do not alarm on noise.

- PSI, population stability index (credit-scoring practice; Yurdakul 2018): on
  categorical distributions such as intents. Rule of thumb: < 0.1 stable,
  0.1-0.25 moderate shift, > 0.25 major shift. Its p-value comes from Pearson's
  chi-square test of homogeneity on the same counts.
- Jensen-Shannon divergence in bits (Lin 1991): symmetric, bounded in [0, 1],
  finite when a token appears on one side only; on token distributions.
- Kolmogorov-Smirnov (asymptotic p-value with Stephens' small-sample correction)
  and Wasserstein-1 on scalar samples (reward scores, lengths, NLL).
- MMD with an RBF kernel (Gretton et al. 2012, unbiased estimator) with a
  permutation p-value, on prompt embeddings.
- Two-proportion z-test for rates and Welch's t-test for means.
- Tail exceedances (beta-binomial, exact under exchangeability): how many window
  values pass the baseline's extreme order statistic; sensitive to a small share
  of rows far out, which KS and means dilute.
- Multiple testing (Holm 1979): the window alarms on the family of signals, so
  the window-level false-alarm rate is the family-wise alpha.
- Wilson score interval for a rate measured on n windows, a one-sided CUSUM
  (Page 1954) for gradual drift, and empirical quantile thresholds (calibration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
from scipy import sparse, special
from scipy import stats as sps


def align_counts(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two category -> count maps as aligned vectors over the union of their keys (sorted)."""
    keys = sorted(set(a) | set(b))
    return (
        np.array([float(a.get(k, 0.0)) for k in keys]),
        np.array([float(b.get(k, 0.0)) for k in keys]),
        keys,
    )


def normalize(counts: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Counts -> probabilities, each smoothed by eps: (p + eps) / (1 + K eps)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("a distribution needs a positive total count: the sample is empty")
    p = counts / total
    return (p + eps) / (1.0 + eps * len(p))


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index sum((a - e) * ln(a / e)) of two count vectors, smoothed by eps."""
    e, a = normalize(expected, eps), normalize(actual, eps)
    if eps == 0 and (np.any(e == 0) or np.any(a == 0)):
        raise ValueError("psi with eps=0 needs every category on both sides: pass eps > 0")
    return float(np.sum((a - e) * np.log(a / e)))


def chi2_homogeneity(a_counts: np.ndarray, b_counts: np.ndarray) -> tuple[float, float]:
    """(X^2, p) of Pearson's chi-square test that two count vectors share one distribution."""
    table = np.stack([np.asarray(a_counts, np.float64), np.asarray(b_counts, np.float64)])  # (2, K)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0  # one category on both sides: nothing can differ
    if np.any(table.sum(1) <= 0):
        raise ValueError("chi2_homogeneity needs a positive total count on both sides")
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    x2 = float(np.sum((table - expected) ** 2 / expected))
    return x2, float(sps.chi2.sf(x2, table.shape[1] - 1))


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two count vectors (0 = same, 1 = disjoint)."""
    p, q = normalize(p_counts), normalize(q_counts)
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(D, p): largest gap between the two empirical CDFs, asymptotic two-sided p-value."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        raise ValueError("ks_two_sample needs two non-empty samples")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    # Stephens (1970): the corrected argument makes the asymptotic law usable from n ~ 5.
    p = float(special.kolmogorov((en + 0.12 + 0.11 / en) * d))
    return d, min(1.0, max(0.0, p))


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two empirical distributions: integral of |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        raise ValueError("wasserstein_1 needs two non-empty samples")
    grid = np.sort(np.concatenate([a, b]))
    widths = np.diff(grid)
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * widths))


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, M) squared Euclidean distances between rows of x (N, D) and y (M, D)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d2, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """Median heuristic: the median pairwise Euclidean distance between distinct rows of x (N, D)."""
    d2 = squared_distances(x, x)
    upper = d2[np.triu_indices(len(x), k=1)]
    if len(upper) == 0:
        raise ValueError("median_bandwidth needs at least two points")
    h = float(np.sqrt(np.median(upper)))
    if h <= 0:
        raise ValueError("median_bandwidth: more than half the points coincide; pass a bandwidth")
    return h


def rbf_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """(N, M) Gaussian kernel exp(-|x - y|^2 / (2 h^2))."""
    return np.exp(-squared_distances(x, y) / (2.0 * bandwidth**2))


def _mmd2_from_sums(
    sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray, trace_x: np.ndarray, trace_y: np.ndarray, m: int, n: int
) -> np.ndarray:
    """Unbiased MMD^2 from kernel block sums (diagonals removed from the within-sample sums)."""
    return (sxx - trace_x) / (m * (m - 1)) + (syy - trace_y) / (n * (n - 1)) - 2.0 * sxy / (m * n)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 between samples x (M, D) and y (N, D) under the RBF kernel (Gretton 2012, eq. 3)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("mmd2_unbiased needs at least two points per sample")
    kxx, kyy, kxy = rbf_kernel(x, x, bandwidth), rbf_kernel(y, y, bandwidth), rbf_kernel(x, y, bandwidth)
    return float(_mmd2_from_sums(kxx.sum(), kyy.sum(), kxy.sum(), np.trace(kxx), np.trace(kyy), m, n))


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, bandwidth: float, n_permutations: int = 200, seed: int = 0
) -> tuple[float, float]:
    """(MMD^2, p): the unbiased statistic and its permutation p-value (1 + #perm >= obs) / (1 + P)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("mmd_permutation_test needs at least two points per sample")
    pooled = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    k = rbf_kernel(pooled, pooled, bandwidth)  # (N, N)
    diag, total = np.diag(k), k.sum()
    rng = np.random.default_rng(seed)
    # Column 0 is the observed split; the rest relabel the pooled points at random.
    z = np.zeros((m + n, n_permutations + 1))
    z[:m, 0] = 1.0
    for j in range(1, n_permutations + 1):
        z[rng.permutation(m + n)[:m], j] = 1.0
    kz = k @ z  # (N, P+1): row sums of K restricted to each split's x-side
    sxx = (z * kz).sum(0)
    sxy = ((1.0 - z) * kz).sum(0)
    syy = total - sxx - 2.0 * sxy
    trace_x = diag @ z
    stats = _mmd2_from_sums(sxx, syy, sxy, trace_x, diag.sum() - trace_x, m, n)
    observed = float(stats[0])
    p = (1.0 + float(np.sum(stats[1:] >= observed - 1e-12))) / (1.0 + n_permutations)
    return observed, p


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """(p2 - p1, two-sided p) of the pooled two-proportion z-test; p = 1 when both rates are 0 or 1."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("two_proportion_test needs n1 >= 1 and n2 >= 1")
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    if se == 0:
        return p2 - p1, 1.0
    z = (p2 - p1) / se
    return p2 - p1, math.erfc(abs(z) / math.sqrt(2.0))


def welch_t_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean(b) - mean(a), two-sided p) of Welch's unequal-variance t-test."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("welch_t_test needs at least two values per sample")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(b.mean() - a.mean())
    se2 = va + vb
    if se2 == 0:
        return diff, 1.0 if diff == 0 else 0.0
    t = diff / math.sqrt(se2)
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, float(2.0 * sps.t.sf(abs(t), df))


def token_count_matrix(token_ids: list[list[int]], vocab_size: int) -> sparse.csr_matrix:
    """(N, V) sparse counts: row i counts the token ids of prompt i."""
    rows = np.repeat(np.arange(len(token_ids)), [len(t) for t in token_ids])
    cols = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64, count=len(rows))
    if len(cols) and (cols.min() < 0 or cols.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}): pass the tokenizer's vocabulary size")
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(token_ids), vocab_size))


def _js_columns(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence in bits between matching columns of two (V, P) count matrices."""
    p = p / p.sum(0, keepdims=True)
    q = q / q.sum(0, keepdims=True)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / m), 0.0)
        kq = np.where(q > 0, q * np.log2(q / m), 0.0)
    return 0.5 * kp.sum(0) + 0.5 * kq.sum(0)


def js_permutation_test(
    baseline: sparse.csr_matrix, window: sparse.csr_matrix, n_permutations: int = 2000, seed: int = 0, block: int = 200
) -> tuple[float, float]:
    """(JS, p): JS divergence of the pooled token counts of two prompt sets, and its permutation p-value.

    baseline (M, V) and window (N, V) count each prompt's tokens (token_count_matrix). Prompts, not
    tokens, are relabelled: the tokens of one prompt travel together, so the test holds although
    tokens within a prompt are not independent. p = (1 + #perm >= obs) / (1 + P).
    """
    m, n = baseline.shape[0], window.shape[0]
    if m < 1 or n < 1:
        raise ValueError("js_permutation_test needs at least one prompt per sample")
    pooled = sparse.vstack([baseline, window]).tocsr()
    keep = np.flatnonzero(np.asarray(pooled.sum(0)).ravel() > 0)
    pooled = pooled[:, keep]  # (M+N, V') only tokens seen somewhere
    rng = np.random.default_rng(seed)
    totals = np.asarray(pooled.sum(0)).T  # (V', 1)
    js = np.empty(n_permutations + 1)
    # Blocks of permutations keep the (M+N, block) split matrix small for windows of many rows.
    for start in range(0, n_permutations + 1, block):
        cols = range(start, min(start + block, n_permutations + 1))
        z = np.zeros((m + n, len(cols)))
        for c, j in enumerate(cols):
            z[:m, c] = 1.0 if j == 0 else 0.0  # column 0: the observed split
            if j > 0:
                z[rng.permutation(m + n)[:m], c] = 1.0
        side_a = np.asarray(pooled.T @ z)  # (V', block) baseline-side counts per split
        js[start : start + len(cols)] = _js_columns(side_a, totals - side_a)
    observed = float(js[0])
    return observed, (1.0 + float(np.sum(js[1:] >= observed - 1e-12))) / (1.0 + n_permutations)


def exceedance_test(
    baseline: np.ndarray, window: np.ndarray, tail: float = 0.01, side: Literal["upper", "lower"] = "upper"
) -> tuple[float, float]:
    """(share of window values beyond the baseline's tail cut, one-sided p) of a tail-exceedance test.

    The cut is the baseline's k-th most extreme value, k = max(1, floor(tail * M)). Under exchangeability
    the probability that a new value passes it is Beta(k, M + 1 - k), so the count of the N window values
    past it is beta-binomial(N, k, M + 1 - k) (Gumbel and von Schelling 1950); p = P(count >= observed).
    Values tied with the cut do not count as past it.
    """
    b = np.sort(np.asarray(baseline, dtype=np.float64))
    w = np.asarray(window, dtype=np.float64)
    if len(b) < 1 or len(w) < 1:
        raise ValueError("exceedance_test needs two non-empty samples")
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail {tail} is the baseline share beyond the cut: use a value in (0, 1)")
    k = max(1, int(math.floor(tail * len(b))))
    if side == "upper":
        count = int(np.sum(w > b[-k]))
    elif side == "lower":
        count = int(np.sum(w < b[k - 1]))
    else:
        raise ValueError(f"side {side!r}: use 'upper' or 'lower'")
    p = float(sps.betabinom.sf(count - 1, len(w), k, len(b) + 1 - k))
    return count / len(w), min(1.0, p)


def holm_adjust(pvalues: list[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values: reject p_i at family-wise level alpha iff adjusted_i < alpha.

    Sorted ascending, adjusted_(j) = max_{i <= j} min(1, (m - i + 1) p_(i)); valid under any dependence
    between the tests, so the chance that a window with no drift breaches any signal is at most alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if np.any((p < 0) | (p > 1)) or np.any(~np.isfinite(p)):
        raise ValueError("holm_adjust takes p-values in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson (1927) score interval of a rate k / n: (low, high)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = float(sps.norm.ppf(0.5 + confidence / 2.0))
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: rounding leaves ~1e-19 otherwise
    return low, 1.0 if k == n else min(1.0, centre + half)


def cusum(scores: np.ndarray, drift: float, threshold: float) -> tuple[np.ndarray, int | None]:
    """One-sided CUSUM (Page 1954): S_t = max(0, S_{t-1} + x_t - drift); (S, first t with S_t >= threshold or None)."""
    s, out, first = 0.0, [], None
    for t, x in enumerate(np.asarray(scores, dtype=np.float64)):
        s = max(0.0, s + float(x) - drift)
        out.append(s)
        if first is None and s >= threshold:
            first = t
    return np.array(out), first


def upper_quantile(values: np.ndarray, q: float) -> float:
    """The empirical q-quantile (inverted CDF: an observed value) of calibration values; the calibration rule."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        raise ValueError("upper_quantile needs at least one finite value: run more calibration windows")
    return float(np.quantile(v, q, method="inverted_cdf"))
