"""`rlhf`: the command-line entry point, the top layer (run the pipeline, compare algorithms, validate data,
monitor drift, simulate traffic, promote and roll back, rank samples (label), one process of a launched training stage).

Errors the user can fix are printed as one line naming the fix, with exit status 2;
anything else is a bug and keeps its traceback. Commands import what they run inside
their function, so `rlhf --help` answers without loading torch, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from rlhf.config import ConfigError
from rlhf.infra.env import quiet_defaults, set_offline_defaults, start_prefect_server_early

DRIFT_KIND_CHOICES = (
    "clean",
    "new_intent",
    "paraphrase",
    "adversarial",
    "long_prompts",
    "degraded_policy",
    "reward_hacking",
)
"""rlhf.builtin.traffic.DRIFT_KINDS, spelled out so `rlhf --help` answers without importing torch (a test keeps them equal)."""

ALGORITHM_CHOICES = ("ppo", "dpo", "rloo", "grpo")
"""rlhf.config.ALGORITHMS, spelled out so `rlhf --help` answers without importing pydantic models (a test keeps them equal)."""

UI_HINT = """\
Open the results:
  MLflow UI:  make mlflow-ui   then http://127.0.0.1:5000  (runs, metrics, checkpoints, registry)
  Prefect UI: make prefect-ui  then http://127.0.0.1:4200  (flow runs, task states, artifacts)"""


