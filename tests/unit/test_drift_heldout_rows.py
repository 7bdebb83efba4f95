"""bench/drift_heldout.py's Disjoint: the windows of one figure never share a row, and their KL rows are real."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from drift_heldout import Disjoint, Rows  # noqa: E402


def pool(n: int, kl_every: int) -> Rows:
    kl = np.full(n, np.nan)
    kl[::kl_every] = 1.0
    z = np.zeros(n)
    return Rows(
        [f"p{j}" for j in range(n)],
        [""] * n,
        [[j] for j in range(n)],
        ["x"] * n,
        z,
        np.zeros((n, 2)),
        kl,
        z,
        z,
        z,
        z,
        z,
        z,
    )


def test_windows_share_no_row_and_take_their_kl_rows_from_rows_with_kl():
    pools = {"clean": pool(100, 4), "paraphrase": pool(30, 2)}
    rows = Disjoint(pools, 0, "test")
    seen: set[tuple[str, int]] = set()
    for _ in range(4):  # 4 windows of 20 rows, share 0.25: 15 clean + 5 drifted each
        picks, with_kl = rows.picks("paraphrase", 0.25, 20, kl_prompts=6)
        assert with_kl == 6 and len(picks) == 20
        assert sum(k == "paraphrase" for k, _ in picks) == 5
        assert all(np.isfinite(pools[k].kl[j]) for k, j in picks[:with_kl])
        assert not seen & set(picks)
        seen |= set(picks)
    assert rows.used == {"clean": 60, "paraphrase": 20}


def test_a_figure_that_needs_more_rows_than_the_pool_stops_and_says_so():
    rows = Disjoint({"clean": pool(50, 5)}, 0, "false alarms")
    rows.picks("clean", 0.0, 30, kl_prompts=6)
    with pytest.raises(SystemExit, match="used up after 30 rows"):
        rows.picks("clean", 0.0, 30, kl_prompts=6)
