"""Benchmark: how cost grows. PPO step time against batch size and response length; validation and
monitoring rows per second against data size.

    PYTHONPATH=. .venv/bin/python bench/bench_growth.py ppo [--batch-sizes 8,16,32,64] [--lengths 16,32,48,96]
    PYTHONPATH=. .venv/bin/python bench/bench_growth.py validation [--rows 1000,10000,50000]
    PYTHONPATH=. .venv/bin/python bench/bench_growth.py monitor [--rows 1000,10000,50000]
                                                                        (or: make bench-growth)

ppo: our PPOTrainer (rlhf/ppo/trainer.py) on the bench SFT/reward models
(bench/ppo_models.py), one fresh trainer per setting: one warm-up step, then
--steps timed steps; median step time, its split (the trainer's timing/* metrics)
and the mean response length actually sampled (the SFT policy often ends before
the limit). The batch sweep uses --length; the length sweep uses --batch.

validation: ``tasks.validate.validate_file`` on N built-in preference rows, one
cold call (first in the process) then --repeats warm calls per size.

monitor: the monitor's two data-size-dependent steps on one window of N traffic
rows (rlhf.builtin.traffic, kind `clean`): ``tasks.monitor.read_window`` (JSONL
loading and checks) and ``tasks.monitor.analyze_window`` (features, drift tests,
diagnosis; the model-bound parts use a bounded subsample: embedding_rows,
kl_prompts, scored_rows of MonitorConfig). The monitored model and its baseline
are the bench SFT/reward models, built in-process with tasks.baseline.compute_baseline
(no registry, no MLflow).

Each writes bench/results/growth-<part>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import WORK, git_commit, loadavg, machine, summary, versions, write_result
from ppo_models import ensure_models


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def ppo_growth(args: argparse.Namespace) -> dict:
    paths = ensure_models(Path(args.work))
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import torch

    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from models.policy import PolicyWithValueHead
    from rlhf.config import PPOConfig
    from rlhf.ppo.trainer import PPOTrainer

    tokenizer = load_tokenizer(paths["sft"])
    ref_model = load_causal_lm(paths["sft"])
    reward_model = load_reward_model(paths["reward"], tokenizer.pad_token_id)
    prompts = [json.loads(x)["prompt"] for x in Path(paths["prompts"]).read_text().splitlines() if x.strip()]
    settings = [(b, args.length) for b in ints(args.batch_sizes)]
    settings += [(args.batch, r) for r in ints(args.lengths) if (args.batch, r) not in settings]
    rows = []
    for batch, length in settings:
        torch.manual_seed(0)
        policy = PolicyWithValueHead(load_causal_lm(paths["sft"]))
        cfg = PPOConfig(
            steps=args.steps + 1,
            batch_size=batch,
            mini_batch_size=max(1, batch // 2),
            ppo_epochs=2,
            max_new_tokens=length,
            kl_control="fixed",
            kl_coef=0.05,
            kl_horizon=max(1000, batch),
        )
        trainer = PPOTrainer(cfg, policy, ref_model, reward_model, tokenizer, prompts, 0)
        trainer.step()  # warm-up: first-call allocations
        load = loadavg()
        metrics = [trainer.step().metrics for _ in range(args.steps)]
        med = {
            k: statistics.median(m[f"timing/{k}"] for m in metrics)
            for k in ("step_s", "generation_s", "scoring_s", "update_s")
        }
        row = {
            "batch_size": batch,
            "max_new_tokens": length,
            "load": load,
            "step_s": summary([m["timing/step_s"] for m in metrics]),
            **{f"{k}_median": v for k, v in med.items()},
            "response_length_mean": statistics.mean(m["response/length_mean"] for m in metrics),
            "episodes_per_s": batch / med["step_s"],
        }
        rows.append(row)
        print(
            f"  batch {batch:4d}, max_new_tokens {length:4d}: step {med['step_s']:.2f} s "
            f"(gen {med['generation_s']:.2f}, score {med['scoring_s']:.2f}, update {med['update_s']:.2f}), "
            f"mean length {row['response_length_mean']:.1f}, load {load[0]:.1f}",
            flush=True,
        )
    return {"steps": args.steps, "rows": rows, "torch_threads": torch.get_num_threads()}


def validation_growth(args: argparse.Namespace) -> dict:
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    from rlhf.builtin.dataset import BuiltinSizes, build_builtin_rows
    from rlhf.config import ValidationConfig
    from tasks.validate import validate_file

    cfg = ValidationConfig()
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        first = True
        for n in ints(args.rows):
            rows = build_builtin_rows(0, BuiltinSizes(preferences=n))["preferences"]
            path = Path(tmp) / f"preferences-{n}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            if first:  # the one-off imports (GX) belong to no size
                t0 = time.perf_counter()
                validate_file(str(path), "preference", cfg)
                cold_s = time.perf_counter() - t0
                first = False
            load = loadavg()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                report = validate_file(str(path), "preference", cfg)
                times.append(time.perf_counter() - t0)
            s = summary(times)
            rows_out.append(
                {
                    "rows": report.rows,
                    "success": report.success,
                    "seconds": s,
                    "load": load,
                    "rows_per_s": report.rows / s["median"],
                }
            )
            print(
                f"  {report.rows:7d} rows: {s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f}), "
                f"{report.rows / s['median']:.0f} rows/s, load {load[0]:.1f}",
                flush=True,
            )
    return {"cold_first_call_s": cold_s, "repeats": args.repeats, "rows": rows_out}


def monitor_growth(args: argparse.Namespace) -> dict:
    paths = ensure_models(Path(args.work))
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import numpy as np

    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.builtin import traffic
    from rlhf.config import BaselineConfig, MonitorConfig
    from rlhf.drift.lineage import Lineage
    from tasks import monitor
    from tasks.baseline import compute_baseline

    tokenizer = load_tokenizer(paths["sft"])
    policy, reference = load_causal_lm(paths["sft"]).eval(), load_causal_lm(paths["sft"]).eval()
    reward_model = load_reward_model(paths["reward"], tokenizer.pad_token_id).eval()
    heldout = [json.loads(x)["prompt"] for x in Path(paths["heldout_prompts"]).read_text().splitlines() if x.strip()]
    t0 = time.perf_counter()
    baseline = compute_baseline(policy, reference, reward_model, tokenizer, heldout, BaselineConfig(), seed=0)
    baseline_s = time.perf_counter() - t0
    lineage = Lineage("bench", "1", "", "", {}, paths["sft"], paths["sft"], paths["reward"], "ppo", {}, None)
    models = monitor.MonitorModels(lineage, baseline, tokenizer, policy, reference, reward_model)
    t0 = time.perf_counter()
    pools = traffic.build_pools(policy, reward_model, tokenizer, clean_size=args.pool, seed=1, kinds=("clean",))
    pools_s = time.perf_counter() - t0
    cfg = MonitorConfig()
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-growth-monitor-") as tmp:
        for n in ints(args.rows):
            [path] = traffic.write_windows(Path(tmp) / str(n), ["clean"], pools, n_rows=n, model_version="1")
            load = loadavg()
            t0 = time.perf_counter()
            prompts, responses, feedback, _ = monitor.read_window(str(path), "1", cfg.min_rows)
            read_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            analysis = monitor.analyze_window(models, prompts, responses, np.asarray(feedback), cfg, cfg.seed)
            analyze_s = time.perf_counter() - t0
            total = read_s + analyze_s
            out.append(
                {
                    "rows": len(prompts),
                    "read_s": read_s,
                    "analyze_s": analyze_s,
                    "rows_per_s": len(prompts) / total,
                    "breached_signals": sum(bool(s.breached) for s in analysis.signals),
                    "load": load,
                }
            )
            print(
                f"  {len(prompts):7d} rows: read {read_s:.1f} s, analyze {analyze_s:.1f} s, "
                f"{len(prompts) / total:.0f} rows/s, load {load[0]:.1f}",
                flush=True,
            )
    return {
        "baseline_s": baseline_s,
        "pools_s": pools_s,
        "pool_size": args.pool,
        "rows": out,
        "monitor_config": {k: getattr(cfg, k) for k in ("kl_prompts", "embedding_rows", "scored_rows", "permutations")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["ppo", "validation", "monitor"])
    parser.add_argument("--work", default=str(WORK / "ppo"), help="bench models (bench/ppo_models.py)")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--lengths", default="16,32,48,96")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the length sweep")
    parser.add_argument("--length", type=int, default=48, help="max_new_tokens of the batch sweep")
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps per setting (after one warm-up)")
    parser.add_argument("--rows", default="1000,10000,50000")
    parser.add_argument("--repeats", type=int, default=3, help="warm validation calls per size")
    parser.add_argument("--pool", type=int, default=400, help="clean responses sampled for the traffic simulator")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fn = {"ppo": ppo_growth, "validation": validation_growth, "monitor": monitor_growth}[args.part]
    data = fn(args)
    path = write_result(
        f"growth-{args.part}",
        {
            "machine": machine(),
            "commit": git_commit(),
            "load_at_end": loadavg(),
            "versions": versions("torch", "transformers", "pandas", "great_expectations", "datasets"),
            "args": {k: v for k, v in vars(args).items()},
            **data,
        },
    )
    print(f"load at end {loadavg()}; wrote {path}")


if __name__ == "__main__":
    main()