def add_config_options(parser: argparse.ArgumentParser, example: str) -> None:
    """--config FILE and repeatable --set KEY=VALUE, as every command that reads the config tree takes them."""
    parser.add_argument("--config", help="YAML config file (see configs/); defaults run the CPU demo")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one option, e.g. --set {example} (repeatable; see rlhf/config.py)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Orchestrated RLHF pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the training pipeline (validate, SFT, reward model, PPO, evaluate, register)")
    add_config_options(run, "ppo.steps=10")
    run.add_argument("--data", help="data folder (shortcut for --set data.source=DIR)")
    run.add_argument("--base-model", help="Hugging Face name or local path of the base model")

    validate = sub.add_parser("validate", help="validate a data file without training")
    validate.add_argument("path", help="JSON, JSONL, CSV or Parquet file")
    validate.add_argument("--kind", required=True, choices=["sft", "preference", "prompt", "traffic"])
    validate.add_argument("--config", help="YAML config file whose validation thresholds to use")
    validate.add_argument("--tokenizer", help="tokenizer name or path for the token-length bounds (skipped without)")
    validate.add_argument("--report-dir", help="also write the GX result (JSON) and Data Docs (HTML) here")

    monitor = sub.add_parser(
        "monitor",
        help="test traffic windows against the champion's baseline; print the signals, the alert and the likely cause",
        description="Drift monitoring (docs/monitoring.md): measures a traffic window against the monitored version's "
        "baseline, logs drift/* to the MLflow experiment rlhf-monitoring, prints each signal, the alert and its "
        "likely cause. Exit 0, or 1 on an alert with --fail-on-alert.",
    )
    monitor.add_argument(
        "--traffic", help="JSONL window file, glob of them or folder (default: monitor.traffic, traffic/window_*.jsonl)"
    )
    monitor.add_argument("--model", help="registered policy model (default: monitor.registered_model, rlhf-policy)")
    monitor.add_argument("--alias", help="registry alias of the monitored version (default: monitor.alias, champion)")
    which = monitor.add_mutually_exclusive_group()
    which.add_argument("--window", type=int, metavar="N", help="monitor window N of the sorted glob (default: latest)")
    which.add_argument("--all", action="store_true", help="monitor every window of the glob, in order")
    monitor.add_argument("--force", action="store_true", help="measure windows that were monitored already again")
    monitor.add_argument("--fail-on-alert", action="store_true", help="exit 1 when a window alerts")
    monitor.add_argument(
        "--report", action="store_true", help="also print each window's full diagnosis report (markdown)"
    )
    add_config_options(monitor, "monitor.min_rows=50")

    traffic = sub.add_parser(
        "traffic",
        help="simulate production-traffic windows of the built-in task, answered by the champion",
        description="Writes window_NNNN.jsonl files (the traffic contract) for the built-in support task, numbered "
        "after those already in --out. The monitored version (the champion by default) answers the prompts; its "
        "reward model picks the reward_hacking responses. --kind clean writes undrifted windows.",
    )
    traffic.add_argument("--kind", required=True, choices=DRIFT_KIND_CHOICES, help="the drift to inject")
    traffic.add_argument(
        "--magnitude", type=float, default=0.3, help="share of each window's rows that drift, in [0, 1] (default 0.3)"
    )
    traffic.add_argument("--rows", type=int, default=500, help="rows per window (default 500)")
    traffic.add_argument("--windows", type=int, default=1, help="how many windows to write (default 1)")
    traffic.add_argument("--out", default="traffic", help="folder of the window files (default: traffic)")
    traffic.add_argument("--model", help="registered policy model (default: monitor.registered_model, rlhf-policy)")
    traffic.add_argument("--alias", help="registry alias of the version that answers (default: champion)")
    traffic.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling and feedback (default 0)")
    add_config_options(traffic, "monitor.version=3")

    promote = sub.add_parser(
        "promote",
        help="gate a registered policy version and make it champion if every gate passes",
        description="Runs the promote flow (docs/evaluation.md): checks each gate on the version's tags, prints "
        "each verdict; on a pass moves the alias champion to it and previous-champion to the old champion. "
        "Exit 0 when the version is champion, 1 when a gate (or the reviewer) refused it.",
    )
    promote.add_argument("version", nargs="?", default="latest", help="version number, or latest (default)")
    promote.add_argument("--model", default=None, help="registered model (default: registered_model, rlhf-policy)")
    promote.add_argument(
        "--require-approval",
        action="store_true",
        help="pause for a reviewer's approval in the Prefect UI before moving champion (needs a Prefect server)",
    )
    add_config_options(promote, "promotion.max_kl=8")

    rollback = sub.add_parser(
        "rollback",
        help="move the champion alias back to the previous champion",
        description="Runs the rollback flow (docs/evaluation.md): champion moves to previous-champion, which "
        "steps one further back.",
    )
    rollback.add_argument("--model", default=None, help="registered model (default: registered_model, rlhf-policy)")
    add_config_options(rollback, "promotion.lock_timeout_s=30")
    compare = sub.add_parser(
        "compare",
        help="train several algorithms from one SFT policy and reward model; compare them on one frontier",
        description="Runs the compare flow (docs/alternatives.md): validation, SFT and the reward model once; each "
        "algorithm and seed trained and evaluated in its own child run; then a comparison run with the frontier plot "
        "(judge score against sqrt(KL) of every checkpoint), the table and the winner within the KL budget, which is "
        "registered (not promoted: `rlhf promote VERSION` does that).",
    )
    compare.add_argument(
        "--algorithms",
        default=",".join(ALGORITHM_CHOICES),
        help=f"comma-separated, from {', '.join(ALGORITHM_CHOICES)} (default: all)",
    )
    compare.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1 (default 0)")
    add_config_options(compare, "grpo.steps=30")
    label = sub.add_parser(
        "label",
        help="the ranking page: raters order k responses of a registered version; rankings become preference pairs",
        description="Samples --k responses per prompt from the version (the champion by default), serves a page "
        "where raters put them in order (ties and 'all bad' allowed), and saves every ranking as preference pairs "
        "with provenance in a new feedback batch under feedback.dir that passes the validation gate "
        "(docs/feedback.md). Binds 127.0.0.1 unless --host says otherwise; every request needs the rater token.",
    )
    label.add_argument("--model", help="registered policy model (default: registered_model, rlhf-policy)")
    label.add_argument("--alias", default="champion", help="registry alias of the version to sample (default champion)")
    label.add_argument("--version", help="sample this version number instead of the alias's")
    label.add_argument(
        "--vs",
        help="compare with the version of this alias (e.g. challenger): half of each prompt's responses, shuffled",
    )
    label.add_argument("--prompts", help="prompt file (a `prompt` column); default: the pipeline's training prompts")
    label.add_argument("--k", type=int, help="responses per prompt (default feedback.k, 4)")
    label.add_argument("--n-prompts", type=int, help="prompts in the session (default feedback.prompts, 20)")
    label.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    label.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    label.add_argument(
        "--token", help="the rater token (16+ characters; default: RLHF_LABEL_TOKEN, else a random one, printed)"
    )
    add_config_options(label, "feedback.dir=feedback")
    feedback = sub.add_parser(
        "feedback",
        help="learn from new feedback batches: retrain the reward model, continue from the champion, gate",
        description="Runs the feedback flow (docs/feedback.md): merges the validated feedback batches under "
        "feedback.dir that the champion has not learned from into the preference data, validates it, retrains the "
        "reward model, continues the champion's training with `algorithm`, evaluates against the champion, "
        "registers the version (tag lineage.feedback_batches) and gates it. Exit 0 also when there was nothing new.",
    )
    add_config_options(feedback, "feedback.dir=feedback")
    stage = sub.add_parser(
        "train-stage", help="one process of a training stage started by torchrun/accelerate launch (tasks/launch.py)"
    )
    stage.add_argument("stage", choices=["sft", "reward", "ppo"])
    stage.add_argument("spec", help="JSON file written by tasks.launch.launch_stage")
    stage.add_argument("result", help="where rank 0 writes the stage's result (JSON)")
    return parser


