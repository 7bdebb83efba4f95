"""Comparing training algorithms on one frontier: the table and the winner, from what evaluation measured.

Pure functions over per-run summaries (no torch, MLflow or Prefect), tested on hand-worked
numbers. Each ``AlgorithmRun`` is one algorithm trained with one seed from the shared SFT
policy and reward model, then evaluated by the same evaluate stage: its checkpoints on the
selection split (``frontier``: judge score against KL, as in Gao et al. 2022) and its chosen
checkpoint on the untouched test split (``metrics``, the ``eval/*`` names of docs/metrics.md).

The winner is the algorithm with the highest mean test-split judge score over its seeds among
those whose chosen checkpoint stayed within the KL budget in every seed: a policy that bought
its reward with more KL than the budget allows does not win, whatever it scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("kl", "eval/kl_mean"),
    ("win_rate_vs_sft", "eval/win_rate_vs_sft"),
    ("intent_accuracy", "eval/intent_accuracy"),
    ("violation_rate", "eval/violation_rate"),
    ("distinct_2", "eval/distinct_2"),
)
"""Table column -> the test-split metric of the chosen checkpoint it averages (absent metrics give nan)."""


@dataclass(frozen=True)
class FrontierPoint:
    """One checkpoint on the selection split: its step, mean sequence KL to SFT (nats) and mean judge score."""

    step: int
    kl: float
    judge: float


@dataclass(frozen=True)
class AlgorithmRun:
    """One algorithm and seed: its checkpoints' frontier, its chosen checkpoint's test metrics, its cost."""

    algorithm: str
    seed: int
    judge: float
    """Mean test-split judge score of the chosen checkpoint (gold judge, held-out or own reward model)."""
    within_budget: bool
    """The chosen checkpoint's selection-split KL is within the KL budget."""
    metrics: dict[str, float]
    frontier: tuple[FrontierPoint, ...] = ()
    wall_s: float = math.nan
    """Wall time of the training stage run (loading, training, checkpoint logging)."""
    units: float = math.nan
    """Episodes (PPO, RLOO, GRPO: sampled responses) or preference pairs (DPO) the training consumed."""
    unit: str = "episodes"


@dataclass(frozen=True)
class AlgorithmRow:
    """One row of the comparison table: an algorithm's means over its seeds."""

    algorithm: str
    seeds: int
    judge: float
    judge_min: float
    judge_max: float
    within_budget: bool
    """Every seed's chosen checkpoint is within the KL budget."""
    wall_s: float
    throughput: float
    """units / wall_s, per second."""
    unit: str
    columns: dict[str, float] = field(default_factory=dict)
    """TABLE_METRICS column -> mean over seeds."""


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarise(runs: list[AlgorithmRun]) -> list[AlgorithmRow]:
    """One row per algorithm (in first-seen order): means over seeds, the judge's range, the budget verdict."""
    rows = []
    for algorithm in dict.fromkeys(r.algorithm for r in runs):
        mine = [r for r in runs if r.algorithm == algorithm]
        judges = [r.judge for r in mine]
        wall = _mean([r.wall_s for r in mine])
        units = _mean([r.units for r in mine])
        rows.append(
            AlgorithmRow(
                algorithm=algorithm,
                seeds=len(mine),
                judge=_mean(judges),
                judge_min=min(judges),
                judge_max=max(judges),
                within_budget=all(r.within_budget for r in mine),
                wall_s=wall,
                throughput=units / wall if wall and not math.isnan(wall) else math.nan,
                unit=mine[0].unit,
                columns={name: _mean([r.metrics.get(key, math.nan) for r in mine]) for name, key in TABLE_METRICS},
            )
        )
    return rows


def winner(rows: list[AlgorithmRow]) -> str | None:
    """The algorithm with the highest mean judge score among those within the KL budget in every seed
    (ties: the lower mean KL); None when none stayed within it."""
    eligible = [r for r in rows if r.within_budget and not math.isnan(r.judge)]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r.judge, -r.columns.get("kl", 0.0))).algorithm


def format_comparison(rows: list[AlgorithmRow], judge_kind: str, kl_budget: float | None, best: str | None) -> str:
    """Markdown table of the comparison, one row per algorithm, and the verdict."""
    lines = [
        f"| algorithm | seeds | {judge_kind} (test, mean [min, max]) | within budget | KL | win rate vs SFT "
        "| intent accuracy | violation rate | distinct-2 | wall time (s) | throughput |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.columns
        lines.append(
            f"| {r.algorithm}{' (winner)' if r.algorithm == best else ''} | {r.seeds} | {r.judge:.3f} "
            f"[{r.judge_min:.3f}, {r.judge_max:.3f}] | {'yes' if r.within_budget else 'no'} | {c['kl']:.2f} | "
            f"{c['win_rate_vs_sft']:.3f} | {c['intent_accuracy']:.3f} | {c['violation_rate']:.3f} | "
            f"{c['distinct_2']:.3f} | {r.wall_s:.0f} | {r.throughput:.1f} {r.unit}/s |"
        )
    if kl_budget is None:
        verdict = f"Winner (no KL budget): **{best}**"
    elif best:
        verdict = f"Winner within the KL budget of {kl_budget:g} nats: **{best}**"
    else:
        verdict = f"No algorithm's chosen checkpoint stayed within the KL budget of {kl_budget:g} nats in every seed: no winner"
    return "\n".join(lines) + "\n\n" + verdict
