"""Comparison stage: several algorithms (and seeds) from one SFT policy and reward model, on one frontier.

The compare flow (flows/compare.py) trains and evaluates each algorithm and seed under its own
child run of the comparison's parent run (``algorithm_run``); this stage then reads what the
evaluate stages logged, by reference, and logs a ``comparison`` run with

- ``compare/frontier.png``: the judge score against sqrt(KL to SFT) of every checkpoint of every
  algorithm on the selection split (Gao et al. 2022's axes), one colour per algorithm, one marker
  per seed, the chosen checkpoints starred, the KL budget as a line;
- ``compare/table.json`` and the metrics ``compare/<algorithm>/<column>``: per algorithm, the mean
  over seeds of the chosen checkpoint's test-split judge score, KL, win rate vs SFT, intent
  accuracy, violation rate and distinct-2, the training's wall time and its throughput
  (episodes/s; pairs/s for DPO);
- the tag ``compare.winner``: the best algorithm within the KL budget (rlhf/evaluation/comparison.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from rlhf.config import PipelineConfig
from rlhf.evaluation.comparison import (
    AlgorithmRow,
    AlgorithmRun,
    FrontierPoint,
    format_comparison,
    summarise,
    winner,
)
from rlhf.infra.progress import in_prefect_run
from rlhf.infra.tracking import stage_run
from tasks.common import Evaluation, PPOResult

COMPARE = "compare"


@dataclass(frozen=True)
class Candidate:
    """One algorithm and seed of a comparison: its config, its child run, what it trained and how it evaluated."""

    algorithm: str
    seed: int
    config: PipelineConfig
    run_id: str
    policy: PPOResult
    evaluation: Evaluation


@dataclass(frozen=True)
class Comparison:
    """The comparison run, its table (one row per algorithm) and the winner within the KL budget (or None)."""

    run_id: str
    rows: list[AlgorithmRow]
    winner: str | None
    markdown: str


@contextmanager
def algorithm_run(parent_run_id: str, algorithm: str, seed: int) -> Iterator[str]:
    """The child run of one algorithm and seed under the comparison's parent run (yields its id); its stages
    (training, evaluation) nest under it."""
    with stage_run(parent_run_id, f"{algorithm}-seed{seed}") as run:
        mlflow.set_tags({"rlhf.algorithm": algorithm, "rlhf.seed": str(seed)})
        yield run.info.run_id


def consumed(cfg: PipelineConfig, policy: PPOResult) -> tuple[float, str]:
    """(units, unit) the policy training consumed: sampled episodes, or preference pairs for DPO."""
    if cfg.algorithm == "ppo":
        steps = policy.stopped_at if policy.stopped_at is not None else cfg.ppo.steps
        return float(steps * cfg.ppo.batch_size), "episodes"
    section = getattr(cfg, cfg.algorithm)
    return float(max(policy.checkpoints) * section.batch_size), "pairs" if cfg.algorithm == "dpo" else "episodes"


def measured_run(candidate: Candidate) -> AlgorithmRun:
    """What the candidate's stage runs logged: the frontier (selection split), the test metrics, the wall time."""
    client = MlflowClient()
    evaluation = candidate.evaluation
    history = {
        name: {m.step: m.value for m in client.get_metric_history(evaluation.run_id, f"eval/selection/{name}")}
        for name in ("kl_mean", "judge_score_mean")
    }
    frontier = tuple(
        FrontierPoint(step, history["kl_mean"][step], history["judge_score_mean"][step])
        for step in sorted(history["kl_mean"])
    )
    info = client.get_run(candidate.policy.final.run_id).info
    wall_s = (info.end_time - info.start_time) / 1000 if info.end_time else math.nan
    units, unit = consumed(candidate.config, candidate.policy)
    return AlgorithmRun(
        algorithm=candidate.algorithm,
        seed=candidate.seed,
        judge=evaluation.judge_score,
        within_budget=bool(evaluation.metrics["eval/kl_within_budget"]),
        metrics=evaluation.metrics,
        frontier=frontier,
        wall_s=wall_s,
        units=units,
        unit=unit,
    )