def run_stage(stage: str, spec: dict[str, Any]) -> Any:
    """Run a training stage from its launch spec in this process of the group; rank 0 logs
    (into ``spec['run_id']`` when set; PPO opens its own run). The stages' functions are
    imported here, at the top layer, so tasks/launch.py never imports what it launches."""
    from contextlib import nullcontext

    import mlflow

    from rlhf.config import PipelineConfig
    from rlhf.infra import distributed
    from tasks.ppo import train_ppo_worker
    from tasks.reward import train_reward
    from tasks.sft import train_sft

    stage_function = {"sft": train_sft, "reward": train_reward, "ppo": train_ppo_worker}[stage]
    cfg = PipelineConfig.model_validate(spec["config"])
    mlflow.set_tracking_uri(spec["tracking_uri"])
    logs_here = distributed.is_main_process() and spec["run_id"]
    with mlflow.start_run(run_id=spec["run_id"], log_system_metrics=True) if logs_here else nullcontext():
        return stage_function(cfg, **spec["args"])


def cmd_train_stage(args: argparse.Namespace) -> int:
    """One process of a launched training stage: join the group, run the stage, rank 0 writes the result."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    from rlhf.infra import distributed

    if not distributed.launched_by_torchrun():
        raise ConfigError(
            "rlhf train-stage runs inside a launcher with WORLD_SIZE > 1: set distributed.num_processes and "
            "let `rlhf run` start it, or start it with torchrun / accelerate launch"
        )
    spec = json.loads(Path(args.spec).read_text())
    distributed.init_process_group()
    try:
        out = run_stage(args.stage, spec)
        if distributed.is_main_process():
            Path(args.result).write_text(json.dumps(out))
        distributed.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.config import load_config

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.base_model:
        overrides.append(f"model.base_model={args.base_model}")
    cfg = load_config(args.config, overrides)
    if not cfg.data.is_builtin:  # fail on a bad data path before the flow starts
        resolve_data_paths(cfg.data, cfg.output_dir, cfg.seed)
    from rlhf.infra.tracking import check_tracking_store

    check_tracking_store()  # and on an unreachable tracking store, before Prefect starts

    from flows.pipeline import rlhf_pipeline
    from tasks.evaluate import format_table

    result = rlhf_pipeline(cfg)
    print("\nEvaluation on held-out prompts (PPO policy vs the SFT policy it started from):")
    print(format_table(result.metrics, cfg.ppo.kl_target))
    print(f"\nRegistered {result.model_uri} (MLflow parent run {result.parent_run_id})")
    print(promotion_summary(result.promotion))
    print(UI_HINT)
    return 0


def parse_compare(algorithms: str, seeds: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """--algorithms and --seeds as tuples; unknown, repeated or malformed entries raise ConfigError naming the fix."""
    names = tuple(a.strip() for a in algorithms.split(",") if a.strip())
    unknown = [a for a in names if a not in ALGORITHM_CHOICES]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"--algorithms {algorithms!r}: give distinct names from {', '.join(ALGORITHM_CHOICES)}, comma-separated "
            "(e.g. --algorithms ppo,dpo,rloo,grpo)"
        )
    try:
        numbers = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        numbers = ()
    if not numbers or len(set(numbers)) != len(numbers) or min(numbers) < 0:
        raise ConfigError(f"--seeds {seeds!r}: give distinct non-negative integers, comma-separated (e.g. --seeds 0,1)")
    return names, numbers


def cmd_compare(args: argparse.Namespace) -> int:
    from rlhf.config import load_config

    algorithms, seeds = parse_compare(args.algorithms, args.seeds)
    cfg = load_config(args.config, args.overrides)
    for algorithm in algorithms:  # every candidate's config is valid before anything trains
        for seed in seeds:
            load_config(args.config, [*args.overrides, f"algorithm={algorithm}", f"seed={seed}"])
    from rlhf.infra.tracking import check_tracking_store

    check_tracking_store()

    from flows.compare import rlhf_compare

    result = rlhf_compare(algorithms, seeds, cfg)
    print(
        f"\nComparison of {', '.join(algorithms)} over seeds {', '.join(map(str, seeds))} (MLflow parent run "
        f"{result.parent_run_id}, comparison run {result.comparison.run_id}: compare/frontier.png, compare/table.json):"
    )
    print(result.comparison.markdown)
    if result.model_uri:
        version = result.model_uri.rsplit("/", 1)[1]
        print(f"\nRegistered the winner as {result.model_uri}; promote it with: rlhf promote {version}")
    print(UI_HINT)
    return 0


def promotion_summary(outcome: Any) -> str:
    """Each promotion gate's verdict, the outcome, and how to serve the champion (or what refused it)."""
    lines = [f"\nPromotion of {outcome.model_name} v{outcome.version}:"]
    lines += [f"  {'pass' if g.passed else 'FAIL'}  {g.name:<22} {g.detail}" for g in outcome.gates]
    if outcome.promoted or outcome.status == "champion":
        lines += [
            f"v{outcome.version} is champion (previous: {outcome.previous_champion or 'none'}). Serve it:",
            f"  mlflow models serve -m models:/{outcome.model_name}@champion --env-manager local -h 127.0.0.1 -p 5001",
        ]
    else:
        lines += [
            f"v{outcome.version} was not promoted: {'; '.join(outcome.reasons)}",
            f"The champion is {('v' + outcome.champion) if outcome.champion else 'not set yet'}; docs/evaluation.md explains each gate.",
        ]
    return "\n".join(lines)


