"""Benchmark: monitor one 10,000-row traffic window end to end (target: <= 60 s on a CPU machine).

    MLFLOW_DISABLE_TELEMETRY=true PYTHONPATH=. python bench/bench_monitor.py \
        [--work outputs/bench/drift] [--rows 10000] [--kind new_intent]

Uses the champion and response pools of bench/drift_detection.py in the same
--work folder (built there first if missing). Writes one window of --rows rows
(--kind at the simulator's default magnitude; a drifted kind exercises the alert
and report path), then times ``tasks.monitor.run_monitor`` on it: resolving the
version, loading baseline and models, reading the JSONL, measuring, testing,
diagnosing, logging metrics and the report to MLflow. Prints one line per figure;
the figures go in docs/benchmarks.md under "## Monitoring".
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from drift_detection import MODEL_NAME, build_champion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/bench/drift", help="folder of bench/drift_detection.py's champion")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the window")
    parser.add_argument("--kind", default="new_intent", help="drift kind of the window")
    parser.add_argument("--ppo-steps", type=int, default=10, help="PPO steps if the champion must be built")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import torch
    from mlflow.tracking import MlflowClient

    from rlhf.builtin import traffic
    from rlhf.config import MonitorConfig
    from rlhf.drift.lineage import model_version
    from tasks import monitor

    build_champion(work, args.ppo_steps)
    cfg = MonitorConfig(registered_model=MODEL_NAME, traffic=str(work / "bench_traffic" / "window_*.jsonl"), force=True)
    pools_path = work / "pools.json"
    if not pools_path.exists():
        models = monitor.load_models(cfg)
        traffic.build_pools(models.policy, models.reward_model, models.tokenizer, seed=1).save(pools_path)
    pools = traffic.ResponsePools.load(pools_path)
    version = str(model_version(MlflowClient(), MODEL_NAME, alias="champion").version)
    traffic.write_windows(work / "bench_traffic", [args.kind], pools, n_rows=args.rows, model_version=version)

    # 1. the whole monitoring run, cold: models and baseline loaded inside
    t0 = time.perf_counter()
    result = monitor.run_monitor(cfg)
    total_s = time.perf_counter() - t0
    # 2. its parts, warm: loading, then measuring + testing + diagnosing alone
    t0 = time.perf_counter()
    models = monitor.load_models(cfg)
    load_s = time.perf_counter() - t0
    window = monitor.find_window(cfg)
    t0 = time.perf_counter()
    prompts, responses, feedback, _ = monitor.read_window(window.path, models.lineage.version, cfg.min_rows)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    monitor.analyze_window(models, prompts, responses, feedback, cfg, cfg.seed)
    analyze_s = time.perf_counter() - t0

    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(f"window: {args.rows} rows ({args.kind}), alert: {result.alert}, cause: {result.cause}")
    print(f"run_monitor total (cold, incl. loading and MLflow logging): {total_s:.1f} s")
    print(f"load version, baseline and models: {load_s:.1f} s")
    print(f"read JSONL window: {read_s:.1f} s")
    print(f"analyze window (features, tests, diagnosis): {analyze_s:.1f} s")


if __name__ == "__main__":
    main()
