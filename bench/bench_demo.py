"""Benchmark: `make demo` (the default config) per stage: wall time, peak memory, and PPO's time split.

    PYTHONPATH=. .venv/bin/python bench/bench_demo.py [--repeats 2] [--set KEY=VALUE ...]   (or: make bench-demo)

Runs `.venv/bin/rlhf run` (what `make demo` runs once the venv is installed) in a
fresh folder per repeat, with its own MLflow store and PREFECT_HOME, as on a fresh
checkout. While it runs, samples the RSS of the whole process tree (the CLI, the
Prefect server it starts, any helper) every 0.2 s; after it ends, reads:

- peak RSS: the kernel's high-water mark of the largest single process
  (``ru_maxrss`` from wait4) and the sampled peak of the tree's sum (an upper
  bound: shared pages count once per process);
- per-stage wall time: start and end of each stage's MLflow child run; the rest
  of the wall time is start-up (imports, Prefect server) and wiring;
- the PPO time split: the sums of the ``timing/generation_s``, ``timing/scoring_s``
  and ``timing/update_s`` metrics the PPO stage logged, read back from MLflow.

Writes bench/results/demo-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
import time
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

PPO_TIMING = ("timing/generation_s", "timing/scoring_s", "timing/update_s", "timing/step_s")


def sample_tree_rss(pid: int, stop: threading.Event, out: dict) -> None:
    """Peak of the summed RSS of pid and its descendants, sampled until stop is set."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total, main = 0, 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if p.pid == pid:
                main = rss
        out["tree_peak"] = max(out.get("tree_peak", 0), total)
        out["main_peak"] = max(out.get("main_peak", 0), main)
        out["max_procs"] = max(out.get("max_procs", 0), len(procs))
        stop.wait(0.2)


def read_back(store: Path) -> dict:
    """Stage wall times and the PPO timing sums from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.get_experiment_by_name("rlhf")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stages = {}
    ppo_run = None
    for r in sorted(runs, key=lambda r: r.info.start_time):
        if r.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        name = r.data.tags.get("rlhf.stage", r.info.run_name)
        stages[name] = (r.info.end_time - r.info.start_time) / 1000
        if name == "ppo":
            ppo_run = r
    ppo = {}
    if ppo_run is not None:
        for key in PPO_TIMING:
            ppo[key] = sum(m.value for m in client.get_metric_history(ppo_run.info.run_id, key))
        ppo["steps"] = len(client.get_metric_history(ppo_run.info.run_id, "timing/step_s"))
        lengths = client.get_metric_history(ppo_run.info.run_id, "response/length_mean")
        ppo["response_length_mean"] = sum(m.value for m in lengths) / max(len(lengths), 1)
    parent_s = (parent.info.end_time - parent.info.start_time) / 1000
    return {"stages": stages, "parent_run_s": parent_s, "ppo_timing": ppo, "metrics": parent.data.metrics}


def run_once(args: argparse.Namespace, folder: Path) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    warm_up_s = warm_prefect_home(folder / ".prefect")  # see warm_prefect_home: a fresh home can time out here
    env = offline_env(PREFECT_HOME=str(folder / ".prefect"))
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: mlflow.db in the run folder, as `make demo`
    cmd = [str(ROOT / ".venv" / "bin" / "rlhf"), "run", *[x for item in args.set for x in ("--set", item)]]
    load_before = loadavg()
    t0 = time.perf_counter()
    with open(folder / "stdout.log", "w") as out, open(folder / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=err)
        stop, rss = threading.Event(), {}
        sampler = threading.Thread(target=sample_tree_rss, args=(proc.pid, stop, rss), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"rlhf run failed ({proc.returncode}): see {folder}/stderr.log")
    result = {
        "wall_s": wall_s,
        "prefect_home_warm_up_s": warm_up_s,
        "load_before": load_before,
        "load_after": loadavg(),
        "peak_rss_largest_process_mb": usage.ru_maxrss / 1024,  # Linux: kilobytes
        "peak_rss_tree_sampled_mb": rss.get("tree_peak", 0) / 2**20,
        "peak_rss_main_sampled_mb": rss.get("main_peak", 0) / 2**20,
        "max_processes": rss.get("max_procs", 0),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        **read_back(folder / "mlflow.db"),
    }
    result["startup_and_wiring_s"] = wall_s - sum(result["stages"].values())
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result["stages"].items())
    print(
        f"  run: {wall_s:.0f} s, peak RSS {result['peak_rss_largest_process_mb']:.0f} MB (tree {result['peak_rss_tree_sampled_mb']:.0f} MB), "
        f"load {load_before[0]:.1f}; {stages}",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(folder / "outputs", ignore_errors=True)
        shutil.rmtree(folder / "mlartifacts", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to `rlhf run --set`")
    parser.add_argument("--work", default=str(WORK / "demo"))
    parser.add_argument("--keep", action="store_true", help="keep each run's outputs and artifacts")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    runs = [run_once(args, work / f"run-{i}") for i in range(args.repeats)]
    stage_names = list(runs[0]["stages"])
    result = {
        "machine": machine(),
        "commit": git_commit(),
        "load_at_end": loadavg(),
        "versions": versions("prefect", "mlflow", "torch", "transformers", "trl"),
        "overrides": args.set,
        "repeats": args.repeats,
        "summary": {
            "wall_s": summary([r["wall_s"] for r in runs]),
            "peak_rss_largest_process_mb": summary([r["peak_rss_largest_process_mb"] for r in runs]),
            "peak_rss_tree_sampled_mb": summary([r["peak_rss_tree_sampled_mb"] for r in runs]),
            "startup_and_wiring_s": summary([r["startup_and_wiring_s"] for r in runs]),
            "stages": {s: summary([r["stages"].get(s, 0.0) for r in runs]) for s in stage_names},
            "ppo_timing": {k: summary([r["ppo_timing"][k] for r in runs]) for k in PPO_TIMING},
        },
        "runs": runs,
    }
    path = write_result("demo", result)
    s = result["summary"]
    print(
        f"\nmedian (min-max) over {args.repeats} runs: wall {s['wall_s']['median']:.0f} s "
        f"({s['wall_s']['min']:.0f}-{s['wall_s']['max']:.0f}), peak RSS {s['peak_rss_largest_process_mb']['median']:.0f} MB"
    )
    for name, st in s["stages"].items():
        print(f"  {name:10s} {st['median']:7.1f} s ({st['min']:.1f}-{st['max']:.1f})")
    print(f"load at end {loadavg()}; wrote {path}")


if __name__ == "__main__":
    main()