def quoted(value: str) -> str:
    """A --set value that YAML reads back as exactly this string (a glob may start with '*', a name look like a number)."""
    import json

    return json.dumps(value)


def monitored_overrides(args: argparse.Namespace) -> list[str]:
    """--set overrides plus the monitor section's shortcuts (--traffic, --model, --alias) a command was given."""
    from pathlib import Path

    overrides = list(args.overrides)
    traffic = getattr(args, "traffic", None)
    if traffic:
        glob = str(Path(traffic) / "*.jsonl") if Path(traffic).is_dir() else traffic
        overrides.append(f"monitor.traffic={quoted(glob)}")
    if args.model:
        overrides.append(f"monitor.registered_model={quoted(args.model)}")
    if args.alias:
        overrides.append(f"monitor.alias={quoted(args.alias)}")
    return overrides


def check_monitored_version(cfg: Any) -> Any:
    """Fail before Prefect starts when the monitored version (cfg: MonitorConfig) or its baseline is missing;
    returns its lineage."""
    import mlflow

    from rlhf.drift.lineage import LineageError, resolve_lineage
    from rlhf.infra.tracking import check_tracking_store, tracking_uri

    check_tracking_store()
    mlflow.set_tracking_uri(tracking_uri())
    lineage = resolve_lineage(mlflow.MlflowClient(), cfg.registered_model, cfg.version, cfg.alias)
    if lineage.baseline_uri is None:
        raise LineageError(
            f"{lineage.model_name} v{lineage.version} has no drift baseline (tag baseline.uri): register it with "
            "`rlhf run`, which computes one, or monitor another version with --alias / --set monitor.version=N"
        )
    return lineage


