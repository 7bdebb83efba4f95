"""Name the likely cause of a drift alert, say what to inspect, and write the report (markdown + plots).

The rules, in order (the first that fires is the cause; the others that would
also fire are listed as "also consistent with"):

1. **input shift**: an ``input`` signal breached (prompt tokens, intents, prompt
   embeddings, prompt length, or the champion's KL to the reference on live
   prompts). The model meets prompts it was not trained on; whatever happens
   to the responses follows from that. Inspect the data lineage and the
   drifted prompts; retrain with them.
2. **reward-model blind spot**: prompts unchanged; gold reward or user feedback
   fell while the reward model's score held or rose (``rm_gold_gap``). The
   reward model scores responses it cannot judge. Inspect the reward-model run
   and the responses it over-scores; collect preferences on them.
3. **policy drift**: prompts unchanged; the served responses moved (reward-model
   score, length, NLL under the registered champion, refusal or violation rate)
   or quality fell with the reward model agreeing. The served policy does not
   behave like the registered checkpoint. Inspect the PPO run and its
   checkpoints, and what is actually deployed; roll back if needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Cause = Literal["input_shift", "reward_model_blind_spot", "policy_drift"]
CAUSE_TITLES: dict[str, str] = {
    "input_shift": "input shift",
    "reward_model_blind_spot": "reward-model blind spot",
    "policy_drift": "policy drift",
}


@dataclass(frozen=True)
class Diagnosis:
    """The likely cause of an alert (None when nothing breached) and why."""

    cause: Cause | None
    breached: tuple[str, ...]
    """Names of the breached signals."""
    also: tuple[Cause, ...] = ()
    """Other causes whose rule also fires (secondary)."""
    reasons: tuple[str, ...] = ()
    """The breached signals' one-line summaries, the evidence."""


@dataclass(frozen=True)
class Inspect:
    """A run or checkpoint to look at, and why."""

    what: str
    ref: str


@dataclass
class ReportContext:
    """What the report names besides the signals: the model version, window, lineage and examples."""

    model_name: str
    version: str
    window_index: int
    window_path: str
    monitor_run_id: str | None = None
    inspect: list[Inspect] = field(default_factory=list)
    examples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    """Section title -> (prompt, response, note) rows."""
    plots: list[str] = field(default_factory=list)
    """Plot file names, relative to the report."""


def diagnose(signals: list) -> Diagnosis:
    """Apply the rules (module docstring) to the signals of one window."""
    breached = [s for s in signals if s.breached]
    if not breached:
        return Diagnosis(None, ())
    by_category = {s.category for s in breached}
    fired: list[Cause] = []
    if "input" in by_category:
        fired.append("input_shift")
    if "judge" in by_category:
        fired.append("reward_model_blind_spot")
    if by_category & {"response", "quality"}:
        fired.append("policy_drift")
    return Diagnosis(fired[0], tuple(s.name for s in breached), tuple(fired[1:]), tuple(s.summary for s in breached))


def inspect_targets(cause: Cause, lineage) -> list[Inspect]:
    """The runs and checkpoints to open first for a cause (lineage: rlhf.drift.lineage.Lineage)."""
    runs = lineage.stage_runs
    out = [Inspect(f"registered model {lineage.model_name} version {lineage.version} (source)", lineage.policy_uri)]
    if cause == "input_shift":
        out.append(Inspect("pipeline run (data fingerprints: tags data.fingerprint.*)", lineage.pipeline_run_id))
        if "validate" in runs:
            out.append(Inspect("data-validation run (training data profile)", runs["validate"]))
        if "sft" in runs:
            out.append(Inspect("SFT run (reference policy)", runs["sft"]))
        out.append(Inspect("reference checkpoint", lineage.reference_uri))
    elif cause == "reward_model_blind_spot":
        if "reward" in runs:
            out.append(Inspect("reward-model run (reward/accuracy, training pairs)", runs["reward"]))
        out.append(Inspect("reward-model checkpoint", lineage.reward_model_uri))
        if "evaluate" in runs:
            out.append(Inspect("evaluation run (proxy vs gold at registration)", runs["evaluate"]))
    else:
        name = lineage.algorithm.upper()
        if lineage.algorithm in runs:
            out.append(Inspect(f"{name} run (its KL and score metrics per step)", runs[lineage.algorithm]))
        for step, uri in sorted(lineage.policy_checkpoints.items()):
            out.append(Inspect(f"{name} checkpoint step {step}", uri))
        if "evaluate" in runs:
            out.append(Inspect("evaluation run (checkpoint choice)", runs["evaluate"]))
    return out