def run_compare(cfg: PipelineConfig, candidates: list[Candidate], parent_run_id: str) -> Comparison:
    """Log the comparison run: the frontier plot, the table and the winner (see the module docstring)."""
    runs = [measured_run(c) for c in candidates]
    rows = summarise(runs)
    best = winner(rows)
    judge_kind = candidates[0].evaluation.tags["eval.judge"]
    kl_budget = candidates[0].evaluation.metrics.get("eval/kl_budget")
    markdown = format_comparison(rows, judge_kind, kl_budget, best)
    with stage_run(parent_run_id, COMPARE, {"compare.algorithms": ",".join(r.algorithm for r in rows)}) as run:
        mlflow.log_figure(plot_frontier(runs, judge_kind, kl_budget), "compare/frontier.png")
        mlflow.log_table(comparison_table(rows), artifact_file="compare/table.json")
        mlflow.log_table(frontier_table(runs), artifact_file="compare/frontier.json")
        mlflow.log_text(markdown, "compare/summary.md")
        for row in rows:
            values = {"judge_mean": row.judge, "wall_s": row.wall_s, "throughput": row.throughput, **row.columns}
            mlflow.log_metrics({f"compare/{row.algorithm}/{k}": v for k, v in values.items() if not math.isnan(v)})
        mlflow.set_tags({"compare.winner": best or "none", "compare.judge": judge_kind})
        if in_prefect_run():
            create_markdown_artifact(markdown, key="comparison", description="Algorithms compared on one frontier")
        return Comparison(run.info.run_id, rows, best, markdown)


def comparison_table(rows: list[AlgorithmRow]) -> dict[str, list]:
    """The comparison as columns (MLflow table): one row per algorithm."""
    table: dict[str, list] = {
        "algorithm": [r.algorithm for r in rows],
        "seeds": [r.seeds for r in rows],
        "judge_mean": [r.judge for r in rows],
        "judge_min": [r.judge_min for r in rows],
        "judge_max": [r.judge_max for r in rows],
        "within_budget": [r.within_budget for r in rows],
    }
    for name in rows[0].columns:
        table[name] = [r.columns[name] for r in rows]
    table.update(
        {
            "wall_s": [r.wall_s for r in rows],
            "throughput_per_s": [r.throughput for r in rows],
            "unit": [r.unit for r in rows],
        }
    )
    return table


def frontier_table(runs: list[AlgorithmRun]) -> dict[str, list]:
    """Every checkpoint of every run: the numbers behind the frontier plot."""
    rows = [(r, p) for r in runs for p in r.frontier]
    return {
        "algorithm": [r.algorithm for r, _ in rows],
        "seed": [r.seed for r, _ in rows],
        "step": [p.step for _, p in rows],
        "kl": [p.kl for _, p in rows],
        "sqrt_kl": [math.sqrt(max(p.kl, 0.0)) for _, p in rows],
        "judge": [p.judge for _, p in rows],
    }


def plot_frontier(runs: list[AlgorithmRun], judge_kind: str, kl_budget: float | None):
    """Judge score against sqrt(KL) of every checkpoint: one colour per algorithm, one marker per seed."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot global state

    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    markers = ("o", "s", "^", "D", "v", "P")
    algorithms = list(dict.fromkeys(r.algorithm for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    fig = Figure(figsize=(7, 5), dpi=100)
    ax = fig.add_subplot()
    for run in runs:
        colour = colours[algorithms.index(run.algorithm) % len(colours)]
        marker = markers[seeds.index(run.seed) % len(markers)]
        x = [math.sqrt(max(p.kl, 0.0)) for p in run.frontier]
        ax.plot(x, [p.judge for p in run.frontier], marker=marker, linestyle="-", color=colour, alpha=0.8)
        chosen = run.metrics.get("eval/best_checkpoint_step")
        for xi, p in zip(x, run.frontier):
            if p.step == chosen:
                ax.plot([xi], [p.judge], "*", color=colour, markeredgecolor="black", markersize=14)
    for i, algorithm in enumerate(algorithms):
        ax.plot([], [], "-", color=colours[i % len(colours)], label=algorithm)
    for j, seed in enumerate(seeds):
        ax.plot([], [], markers[j % len(markers)], color="grey", linestyle="none", label=f"seed {seed}")
    ax.plot([], [], "*", color="white", markeredgecolor="black", markersize=12, label="chosen checkpoint")
    if kl_budget is not None:
        ax.axvline(math.sqrt(kl_budget), color="grey", linestyle=":", label="KL budget")
    ax.set_xlabel("sqrt(KL(pi || pi_sft)) [sqrt nats], selection split")
    ax.set_ylabel(f"{judge_kind} score (mean)")
    ax.set_title("Algorithms on one frontier: every checkpoint (leftmost point: SFT)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=4, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


@task(name=COMPARE, cache_policy=NO_CACHE)
def compare_task(cfg: PipelineConfig, candidates: list[Candidate], parent_run_id: str) -> Comparison:
    """The comparison run: frontier plot, table and winner of the algorithms trained in this flow run."""
    return run_compare(cfg, candidates, parent_run_id)