def cmd_monitor(args: argparse.Namespace) -> int:
    import glob

    from rlhf.config import load_config

    overrides = monitored_overrides(args)
    if args.force:
        overrides.append("monitor.force=true")
    if args.window is not None:
        overrides.append(f"monitor.window_index={args.window}")
    cfg = load_config(args.config, overrides)
    files = sorted(glob.glob(cfg.monitor.traffic))
    if not files:
        raise ConfigError(
            f"no traffic window matches {cfg.monitor.traffic!r}: simulate some with `rlhf traffic --kind new_intent` "
            "(after `make demo`), or pass --traffic PATH_OR_GLOB of your JSONL windows"
        )
    if cfg.monitor.window_index is not None and cfg.monitor.window_index >= len(files):
        raise ConfigError(
            f"window {cfg.monitor.window_index} is past the {len(files)} windows matching {cfg.monitor.traffic!r}: "
            f"pass --window 0..{len(files) - 1}, or leave it out for the latest"
        )
    lineage = check_monitored_version(cfg.monitor)
    windows = (
        [load_config(args.config, [*overrides, f"monitor.window_index={i}"]).monitor for i in range(len(files))]
        if args.all
        else [cfg.monitor]
    )
    from tasks.monitor import find_window, read_window

    for window in windows:  # a window the monitor cannot use fails here, in one line, before Prefect starts
        try:
            read_window(find_window(window).path, lineage.version, window.min_rows)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    from flows.monitor import drift_monitor

    results = [drift_monitor(window) for window in windows]
    for result in results:
        print(monitor_summary(result, cfg.monitor.experiment))
        if args.report and result.report_markdown:
            print(f"\n{result.report_markdown}")
    alerted = [r for r in results if r.alert]
    return 1 if alerted and args.fail_on_alert else 0


def monitor_summary(result: Any, experiment: str) -> str:
    """One window's verdict (tasks.monitor.MonitorResult): each signal, the alert and its likely cause, where it is logged."""
    from rlhf.drift.diagnosis import CAUSE_TITLES

    head = f"\n{result.model_name} v{result.version}, window {result.window_index} ({result.window_path})"
    if result.skipped:
        return f"{head}: monitored already (its run is in the series {result.series_run_id}); pass --force to measure it again"
    verdict = f"ALERT, likely cause: {CAUSE_TITLES[result.cause]}" if result.alert else "no drift"
    lines = [
        f"{head}: {verdict}",
        f"  {'signal':<22} {'category':<9} {'value':>9} {'threshold':>9} {'p-value':>8} {'Holm p':>8}  breached",
    ]
    for s in result.signals:
        p = "" if s.pvalue is None else f"{s.pvalue:.2g}"
        adj = "" if s.adjusted_pvalue is None else f"{s.adjusted_pvalue:.2g}"
        lines.append(
            f"  {s.name:<22} {s.category:<9} {s.value:>9.4f} {s.threshold:>9g} {p:>8} {adj:>8}  "
            f"{'YES' if s.breached else 'no'}"
        )
    if result.alert:
        lines += ["Evidence:"] + [f"  - {s.summary}" for s in result.signals if s.breached]
    pairs = int(result.metrics.get("feedback/production_pairs", 0))
    lines.append(
        f"User feedback: {pairs} preference pairs (thumbs up vs down on equivalent prompts)"
        + (f" in {result.feedback_batch}" if result.feedback_batch else "")
    )
    n = sum(1 for k in result.metrics if k.startswith("drift/"))
    lines.append(
        f"{n} drift/* metrics logged to MLflow run {result.run_id} (experiment {experiment}); "
        f"report: runs:/{result.run_id}/report/diagnosis.md"
    )
    return "\n".join(lines)


