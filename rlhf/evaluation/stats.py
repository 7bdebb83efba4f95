"""Small statistics for evaluation: win rates with confidence intervals, distinct-n."""

from __future__ import annotations

import math


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion wins/n (ties count half a win)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p = wins / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams in texts (Li et al. 2016); 0 when there are none."""
    total, unique = 0, set()
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def distinct_count(texts: list[str]) -> int:
    """Number of different texts, compared after stripping surrounding whitespace (a collapsed policy repeats a few)."""
    return len({text.strip() for text in texts})


def group_rates(groups: list[str], hits: list[bool]) -> dict[str, tuple[int, float]]:
    """group -> (count, share of hits in it), groups in sorted order; e.g. intent accuracy per intent."""
    if len(groups) != len(hits):
        raise ValueError(f"group_rates needs one group per value, got {len(groups)} and {len(hits)}")
    counts: dict[str, list[int]] = {}
    for group, hit in zip(groups, hits):
        count = counts.setdefault(group, [0, 0])
        count[0] += 1
        count[1] += int(hit)
    return {g: (n, k / n) for g, (n, k) in sorted(counts.items())}


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Sample mean and its standard error (sample std / sqrt(n); 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_se needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation of x and y; 0 when either is constant (no linear relation to see)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"pearson needs two equal-length lists of >= 2 values, got {len(x)} and {len(y)}")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def win_count(a_scores: list[float], b_scores: list[float]) -> float:
    """Pairwise wins of a over b by score: 1 per win, 0.5 per tie (the win-rate numerator)."""
    if len(a_scores) != len(b_scores):
        raise ValueError(f"win_count needs paired scores, got {len(a_scores)} and {len(b_scores)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores))
