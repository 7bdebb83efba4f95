"""Drift monitoring of the champion on one window of production traffic.

``run_monitor`` takes the latest window (or a chosen one) of the traffic glob,
loads the monitored version's lineage (policy, reference, reward model) and
baseline, measures the window (rlhf/drift/features.py), tests it against the
baseline (rlhf/drift/signals.py) and diagnoses any breach (rlhf/drift/diagnosis.py).

MLflow, experiment ``rlhf-monitoring``: one *series* run per model version holds
every window's ``drift/*`` metrics at step = window index (the time series), and
one child *window* run per window holds that window's metrics, the diagnosis
report (``report/diagnosis.md`` + PNG) and the tags ``drift.alert`` and
``drift.cause``. On a breach the model version gets the tags ``drift.alert``
(the cause), ``drift.alert_window`` and ``drift.alert_run_id``.
``raise_alert`` does the Prefect side: the event ``rlhf.drift.alert``, on which the
``retrain-on-drift`` deployment's trigger (prefect.yaml) starts a retraining, and a
markdown artifact.
"""

from __future__ import annotations

import glob
import hashlib
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.builtin import traffic as simulator
from rlhf.builtin.task import SUPPORT_TASK
from rlhf.config import MonitorConfig, ValidationConfig
from rlhf.data.loading import DataError, load_standard
from rlhf.drift.diagnosis import Diagnosis, ReportContext, diagnose, inspect_targets, plot_window, render_report
from rlhf.drift.features import embed_prompts, max_sequence_length, prompt_features, response_features, sample_kl
from rlhf.drift.lineage import Lineage, LineageError, resolve_lineage
from rlhf.drift.profile import Baseline, load_baseline
from rlhf.drift.signals import Signal, WindowFeatures, compute_signals
from rlhf.feedback.batches import BatchManifest, read_manifest, save_pairs, validate_batch
from rlhf.feedback.pairs import Rated, production_pairs
from rlhf.infra.distributed import device as distributed_device
from rlhf.infra.progress import in_prefect_run
from rlhf.infra.security import redact_text
from rlhf.infra.tracking import download, end_dead_runs, heartbeat, owner_tags, setup_experiment
from rlhf.validation.checks import BLANK_REGEX, bad_timestamps

REPORT_ARTIFACT = "report"
EXAMPLES = 5


@dataclass(frozen=True)
class TrafficWindow:
    """One traffic file and its position in the sorted glob (the MLflow step)."""

    path: str
    index: int


@dataclass
class MonitorModels:
    """The monitored version's lineage, baseline and loaded models (loaded once, reused across windows)."""

    lineage: Lineage
    baseline: Baseline
    tokenizer: PreTrainedTokenizerBase
    policy: PreTrainedModel
    reference: PreTrainedModel
    reward_model: PreTrainedModel


@dataclass
class WindowAnalysis:
    """Metrics, signals and diagnosis of one window, and the features behind them."""

    metrics: dict[str, float]
    signals: list[Signal]
    diagnosis: Diagnosis
    features: WindowFeatures
    prompts: list[str]
    responses: list[str]


@dataclass(frozen=True)
class MonitorResult:
    """What one monitoring run found, by reference."""

    model_name: str
    version: str
    window_path: str
    window_index: int
    skipped: bool
    alert: bool = False
    cause: str | None = None
    breached: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    series_run_id: str | None = None
    report_markdown: str = ""
    feedback_batch: str | None = None
    """The folder of the preference pairs this window's thumbs up/down became (None when it had none)."""
    signals: tuple[Signal, ...] = ()
    """Every drift test of the window, breached or not (what `rlhf monitor` prints)."""