def cmd_traffic(args: argparse.Namespace) -> int:
    from rlhf.config import load_config

    if not 0.0 <= args.magnitude <= 1.0:
        raise ConfigError(f"--magnitude {args.magnitude} is the share of rows that drift: pass a value in [0, 1]")
    if args.windows < 1:
        raise ConfigError(f"--windows {args.windows}: pass 1 or more")
    cfg = load_config(args.config, monitored_overrides(args))
    if args.rows < cfg.monitor.min_rows:
        raise ConfigError(
            f"--rows {args.rows} is below monitor.min_rows={cfg.monitor.min_rows}, the fewest rows the monitor accepts: "
            f"pass --rows {cfg.monitor.min_rows} or more (or --set monitor.min_rows=N)"
        )
    check_monitored_version(cfg.monitor)
    from tasks.monitor import simulate_traffic

    paths = simulate_traffic(cfg.monitor, args.kind, args.magnitude, args.rows, args.windows, args.out, args.seed)
    print("\n".join(str(p) for p in paths))
    print(f"Monitor the latest window: rlhf monitor --traffic '{args.out}/window_*.jsonl' (--all for every window)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from rlhf.config import load_config

    if args.version != "latest" and not args.version.isdigit():
        raise ConfigError(f"version {args.version!r} is not a version number: pass one (e.g. 3), or latest")
    overrides = [*args.overrides, *(["promotion.require_approval=true"] if args.require_approval else [])]
    cfg = load_config(args.config, overrides)
    name = args.model or cfg.registered_model
    client = registry_client()
    from mlflow.exceptions import MlflowException

    from rlhf.registry.promotion import PromotionError, resolve_version

    version = resolve_version(client, name, args.version)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise PromotionError(
            f"{name} has no version {version}: pass a registered version, or latest (the newest)"
        ) from None
    if cfg.promotion.require_approval:
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigError(
                "--require-approval waits for a reviewer in the Prefect UI, and no Prefect server is set: start one "
                "(make serve) and set PREFECT_API_URL, or leave --require-approval out"
            )
    from flows.promote import promote

    outcome = promote(name, version, cfg.promotion)
    print(promotion_summary(outcome))
    return 0 if outcome.promoted or outcome.status == "champion" else 1


def registry_client() -> Any:
    """An MlflowClient on the tracking store, after checking it is reachable."""
    import mlflow

    from rlhf.infra.tracking import check_tracking_store, tracking_uri

    check_tracking_store()
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def cmd_rollback(args: argparse.Namespace) -> int:
    from rlhf.config import load_config
    from rlhf.registry.promotion import CHAMPION, PREVIOUS_CHAMPION, PromotionError, registry_aliases

    cfg = load_config(args.config, args.overrides)
    name = args.model or cfg.registered_model
    aliases = registry_aliases(registry_client(), name)
    if CHAMPION not in aliases or PREVIOUS_CHAMPION not in aliases:
        raise PromotionError(
            f"{name} has no {'champion' if CHAMPION not in aliases else 'previous champion'} to roll back to: "
            "promote the version you want with `rlhf promote VERSION`"
        )
    from flows.promote import rollback

    outcome = rollback(name, cfg.promotion)
    print(
        f"{name}: champion rolled back from v{outcome.rolled_back} to v{outcome.champion} "
        f"(previous-champion: {('v' + outcome.previous_champion) if outcome.previous_champion else 'none'})"
    )
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from rlhf.config import load_config

    cfg = load_config(args.config, args.overrides)
    registry_client()
    from flows.feedback import rlhf_feedback
    from tasks.evaluate import format_table

    state = rlhf_feedback(cfg, return_state=True)
    if state.name == "Skipped":  # nothing new to learn from
        print(f"Nothing to learn: {state.message}")
        return 0
    result = state.result()
    print("\nEvaluation on held-out prompts (new policy vs the champion it continued from):")
    print(format_table(result.metrics, cfg.ppo.kl_target))
    print(f"\nRegistered {result.model_uri} (MLflow parent run {result.parent_run_id})")
    print(promotion_summary(result.promotion))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    import os

    from rlhf.config import load_config

    overrides = list(args.overrides)
    if args.k is not None:
        overrides.append(f"feedback.k={args.k}")
    if args.n_prompts is not None:
        overrides.append(f"feedback.prompts={args.n_prompts}")
    cfg = load_config(args.config, overrides)
    token = args.token or os.environ.get("RLHF_LABEL_TOKEN")
    if token is not None and len(token) < 16:
        raise ConfigError(
            "the rater token must be at least 16 characters: give a longer --token, or none for a random one"
        )
    registry_client()
    from tasks.label import new_token, prepare_session, serve

    token = token or new_token()
    alias = None if args.version else args.alias
    session = prepare_session(cfg, args.model, alias, args.version, args.prompts, args.vs)
    shown = "localhost" if args.host in ("127.0.0.1", "::1", "localhost") else args.host
    print(
        f"{len(session.items)} prompts x {cfg.feedback.k} responses of {session.model_version}; batch {session.folder}"
    )
    if shown != "localhost":
        print(
            f"warning: bound to {args.host}: anyone who can reach it and has the token can rate; keep the token secret"
        )
    print(f"Raters open: http://{shown}:{args.port}/?token={token}")
    serve(session, args.host, args.port, token)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rlhf.config import load_config
    from tasks.validate import validate_command

    cfg = load_config(args.config)
    return validate_command(
        args.path,
        args.kind,
        cfg.validation,
        tokenizer_path=args.tokenizer,
        report_dir=args.report_dir,
        trust_remote_code=cfg.model.trust_remote_code,
    )


STARTS_FLOWS = frozenset({"run", "compare", "feedback", "monitor"})
"""Commands that run a Prefect flow and take minutes: Prefect's temporary server is started before their imports."""
VALIDATES_DATA = frozenset({"run", "compare", "feedback"})
"""Commands whose flow starts with the validate stage (Great Expectations)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in STARTS_FLOWS:
        set_offline_defaults()  # the server process inherits them
        # it boots while the flows are imported; a flow that validates data imports GX while it waits
        start_prefect_server_early(prewarm=("great_expectations",) if args.command in VALIDATES_DATA else ())
    quiet_defaults()
    from rlhf.data.loading import DataError
    from rlhf.drift.lineage import LineageError
    from rlhf.infra.integrity import CheckpointCorrupted
    from rlhf.infra.tracking import TrackingUnavailable
    from rlhf.registry.promotion import PromotionError
    from tasks.validate import ValidationFailed

    commands = {
        "run": cmd_run,
        "compare": cmd_compare,
        "validate": cmd_validate,
        "monitor": cmd_monitor,
        "traffic": cmd_traffic,
        "promote": cmd_promote,
        "rollback": cmd_rollback,
        "label": cmd_label,
        "feedback": cmd_feedback,
        "train-stage": cmd_train_stage,
    }
    user_errors = (
        ConfigError,
        DataError,
        ValidationFailed,
        TrackingUnavailable,
        CheckpointCorrupted,
        LineageError,
        PromotionError,
    )
    try:
        return commands[args.command](args)
    except user_errors as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``rlhf`` command: ``main()``, then exit without the interpreter's last full garbage collection.

    After a command that imported the pipeline (torch, transformers, MLflow, Prefect, GX: ~7,700 modules, ~1.1M
    objects the collector tracks) that collection took ~3 s on 2 cores (9 s under load), after every result was
    written and every run closed. ``gc.freeze()`` puts the heap out of its reach: atexit handlers still run and
    objects still go by reference count; only cycles left at exit are not collected, by a process that is ending.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
