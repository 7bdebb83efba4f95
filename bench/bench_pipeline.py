"""Benchmark: what Prefect and MLflow cost, the full flow against the same stage functions called bare.

    PYTHONPATH=. .venv/bin/python bench/bench_pipeline.py [--config configs/smoke.yaml | --config ""] [--set KEY=VALUE ...] \
        [--repeats 3] [--warm-stores] [--prefect-server]                 (or: make bench-pipeline)

Each repeat runs, in fresh processes and alternating which goes first:

- flow: ``flows.pipeline.rlhf_pipeline(cfg)`` under Prefect (temporary local
  server, task runs, caching keys, artifacts) with MLflow tracking, as `rlhf run`;
- bare: the same flow body, ``rlhf_pipeline.fn``, with every Prefect task in
  flows/pipeline.py replaced by its plain function (``task.fn``), Prefect's
  stage cache (``call_stage``) by a direct call, and the run logger and flow-run
  context by stand-ins. No Prefect at all; the stage functions still log to MLflow.

In both, every MLflow entry point is wrapped (bench/_mlflow_timer.py) to time what
is spent inside MLflow. From the pair of the same repeat:

    work      = bare - mlflow(bare)              the computation itself
    prefect   = flow - bare                      Prefect's cost (server start, task runs, cache keys)
    overhead  = (flow - work) / work             Prefect + MLflow, as a share of the work

and, because the same stage code varies by 10-20% from run to run on a shared VM
(more than Prefect's few seconds), from the time outside the six stage runs,
where all of Prefect's cost falls (each stage's MLflow run starts and ends inside
its task):

    prefect_outside   = outside(flow) - outside(bare)
    overhead_outside  = (prefect_outside + mlflow(bare)) / work

Every run gets its own MLflow store and output folder (so Prefect's stage cache,
keyed on the store, never hits); flow runs share one PREFECT_HOME under the
--work folder, as repeated `rlhf run`s on one machine do. With --warm-stores each
store starts as a copy of an empty, already-migrated MLflow database, as a user's
second run finds it (a fresh store spends seconds creating its tables). With
--prefect-server the flow runs report to a Prefect server started once for the
benchmark (`prefect server start`, as `make serve` and the deployments use)
instead of starting a temporary one per run, as `rlhf run` does on its own. The timed span is the
call itself (imports excluded, the same modules are imported on both sides);
the process wall time is recorded too. Writes bench/results/pipeline-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import (
    ROOT,
    WORK,
    git_commit,
    loadavg,
    machine,
    offline_env,
    summary,
    versions,
    warm_prefect_home,
    write_result,
)


# -- worker: one run in this process -------------------------------------------------------
def bare_pipeline():
    """flows.pipeline.rlhf_pipeline's body with Prefect taken out (tasks -> their plain functions)."""
    import logging
    import uuid
    from types import SimpleNamespace

    from prefect import Task

    import flows.pipeline as pipeline

    replaced = []
    for name, value in list(vars(pipeline).items()):
        if isinstance(value, Task):
            setattr(pipeline, name, value.fn)
            replaced.append(name)
    if hasattr(pipeline, "call_stage"):
        pipeline.call_stage = lambda fn, *args, **kwargs: (fn(*args, **kwargs), False)
    pipeline.get_run_logger = lambda: logging.getLogger("bench.bare")
    run = SimpleNamespace(id=uuid.uuid4(), name="bare")
    pipeline.FlowRunContext = SimpleNamespace(get=lambda: SimpleNamespace(flow_run=run))
    return pipeline.rlhf_pipeline.fn, replaced


def worker(mode: str, config: str | None, overrides: list[str]) -> None:
    t_import = time.perf_counter()
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import _mlflow_timer

    timer = _mlflow_timer.install()
    from flows.pipeline import rlhf_pipeline
    from rlhf.config import load_config

    cfg = load_config(config or None, overrides)
    replaced: list[str] = []
    fn = rlhf_pipeline
    if mode == "bare":
        fn, replaced = bare_pipeline()
    import_s = time.perf_counter() - t_import
    t0 = time.perf_counter()
    result = fn(cfg)
    wall_s = time.perf_counter() - t0
    import mlflow

    tags = mlflow.get_run(result.parent_run_id).data.tags
    children = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
        output_format="list",
    )
    stages = {
        r.data.tags.get("rlhf.stage", r.info.run_name): (r.info.end_time - r.info.start_time) / 1000 for r in children
    }
    print(
        json.dumps(
            {
                "mode": mode,
                "wall_s": wall_s,
                "import_s": import_s,
                "mlflow_s": timer.seconds,
                "mlflow_calls": timer.calls,
                "mlflow_top": dict(sorted(timer.by_name.items(), key=lambda kv: -kv[1])[:8]),
                "tasks_replaced": replaced,
                "cached_stages": tags.get("rlhf.cached_stages"),
                "parent_run_id": result.parent_run_id,
                "stages": stages,
            }
        )
    )


