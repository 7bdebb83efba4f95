"""In-sample smoke benchmark of drift monitoring, and the small champion other drift benches reuse.

Its windows resample the champion's own pools with fixed seeds and the thresholds were once tuned on them,
so its rates are in-sample: the held-out figures of docs/monitoring.md come from bench/drift_heldout.py.

    MLFLOW_DISABLE_TELEMETRY=true PYTHONPATH=. python bench/drift_detection.py \
        [--work outputs/bench/drift] [--windows 20] [--rows 500] [--magnitude 0.3] [--ppo-steps 10]

1. A champion, once per --work folder (reused after): the built-in data set, SFT
   (120 steps) and reward model (160 steps) as in the test suite's tiny stack,
   a short PPO run (--ppo-steps; 0 serves the SFT policy), a registered version
   with the pipeline's lineage tags, its baseline (tasks/baseline.run_baseline),
   alias ``champion``. The evaluate stage is skipped: the version holds the final
   PPO checkpoint.
2. Response pools of the traffic simulator, sampled once from the champion.
3. --windows seeded windows of every drift kind at --magnitude and as many clean
   windows, each through ``tasks.monitor.analyze_window`` (the monitor's own code
   path, without the MLflow logging).

Prints and writes (``<work>/detection.md``, ``detection.json``) the table:
detection rate per kind, false-alarm rate on clean windows, and how often the
diagnosis names the injected cause among detected windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np

MODEL_NAME = "rlhf-policy"


def build_champion(work: Path, ppo_steps: int, seed: int = 0) -> None:
    """Train and register a small champion in work/mlflow.db unless one exists; give it a baseline if it lacks one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from rlhf.builtin.model import resolve_base_model
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.config import load_config
    from rlhf.drift.lineage import BASELINE_TAG
    from rlhf.infra.tracking import setup_experiment, stage_run
    from tasks.baseline import run_baseline
    from tasks.ppo import PPOResult, run_ppo
    from tasks.reward import run_reward
    from tasks.sft import run_sft

    client = MlflowClient()
    cfg = load_config(
        None,
        [
            "sft.max_steps=120",
            "sft.batch_size=32",
            "reward.max_steps=160",
            "reward.batch_size=32",
            f"ppo.steps={max(ppo_steps, 1)}",
            f"ppo.checkpoint_every={max(ppo_steps // 2, 1)}",
            f"seed={seed}",
        ],
    )
    paths = resolve_data_paths(cfg.data, work, cfg.seed)
    try:
        mv = client.get_model_version_by_alias(MODEL_NAME, "champion")
    except mlflow.exceptions.MlflowException:
        base = resolve_base_model(cfg.model.base_model, work / "base-models", cfg.seed)
        with mlflow.start_run(experiment_id=setup_experiment(cfg.experiment), run_name="pipeline-bench") as parent:
            parent_id = parent.info.run_id
            sft = run_sft(cfg, base, paths["sft"], parent_id)
            reward = run_reward(cfg, sft, paths["preferences"], paths["preferences_heldout"], parent_id)
            ppo = (
                run_ppo(cfg, sft, reward, paths["prompts"], parent_id)
                if ppo_steps > 0
                else PPOResult(sft, {0: sft.uri})
            )
            with stage_run(parent_id, "register") as run:
                if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
                    client.create_registered_model(MODEL_NAME)
                mv = client.create_model_version(MODEL_NAME, source=ppo.final.uri, run_id=run.info.run_id)
                tags = {
                    "lineage.pipeline_run_id": parent_id,
                    "lineage.ppo_run_id": ppo.final.run_id,
                    "lineage.checkpoint_uri": ppo.final.uri,
                }
                for key, value in tags.items():
                    client.set_model_version_tag(MODEL_NAME, mv.version, key, value)
        client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    if BASELINE_TAG not in (mv.tags or {}):
        run_baseline(cfg, MODEL_NAME, mv.version, [paths["heldout_prompts"], paths["prompts"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", default="outputs/bench/drift", help="folder for the champion's store, pools and results"
    )
    parser.add_argument("--windows", type=int, default=20, help="seeded windows per drift kind (and clean)")
    parser.add_argument("--rows", type=int, default=500, help="rows per window")
    parser.add_argument(
        "--magnitude", type=float, default=None, help="drifted share of rows (default: the simulator's)"
    )
    parser.add_argument("--ppo-steps", type=int, default=10, help="PPO steps of the champion (0: the SFT policy)")
    parser.add_argument("--kinds", default=None, help="comma-separated subset of drift kinds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import torch

    from rlhf.builtin import traffic
    from rlhf.config import MonitorConfig
    from tasks.monitor import analyze_window, load_models

    if args.threads:
        torch.set_num_threads(args.threads)
    magnitude = traffic.DEFAULT_MAGNITUDE if args.magnitude is None else args.magnitude
    kinds = args.kinds.split(",") if args.kinds else list(traffic.DRIFT_KINDS)

    # 1. the champion, its baseline and models
    t0 = time.perf_counter()
    build_champion(work, args.ppo_steps)
    cfg = MonitorConfig(registered_model=MODEL_NAME)
    models = load_models(cfg)
    print(f"champion {MODEL_NAME} v{models.lineage.version} ready in {time.perf_counter() - t0:.0f} s", flush=True)

    # 2. response pools, sampled once
    pools_path = work / "pools.json"
    if pools_path.exists():
        pools = traffic.ResponsePools.load(pools_path)
    else:
        t0 = time.perf_counter()
        generation = models.baseline.profile["generation"]
        pools = traffic.build_pools(
            models.policy,
            models.reward_model,
            models.tokenizer,
            seed=1,
            max_new_tokens=int(generation["max_new_tokens"]),
            temperature=float(generation["temperature"]),
        )
        pools.save(pools_path)
        print(f"pools sampled in {time.perf_counter() - t0:.0f} s", flush=True)

    # 3. seeded windows of every kind through the monitor's analysis
    records = []
    for k, kind in enumerate(kinds):
        for i in range(args.windows):
            seed = 10_000 * (k + 1) + i
            rows = traffic.simulate_window(kind, magnitude, args.rows, seed, pools, models.lineage.version)
            feedback = np.array([r["feedback"] for r in rows if r["feedback"] is not None], dtype=float)
            t0 = time.perf_counter()
            analysis = analyze_window(
                models, [r["prompt"] for r in rows], [r["response"] for r in rows], feedback, cfg, seed
            )
            records.append(
                {
                    "kind": kind,
                    "seed": seed,
                    "alert": analysis.diagnosis.cause is not None,
                    "cause": analysis.diagnosis.cause,
                    "expected": traffic.CAUSES[kind],
                    "breached": list(analysis.diagnosis.breached),
                    "seconds": time.perf_counter() - t0,
                    "metrics": analysis.metrics,
                }
            )
            print(
                f"{kind:16s} seed {seed}: {analysis.diagnosis.cause or 'no alert':24s} "
                f"{','.join(analysis.diagnosis.breached)} ({records[-1]['seconds']:.1f} s)",
                flush=True,
            )

    table = detection_table(records, magnitude, args.rows)
    print(table)
    (work / "detection.md").write_text(table)
    (work / "detection.json").write_text(
        json.dumps(
            {
                "magnitude": magnitude,
                "rows": args.rows,
                "windows": args.windows,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
                "records": records,
            },
            indent=1,
        )
    )


def detection_table(records: list[dict], magnitude: float, rows: int) -> str:
    """Markdown table: alerts, detection or false-alarm rate, diagnosis accuracy, top signals per kind."""
    lines = [
        f"Windows of {rows} rows, drifted share {magnitude:g}.",
        "",
        "| kind | windows | alerts | detection rate | false-alarm rate | diagnosis correct | most breached signals |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["kind"] for r in records):
        rs = [r for r in records if r["kind"] == kind]
        alerts = [r for r in rs if r["alert"]]
        signals = Counter(s for r in rs for s in r["breached"]).most_common(3)
        top = ", ".join(f"{s} ({n})" for s, n in signals)
        if rs[0]["expected"] is None:
            lines.append(f"| {kind} | {len(rs)} | {len(alerts)} | | {len(alerts) / len(rs):.0%} | | {top} |")
            continue
        right = sum(r["cause"] == r["expected"] for r in alerts)
        accuracy = f"{right}/{len(alerts)} ({right / len(alerts):.0%})" if alerts else "n/a"
        lines.append(f"| {kind} | {len(rs)} | {len(alerts)} | {len(alerts) / len(rs):.0%} | | {accuracy} | {top} |")
    seconds = [r["seconds"] for r in records]
    lines += ["", f"Analysis time per window: median {np.median(seconds):.1f} s, max {max(seconds):.1f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