def find_window(cfg: MonitorConfig) -> TrafficWindow:
    """The window to monitor: cfg.window_index of the sorted glob, else the latest."""
    files = sorted(glob.glob(cfg.traffic))
    if not files:
        raise FileNotFoundError(
            f"no traffic window matches {cfg.traffic!r}: simulate some with `rlhf traffic --kind new_intent` "
            "(writes traffic/window_NNNN.jsonl) or point --traffic (monitor.traffic) at your JSONL windows"
        )
    index = len(files) - 1 if cfg.window_index is None else cfg.window_index
    if index >= len(files):
        raise IndexError(
            f"window_index {index} is past the {len(files)} windows matching {cfg.traffic!r}: use 0..{len(files) - 1}"
        )
    return TrafficWindow(str(Path(files[index]).resolve()), index)


def load_models(cfg: MonitorConfig, client: MlflowClient | None = None) -> MonitorModels:
    """Resolve the monitored version (alias or number), load its baseline and checkpoints."""
    client = client or MlflowClient()
    lineage = resolve_lineage(client, cfg.registered_model, cfg.version, cfg.alias)
    if lineage.baseline_uri is None:
        raise LineageError(
            f"{lineage.model_name} version {lineage.version} has no baseline.uri tag: compute its baseline with "
            "tasks.baseline.run_baseline (the pipeline does so at registration)"
        )
    baseline = load_baseline(lineage.baseline_uri)
    with tempfile.TemporaryDirectory(prefix="rlhf-monitor-") as scratch:  # the models are read into memory
        policy_dir, ref_dir, rm_dir = (
            str(download(u, scratch)) for u in (lineage.policy_uri, lineage.reference_uri, lineage.reward_model_uri)
        )
        device = distributed_device()
        trust = lineage.trust_remote_code  # as the version was trained (tag written at registration)
        tokenizer = load_tokenizer(ref_dir, trust)
        return MonitorModels(
            lineage,
            baseline,
            tokenizer,
            load_causal_lm(policy_dir, trust_remote_code=trust).to(device).eval(),
            load_causal_lm(ref_dir, trust_remote_code=trust).to(device).eval(),
            load_reward_model(rm_dir, tokenizer.pad_token_id, trust_remote_code=trust).to(device).eval(),
        )


def load_window(path: str) -> pd.DataFrame:
    """A traffic window's rows, checked before any model is loaded: every row has a time, a version and text.

    Raises DataError naming the file, the column, example lines and the fix (a null prompt would otherwise
    reach the feature code as NaN, and an unparseable time pass unnoticed).
    """
    loaded = load_standard(path, "traffic")
    frame, where = loaded.frame, loaded.source.where
    missing = [c for c in ("timestamp", "prompt", "response", "model_version") if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: traffic rows need the columns {missing}. Fix: write timestamp, prompt, response, model_version"
        )

    def fail(bad: pd.Series, problem: str, fix: str) -> None:
        rows = [where(i + 1) for i in np.flatnonzero(bad.to_numpy())]
        if rows:
            raise DataError(
                f"{path}: {problem} in {len(rows)} of {len(frame)} rows (e.g. {', '.join(rows[:3])}). Fix: {fix}"
            )

    for column in ("prompt", "response"):
        values = frame[column]
        is_text = values.map(lambda v: isinstance(v, str)).astype(bool)
        blank = values.where(is_text, "").astype(str).str.match(BLANK_REGEX).astype(bool)
        fail(
            ~is_text | blank,
            f"{column!r} is null, not text, or blank",
            f"drop those rows or log the {column} text; `rlhf validate {path} --kind traffic` lists every check",
        )
    fail(frame["model_version"].isna(), "'model_version' is null", "log the serving model's version in every row")
    fail(
        frame["timestamp"].isna() | bad_timestamps(frame["timestamp"]).notna(),
        "'timestamp' is null or not an ISO 8601 time (or positive epoch seconds)",
        "write times like 2024-05-01T12:30:00Z",
    )
    return frame