# -- driver --------------------------------------------------------------------------------
def run_one(mode: str, args: argparse.Namespace, work: Path, index: int) -> dict:
    folder = work / f"{mode}-{index}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if args.warm_stores:
        shutil.copyfile(work / "empty-mlflow.db", folder / "mlflow.db")
    env = offline_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db",
        PREFECT_HOME=str(work / "prefect-home"),
        PYTHONPATH=f"{ROOT}:{ROOT / 'bench'}",
        **({"PREFECT_API_URL": args.prefect_api_url} if args.prefect_api_url and mode == "flow" else {}),
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode]
    cmd += ["--config", str(Path(args.config).resolve()) if args.config else ""]  # "": the default config
    for item in args.set:
        cmd += ["--set", item]
    load_before = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    (folder / "stderr.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}), see {folder}/stderr.log:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(process_s=process_s, load_before=load_before, load_after=loadavg())
    (folder / "result.json").write_text(json.dumps(result, indent=2))  # kept even if a later run fails
    print(
        f"  {mode:4s} #{index}: call {result['wall_s']:.1f} s (MLflow {result['mlflow_s']:.1f} s), "
        f"process {process_s:.1f} s, load {load_before[0]:.1f}",
        flush=True,
    )
    if not args.keep:
        for sub in ("outputs", "mlartifacts"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    return result


def empty_mlflow_store(path: Path) -> None:
    """An MLflow sqlite store with its tables created (what a store looks like after its first run)."""
    path.unlink(missing_ok=True)
    code = "import mlflow; mlflow.MlflowClient().search_experiments()"
    subprocess.run(
        [sys.executable, "-c", code],
        env=offline_env(MLFLOW_TRACKING_URI=f"sqlite:///{path}"),
        check=True,
        capture_output=True,
    )


def start_prefect_server(prefect_home: Path, log: Path, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free loopback port; returns the process and its API URL once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefect = Path(sys.executable).parent / "prefect"
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=offline_env(PREFECT_HOME=str(prefect_home)),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"prefect server not healthy after {timeout_s:.0f} s; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / "smoke.yaml"),
        help='pipeline config YAML; "" for the default config (what `make demo` runs)',
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(WORK / "pipeline"))
    parser.add_argument("--keep", action="store_true", help="keep each run's outputs and artifacts")
    parser.add_argument("--warm-stores", action="store_true", help="start each MLflow store with its tables created")
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="flow runs report to one `prefect server start` instead of a temporary server each",
    )
    parser.add_argument("--worker", choices=["flow", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.set)
        return

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    warm_up_s = warm_prefect_home(work / "prefect-home")
    print(f"PREFECT_HOME warmed up in {warm_up_s:.0f} s", flush=True)
    if args.warm_stores:
        empty_mlflow_store(work / "empty-mlflow.db")
    server, args.prefect_api_url = None, None
    if args.prefect_server:
        server, args.prefect_api_url = start_prefect_server(work / "prefect-home", work / "prefect-server.log")
        print(f"Prefect server at {args.prefect_api_url}", flush=True)
    runs: dict[str, list[dict]] = {"flow": [], "bare": []}
    try:
        for i in range(args.repeats):
            for mode in ["flow", "bare"] if i % 2 == 0 else ["bare", "flow"]:
                runs[mode].append(run_one(mode, args, work, i))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)

    pairs = []
    for flow, bare in zip(runs["flow"], runs["bare"]):
        work_s = bare["wall_s"] - bare["mlflow_s"]
        # The same stage code runs 10-20% faster or slower from one run to the next on a shared VM, which
        # swamps a few seconds of Prefect in flow - bare. Prefect is not inside the stage runs (each starts
        # and ends its MLflow run within the task), so the time outside them isolates it.
        outside = {m: r["wall_s"] - sum(r["stages"].values()) for m, r in (("flow", flow), ("bare", bare))}
        prefect_outside_s = outside["flow"] - outside["bare"]
        pairs.append(
            {
                "flow_s": flow["wall_s"],
                "bare_s": bare["wall_s"],
                "work_s": work_s,
                "prefect_s": flow["wall_s"] - bare["wall_s"],
                "mlflow_s": bare["mlflow_s"],
                "prefect_pct": 100 * (flow["wall_s"] - bare["wall_s"]) / work_s,
                "mlflow_pct": 100 * bare["mlflow_s"] / work_s,
                "overhead_pct": 100 * (flow["wall_s"] - work_s) / work_s,
                "overhead_process_pct": 100
                * (flow["process_s"] - bare["process_s"] + bare["mlflow_s"])
                / (bare["process_s"] - bare["mlflow_s"]),
                "flow_outside_stages_s": outside["flow"],
                "bare_outside_stages_s": outside["bare"],
                "prefect_outside_s": prefect_outside_s,
                "overhead_outside_pct": 100 * (prefect_outside_s + bare["mlflow_s"]) / work_s,
            }
        )
    keys = (
        "flow_s",
        "bare_s",
        "work_s",
        "prefect_s",
        "mlflow_s",
        "prefect_pct",
        "mlflow_pct",
        "overhead_pct",
        "overhead_process_pct",
        "flow_outside_stages_s",
        "bare_outside_stages_s",
        "prefect_outside_s",
        "overhead_outside_pct",
    )
    result = {
        "machine": machine(),
        "commit": git_commit(),
        "load_at_end": loadavg(),
        "versions": versions("prefect", "mlflow", "torch", "transformers", "trl"),
        "config": args.config,
        "overrides": args.set,
        "repeats": args.repeats,
        "prefect_home_warm_up_s": warm_up_s,
        "warm_stores": args.warm_stores,
        "prefect_server": args.prefect_server,
        "summary": {k: summary([p[k] for p in pairs]) for k in keys},
        "flow_mlflow_s": summary([r["mlflow_s"] for r in runs["flow"]]),
        "stages": {
            mode: {s: summary([r["stages"].get(s, 0.0) for r in runs[mode]]) for s in runs[mode][0]["stages"]}
            for mode in runs
        },
        "pairs": pairs,
        "runs": runs,
    }
    path = write_result("pipeline", result)
    s = result["summary"]
    print(
        f"\nmedian (min-max) over {args.repeats} pairs, {Path(args.config).name if args.config else 'default config'} {' '.join(args.set)}:"
    )
    for k in keys:
        print(f"  {k:22s} {s[k]['median']:8.2f}  ({s[k]['min']:.2f} .. {s[k]['max']:.2f})")
    print(f"load at end {loadavg()}; wrote {path}")


if __name__ == "__main__":
    main()