def render_report(diagnosis: Diagnosis, signals: list, metrics: dict[str, float], ctx: ReportContext) -> str:
    """The diagnosis report as markdown."""
    status = "ALERT" if diagnosis.cause else "no alert"
    lines = [
        f"# Drift report: {ctx.model_name} v{ctx.version}, window {ctx.window_index} ({status})",
        "",
        f"- window: `{ctx.window_path}` ({int(metrics.get('drift/rows', 0))} rows of this version)",
    ]
    if ctx.monitor_run_id:
        lines.append(f"- monitoring run: `{ctx.monitor_run_id}`")
    if diagnosis.cause:
        lines += [
            f"- **likely cause: {CAUSE_TITLES[diagnosis.cause]}**"
            + (
                f" (also consistent with: {', '.join(CAUSE_TITLES[c] for c in diagnosis.also)})"
                if diagnosis.also
                else ""
            ),
            f"- breached: {', '.join(diagnosis.breached)}",
            "",
            "## Evidence",
            "",
            *[f"- {reason}" for reason in diagnosis.reasons],
        ]
    lines += [
        "",
        "## Signals",
        "",
        "| signal | category | value | threshold | p-value | Holm-adjusted p | breached |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in signals:
        p = "" if s.pvalue is None else f"{s.pvalue:.2g}"
        adj = "" if s.adjusted_pvalue is None else f"{s.adjusted_pvalue:.2g}"
        lines.append(
            f"| {s.name} | {s.category} | {s.value:.4f} | {s.threshold:g} | {p} | {adj} | "
            f"{'**yes**' if s.breached else 'no'} |"
        )
    if ctx.inspect:
        lines += ["", "## Inspect", ""] + [f"- {i.what}: `{i.ref}`" for i in ctx.inspect]
    for title, rows in ctx.examples.items():
        if not rows:
            continue
        lines += ["", f"## {title}", "", "| prompt | response | note |", "|---|---|---|"]
        lines += [f"| {_cell(p)} | {_cell(r)} | {_cell(n)} |" for p, r, n in rows]
    if ctx.plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in ctx.plots]
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 160) -> str:
    """Text fit for one markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_window(baseline, window, out_dir: str | Path) -> list[Path]:
    """Baseline-vs-window plots (intents, prompt length, reward score, NLL, length, gold) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = baseline.profile
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    # 1. intents, as shares
    b_counts = prof["prompts"]["intent_counts"]
    w_counts = {i: window.prompts.intents.count(i) for i in set(window.prompts.intents)}
    keys = sorted(set(b_counts) | set(w_counts))
    x = np.arange(len(keys))
    b_total, w_total = sum(b_counts.values()), sum(w_counts.values())
    axes[0, 0].bar(x - 0.2, [b_counts.get(k, 0) / b_total for k in keys], 0.4, label="baseline")
    axes[0, 0].bar(x + 0.2, [w_counts.get(k, 0) / w_total for k in keys], 0.4, label="window")
    axes[0, 0].set_xticks(x, keys, rotation=30)
    axes[0, 0].set_title("prompt intents (share)")
    axes[0, 0].legend()
    # 2.-6. scalar distributions
    panels = [
        (axes[0, 1], "prompt length (tokens)", baseline.array("prompts", "lengths"), window.prompts.lengths),
        (axes[0, 2], "reward-model score", baseline.array("responses", "rm_scores"), window.responses.rm_scores),
        (axes[1, 0], "response NLL under champion", baseline.array("responses", "nll"), window.responses.nll),
        (axes[1, 1], "response length (tokens)", baseline.array("responses", "lengths"), window.responses.lengths),
    ]
    if window.responses.gold is not None and prof["responses"]["gold"] is not None:
        panels.append((axes[1, 2], "gold reward", baseline.array("responses", "gold"), window.responses.gold))
    else:
        axes[1, 2].axis("off")
    for ax, title, b, w in panels:
        b, w = b[np.isfinite(b)], w[np.isfinite(w)]
        bins = np.histogram_bin_edges(np.concatenate([b, w]), bins=30)
        ax.hist(b, bins=bins, density=True, alpha=0.5, label="baseline")
        ax.hist(w, bins=bins, density=True, alpha=0.5, label="window")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "distributions.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]
