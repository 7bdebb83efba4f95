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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import special
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
