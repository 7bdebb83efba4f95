"""Inter-rater agreement on rankings: pairwise agreement and Krippendorff's alpha. numpy only.

Several raters rank the same k responses of a prompt. Two figures:

- **pairwise agreement**: over every prompt, every two raters of it and every two responses, the share of
  comparisons where both raters give the same verdict (first better, tie, or second better). Easy to read,
  but not corrected for chance: two raters who rank at random agree on about 1/2 of untied comparisons.
- **Krippendorff's alpha** (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"): 1 - D_o / D_e,
  observed over chance disagreement from the coincidence matrix; 1 is perfect agreement, 0 chance, below 0
  systematic disagreement. It allows any number of raters per prompt and missing ratings. The unit is one
  response of one prompt, its values the ranks raters gave it. We use the **ordinal** level for ranks: their
  order is meaningful, their distances are not (rank 1 vs 2 need not be as far apart as 3 vs 4), which is the
  case the ordinal metric is built for; nominal would count 1 vs 4 the same as 1 vs 2, interval would assume
  equal spacing. All three levels are implemented and tested.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Literal

import numpy as np

Level = Literal["nominal", "ordinal", "interval"]


def _verdict(ranks: Sequence[int], i: int, j: int) -> int:
    """-1: response i ranked better, 0: tie, 1: response j ranked better."""
    return int(np.sign(ranks[i] - ranks[j]))


def pairwise_agreement(rankings: Mapping[str, Mapping[str, Sequence[int]]]) -> tuple[float | None, int]:
    """(share of agreeing comparisons, number of comparisons) over prompts rated by two or more raters.

    ``rankings``: prompt id -> rater -> ranks of that prompt's responses (same order for every rater).
    None when no prompt has two raters.
    """
    agree = total = 0
    for prompt, by_rater in rankings.items():
        lists = list(by_rater.values())
        k = {len(r) for r in lists}
        if len(k) > 1:
            raise ValueError(f"prompt {prompt}: raters ranked different numbers of responses {sorted(k)}")
        for a, b in combinations(lists, 2):
            for i, j in combinations(range(len(a)), 2):
                total += 1
                agree += _verdict(a, i, j) == _verdict(b, i, j)
    return (agree / total if total else None), total


def _delta2(values: np.ndarray, n_c: np.ndarray, level: Level) -> np.ndarray:
    """(V, V) squared difference of each two values under ``level``; ``values`` sorted, ``n_c`` their counts."""
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    if level == "ordinal":
        # (sum of n_g for g from c to k) - (n_c + n_k) / 2, squared
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        lo = np.minimum.outer(np.arange(len(values)), np.arange(len(values)))
        hi = np.maximum.outer(np.arange(len(values)), np.arange(len(values)))
        between = cum[hi + 1] - cum[lo]
        return (between - (n_c[:, None] + n_c[None, :]) / 2.0) ** 2
    raise ValueError(f"unknown level {level!r}: use 'nominal', 'ordinal' or 'interval'")


def krippendorff_alpha(units: Sequence[Sequence[float]], level: Level = "ordinal") -> float | None:
    """Krippendorff's alpha of ``units`` (each: the values raters gave one unit; missing ones left out).

    Units with fewer than two values are not pairable and are ignored. None when fewer than two pairable values
    remain or every value is the same (no expected disagreement: alpha is undefined).
    """
    pairable = [np.asarray(u, dtype=np.float64) for u in units if len(u) >= 2]
    if not pairable:
        return None
    values = np.unique(np.concatenate(pairable))  # (V,) sorted
    index = {v: i for i, v in enumerate(values)}
    # 1. coincidence matrix: each ordered pair of values from different raters in a unit, weighted 1 / (m_u - 1)
    o = np.zeros((len(values), len(values)))
    for u in pairable:
        m = len(u)
        for a in range(m):
            for b in range(m):
                if a != b:
                    o[index[u[a]], index[u[b]]] += 1.0 / (m - 1)
    n_c = o.sum(axis=1)  # (V,)
    n = n_c.sum()
    # 2. observed and expected disagreement
    d2 = _delta2(values, n_c, level)
    d_o = float((o * d2).sum() / n)
    d_e = float((np.outer(n_c, n_c) * d2).sum() / (n * (n - 1)))
    if d_e == 0.0:
        return None
    return 1.0 - d_o / d_e


def ranking_units(rankings: Mapping[str, Mapping[str, Sequence[int]]]) -> list[list[float]]:
    """Krippendorff units of rankings: one per (prompt, response), holding the ranks its raters gave it."""
    units = []
    for by_rater in rankings.values():
        lists = list(by_rater.values())
        for i in range(len(lists[0])):
            units.append([float(r[i]) for r in lists])
    return units