def read_window(
    path: str, version: str, min_rows: int, frame: pd.DataFrame | None = None
) -> tuple[list[str], list[str], np.ndarray, int]:
    """(prompts, responses, feedback values, rows of other versions) of the monitored version's rows."""
    frame = load_window(path) if frame is None else frame
    mine = frame[frame["model_version"].astype(str) == str(version)]
    if len(mine) < min_rows:
        raise ValueError(
            f"{path}: {len(mine)} rows of model_version {version} (of {len(frame)}), fewer than min_rows={min_rows}: "
            "monitor a longer window, check model_version in the traffic, or lower MonitorConfig.min_rows"
        )
    feedback = pd.Series(dtype=float)
    if "feedback" in mine.columns:
        raw = mine["feedback"]
        feedback = pd.to_numeric(raw, errors="coerce")
        bad = (raw.notna() & feedback.isna()) | (feedback < 0) | (feedback > 1)
        if bad.any():
            raise ValueError(
                f"{path}: {int(bad.sum())} feedback values are not numbers in [0, 1] (first: {raw[bad].iloc[0]!r}): "
                "write 1 for positive, 0 for negative feedback, or null"
            )
    values = feedback.dropna().to_numpy(dtype=np.float64)
    return mine["prompt"].tolist(), mine["response"].tolist(), values, len(frame) - len(mine)


