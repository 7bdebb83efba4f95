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