def window_features(
    models: MonitorModels, prompts: list[str], responses: list[str], feedback: np.ndarray, cfg: MonitorConfig, seed: int
) -> WindowFeatures:
    """Measure a window the way the baseline was measured."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    generation = models.baseline.profile["generation"]
    gold = cfg.use_gold_judge and models.baseline.profile["responses"]["gold"] is not None
    # 1. prompts: all rows for tokens/intents/lengths, a subset for embeddings and KL
    embedded = rng.sample(prompts, min(len(prompts), cfg.embedding_rows))
    task = SUPPORT_TASK if gold else SUPPORT_TASK.without_gold()
    features = prompt_features(models.tokenizer, prompts, task)
    # KL needs room to generate: prompts longer than the model's context minus the response are left out of it.
    room = max_sequence_length(models.policy, models.tokenizer) - int(generation["max_new_tokens"])
    fits = [p for p, n in zip(prompts, features.lengths) if n <= room]
    if len(fits) < 2:
        raise ValueError(f"fewer than 2 prompts of the window fit the model's context with a response ({room} tokens)")
    kl_prompts = rng.sample(fits, min(len(fits), cfg.kl_prompts))
    scored = sorted(rng.sample(range(len(prompts)), min(len(prompts), cfg.scored_rows)))
    _, kl = sample_kl(
        models.policy,
        models.reference,
        models.tokenizer,
        kl_prompts,
        int(generation["max_new_tokens"]),
        float(generation["temperature"]),
        cfg.batch_size,
    )
    return WindowFeatures(
        prompts=features,
        embeddings=embed_prompts(models.reference, models.tokenizer, embedded, cfg.batch_size),
        # 2. served responses: reward-model scores, lengths, NLL under the champion, rates, gold
        responses=response_features(
            models.policy,
            models.reward_model,
            models.tokenizer,
            [prompts[j] for j in scored],
            [responses[j] for j in scored],
            task,
            cfg.batch_size,
        ),
        kl=kl,
        feedback=feedback,
        scored=scored,
    )


def analyze_window(
    models: MonitorModels,
    prompts: list[str],
    responses: list[str],
    feedback: np.ndarray,
    cfg: MonitorConfig,
    seed: int,
) -> WindowAnalysis:
    """Features, drift metrics, signals and diagnosis of one window (no MLflow, no Prefect)."""
    features = window_features(models, prompts, responses, feedback, cfg, seed)
    metrics, signals = compute_signals(models.baseline, features, cfg.thresholds, cfg.permutations, seed)
    return WindowAnalysis(metrics, signals, diagnose(signals), features, prompts, responses)


def examples(analysis: WindowAnalysis, baseline: Baseline) -> dict[str, list[tuple[str, str, str]]]:
    """The rows that show each kind of drift best, for the report."""
    f, p, r = analysis.features, analysis.prompts, analysis.responses
    seen = set(baseline.profile["prompts"]["intent_counts"]) - {"other"}
    out: dict[str, list[tuple[str, str, str]]] = {}
    unusual = [j for j, intent in enumerate(f.prompts.intents) if intent not in seen]
    out["Prompts with an intent unknown or unseen at baseline"] = [
        (p[j], r[j], f.prompts.intents[j]) for j in unusual[:EXAMPLES]
    ]
    out["Longest prompts"] = [
        (p[j], r[j], f"{int(f.prompts.lengths[j])} tokens") for j in np.argsort(-f.prompts.lengths)[:EXAMPLES]
    ]
    row = f.scored  # response-side features are of these rows
    if f.responses.gold is not None:
        rm, gold = f.responses.rm_scores, f.responses.gold
        gap = (rm - rm.mean()) / max(rm.std(), 1e-8) - (gold - gold.mean()) / max(gold.std(), 1e-8)
        out["Reward model most above the gold judge"] = [
            (p[row[j]], r[row[j]], f"rm {rm[j]:.2f}, gold {gold[j]:.2f}") for j in np.argsort(-gap)[:EXAMPLES]
        ]
    nll = np.where(np.isfinite(f.responses.nll), f.responses.nll, -np.inf)
    out["Responses least like the champion (highest NLL)"] = [
        (p[row[j]], r[row[j]], f"{f.responses.nll[j]:.2f} nats/token") for j in np.argsort(-nll)[:EXAMPLES]
    ]
    return out


def redacted(rows_by_title: dict[str, list[tuple[str, str, str]]]) -> dict[str, list[tuple[str, str, str]]]:
    """Report examples with e-mail, phone and card numbers in prompts and responses redacted (traffic is user data)."""
    return {
        title: [(redact_text(p), redact_text(r), note) for p, r, note in rows] for title, rows in rows_by_title.items()
    }


def series_run(client: MlflowClient, experiment_id: str, lineage: Lineage) -> str:
    """The per-version monitoring run holding the drift/* time series (created on first use)."""
    key = f"{lineage.model_name}/{lineage.version}"
    found = client.search_runs([experiment_id], f"tags.`drift.series` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"monitor-{lineage.model_name}-v{lineage.version}",
        tags={
            "drift.series": key,
            "registered_model": lineage.model_name,
            "model_version": lineage.version,
            "lineage.pipeline_run_id": lineage.pipeline_run_id,
        },
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def already_monitored(client: MlflowClient, experiment_id: str, series_id: str, window: TrafficWindow) -> bool:
    """Whether a finished window run of this series exists for this file and index (one a kill -9 cut short,
    left RUNNING or ended KILLED, does not count: the window is measured again)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{series_id}' and tags.`drift.window_index` = '{window.index}' "
        "and attributes.status = 'FINISHED'",
    )
    return any(r.data.tags.get("drift.window_file") == window.path for r in runs)


def run_monitor(cfg: MonitorConfig, models: MonitorModels | None = None) -> MonitorResult:
    """Monitor one window: measure, test, diagnose, log to MLflow, flag the run and the model version on a breach."""
    window = find_window(cfg)
    rows = load_window(window.path)  # a malformed window fails before three models are downloaded
    experiment_id = setup_experiment(cfg.experiment)
    end_dead_runs(experiment_id)  # window runs a kill -9 left RUNNING end KILLED
    client = MlflowClient()
    models = models or load_models(cfg, client)
    lineage = models.lineage
    series_id = series_run(client, experiment_id, lineage)
    if not cfg.force and already_monitored(client, experiment_id, series_id, window):
        return MonitorResult(
            lineage.model_name, lineage.version, window.path, window.index, skipped=True, series_run_id=series_id
        )
    # 1. measure and test
    prompts, responses, feedback, other = read_window(window.path, lineage.version, cfg.min_rows, rows)
    analysis = analyze_window(models, prompts, responses, feedback, cfg, cfg.seed + window.index)
    metrics = {**analysis.metrics, "drift/rows_other_versions": float(other)}
    feedback_batch = collect_production_feedback(rows, window, cfg.feedback_dir)
    metrics["feedback/production_pairs"] = float(read_manifest(feedback_batch).pairs) if feedback_batch else 0.0
    diagnosis = analysis.diagnosis
    alert = diagnosis.cause is not None
    # 2. the time series on the version's series run
    for key, value in metrics.items():
        client.log_metric(series_id, key, value, step=window.index)
    # 3. the window run: metrics, tags, report
    tags = {
        "registered_model": lineage.model_name,
        "model_version": lineage.version,
        "drift.window_index": str(window.index),
        "drift.window_file": window.path,
        "drift.alert": str(alert).lower(),
        "drift.cause": diagnosis.cause or "none",
        "drift.breached": ",".join(diagnosis.breached) or "none",
    }
    with (
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"window-{window.index:04d}",
            parent_run_id=series_id,
            nested=True,
            tags={**tags, **owner_tags()},
        ) as run,
        heartbeat(run.info.run_id),
    ):
        mlflow.log_metrics(metrics, step=window.index)
        markdown = write_report(analysis, models, window, run.info.run_id, metrics)
    # 4. flag the model version
    if alert:
        for key, value in {
            "drift.alert": diagnosis.cause,
            "drift.alert_window": str(window.index),
            "drift.alert_run_id": run.info.run_id,
        }.items():
            client.set_model_version_tag(lineage.model_name, lineage.version, key, value)
    return MonitorResult(
        lineage.model_name,
        lineage.version,
        window.path,
        window.index,
        skipped=False,
        alert=alert,
        cause=diagnosis.cause,
        breached=diagnosis.breached,
        metrics=metrics,
        run_id=run.info.run_id,
        series_run_id=series_id,
        report_markdown=markdown,
        feedback_batch=str(feedback_batch) if feedback_batch else None,
        signals=tuple(analysis.signals),
    )


def collect_production_feedback(rows: pd.DataFrame, window: TrafficWindow, feedback_dir: str | None) -> Path | None:
    """The window's thumbs up/down on equivalent prompts as a validated feedback batch under ``feedback_dir``
    (``production-<window file>-<path hash>``: monitoring the window again rewrites the same batch); None when
    collection is off or the window yields no pair. Texts are PII-redacted before they are written."""
    if not feedback_dir or "feedback" not in rows.columns:
        return None
    rated = [
        Rated(
            redact_text(str(r.prompt)),
            redact_text(str(r.response)),
            float(r.feedback),
            str(r.timestamp),
            str(r.model_version),
        )
        for r in rows.itertuples()
        if pd.notna(r.feedback)
    ]
    name = f"production-{Path(window.path).stem}-{hashlib.sha256(window.path.encode()).hexdigest()[:8]}"
    pairs = production_pairs(rated, name)
    if not pairs:
        return None
    folder = Path(feedback_dir) / name
    versions = sorted({r.model_version for r in rated})
    manifest = BatchManifest(
        name, "production", ",".join(versions), pd.Timestamp.now(tz="UTC").isoformat(), origin=window.path
    )
    manifest.raters = ["production"]
    save_pairs(folder, manifest, pairs)
    validate_batch(folder, manifest, ValidationConfig())
    return folder


def write_report(
    analysis: WindowAnalysis, models: MonitorModels, window: TrafficWindow, run_id: str, metrics: dict[str, float]
) -> str:
    """Render the report and its plots, log them under report/ of the active run; returns the markdown."""
    lineage = models.lineage
    with tempfile.TemporaryDirectory(prefix="rlhf-drift-report-") as tmp:
        plots = plot_window(models.baseline, analysis.features, tmp)
        ctx = ReportContext(
            lineage.model_name,
            lineage.version,
            window.index,
            window.path,
            run_id,
            inspect=inspect_targets(analysis.diagnosis.cause, lineage) if analysis.diagnosis.cause else [],
            examples=redacted(examples(analysis, models.baseline)) if analysis.diagnosis.cause else {},
            plots=[p.name for p in plots],
        )
        markdown = render_report(analysis.diagnosis, analysis.signals, metrics, ctx)
        markdown += (
            f"\n\n## User feedback\n\n{int(metrics.get('feedback/production_pairs', 0))} preference pairs collected "
            "from thumbs up vs thumbs down on equivalent prompts (feedback/production_pairs); the feedback flow "
            "learns from them (docs/feedback.md).\n"
        )
        (Path(tmp) / "diagnosis.md").write_text(markdown)
        mlflow.log_artifacts(tmp, REPORT_ARTIFACT)
    return markdown


def simulate_traffic(
    cfg: MonitorConfig, kind: str, magnitude: float, rows: int, windows: int, out_dir: str | Path, seed: int = 0
) -> list[Path]:
    """Simulated windows of the built-in task answered by the monitored version (the champion by default).

    The version's lineage gives the policy and reward model (rlhf/drift/lineage.py); responses are sampled as
    its baseline was (same max_new_tokens and temperature), so a clean window matches the baseline. The
    windows are numbered after those already in out_dir, so the monitor's "latest window" is the newest.
    """
    models = load_models(cfg)
    generation = models.baseline.profile["generation"]
    pools = simulator.build_pools(
        models.policy,
        models.reward_model,
        models.tokenizer,
        clean_size=min(1500, max(300, rows)),
        drift_size=min(400, max(120, rows // 2)),
        seed=seed,
        max_new_tokens=int(generation["max_new_tokens"]),
        temperature=float(generation["temperature"]),
        batch_size=cfg.batch_size,
        kinds=tuple(dict.fromkeys(("clean", kind))),
    )
    taken = [re.fullmatch(r"window_(\d+)\.jsonl", f.name) for f in Path(out_dir).glob("window_*.jsonl")]
    first = max((int(m.group(1)) for m in taken if m), default=-1) + 1
    return simulator.write_windows(
        out_dir, [kind] * windows, pools, magnitude, rows, seed, models.lineage.version, first_index=first
    )


@task(name="monitor-window", cache_policy=NO_CACHE)
def monitor_task(cfg: MonitorConfig) -> MonitorResult:
    """Drift monitoring of the latest traffic window."""
    return run_monitor(cfg)


ALERT_EVENT = "rlhf.drift.alert"
"""The Prefect event of a drift alert; prefect.yaml's retrain-on-drift trigger expects it."""


def alert_event(result: MonitorResult) -> dict[str, Any]:
    """The Prefect event of an alert, as ``emit_event``'s keyword arguments.

    Its resource is the model version (``mlflow.model-version.<name>.<version>``), so a trigger can keep
    one cooldown per version; its payload names the version as ``model_uri``, which the retraining's
    ``retrain_of`` parameter takes, and the evidence (cause, breached signals, window, MLflow run).
    """
    return {
        "event": ALERT_EVENT,
        "resource": {
            "prefect.resource.id": f"mlflow.model-version.{result.model_name}.{result.version}",
            "prefect.resource.name": f"{result.model_name} v{result.version}",
        },
        "payload": {
            "model_uri": f"models:/{result.model_name}/{result.version}",
            "cause": result.cause,
            "breached": list(result.breached),
            "window_index": result.window_index,
            "window_file": result.window_path,
            "mlflow_run_id": result.run_id,
        },
    }


def raise_alert(result: MonitorResult) -> dict[str, str]:
    """Prefect side of an alert: the event (``alert_event``) and a markdown artifact; returns their ids, which
    the window run is tagged with (``drift.event_id``, ``drift.artifact_id``)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    out: dict[str, str] = {}
    event = emit_event(**alert_event(result))
    if event is not None:
        out["event_id"] = str(event.id)
    if in_prefect_run():
        out["artifact_id"] = str(
            create_markdown_artifact(
                result.report_markdown, key="drift-report", description=f"Drift alert: {result.cause}"
            )
        )
    if result.run_id:
        client = MlflowClient()
        for key, value in out.items():
            client.set_tag(result.run_id, f"drift.{key}", value)
    return out


@task(name="drift-alert", cache_policy=NO_CACHE)
def alert_task(result: MonitorResult) -> dict[str, str]:
    """Emit the drift alert."""
    return raise_alert(result)
