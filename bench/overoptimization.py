"""Acceptance run: an over-optimising PPO run on the embedded task, and what evaluation makes of it.

KL penalty off (``ppo.kl_control=fixed``, ``ppo.kl_coef=0``) and long training, so
the policy runs away from SFT and games the reward model. The evaluate stage must
flag the run (``hacking.run.*``) and choose a checkpoint whose gold reward is within
10% of the best gold reward any checkpoint reached. "Best" is measured here on the
*test* split (the prompts the choice never saw), for every checkpoint, so the
check is honest: the choice was made on the selection split.

    PYTHONPATH=. python bench/overoptimization.py --out /tmp/overopt

Stages are cached in --out (stack.json, ppo.json): a rerun only re-evaluates.
Prints and writes summary.json with the figures docs/evaluation.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="outputs/overoptimization", help="working folder (MLflow store, caches, summary)"
    )
    parser.add_argument("--sft-steps", type=int, default=None, help="sft.max_steps (default: the config's)")
    parser.add_argument("--reward-steps", type=int, default=None, help="reward.max_steps (default: the config's)")
    parser.add_argument("--ppo-steps", type=int, default=80, help="PPO iterations with the KL penalty off")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="log a checkpoint every N iterations")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"

    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    import mlflow

    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.builtin.model import resolve_base_model
    from rlhf.builtin.task import SUPPORT_TASK, resolve_data_paths
    from rlhf.config import DiagnosticsConfig, load_config
    from rlhf.data.loading import load_split
    from rlhf.evaluation.hacking import split_for_selection
    from rlhf.infra.tracking import download, setup_experiment
    from tasks.common import Checkpoint
    from tasks.evaluate import make_judge, run_evaluate, score_policy
    from tasks.ppo import PPOResult, run_ppo
    from tasks.reward import run_reward
    from tasks.sft import run_sft

    stack_overrides = [f"sft.max_steps={args.sft_steps}"] if args.sft_steps else []
    stack_overrides += [f"reward.max_steps={args.reward_steps}"] if args.reward_steps else []
    cfg = load_config(
        None,
        [
            f"seed={args.seed}",
            *stack_overrides,
            f"ppo.steps={args.ppo_steps}",
            f"ppo.checkpoint_every={args.checkpoint_every}",
            f"ppo.sample_every={args.ppo_steps}",
            "ppo.kl_control=fixed",
            "ppo.kl_coef=0.0",
        ],
    )
    diagnostics = DiagnosticsConfig()
    paths = resolve_data_paths(cfg.data, out / "data", cfg.seed)
    experiment_id = setup_experiment("overoptimization")
    timings: dict[str, float] = {}

    # 1. SFT and reward model (cached).
    stack_file = out / "stack.json"
    if stack_file.exists():
        stack = json.loads(stack_file.read_text())
        parent_id = stack["parent_run_id"]
    else:
        t0 = time.perf_counter()
        base = resolve_base_model(cfg.model.base_model, out / "base-models", cfg.seed)
        with mlflow.start_run(experiment_id=experiment_id, run_name="overoptimization") as parent:
            parent_id = parent.info.run_id
            sft = run_sft(cfg, base, paths["sft"], parent_id)
            reward = run_reward(cfg, sft, paths["preferences"], paths["preferences_heldout"], parent_id)
        stack = {"parent_run_id": parent_id, "sft": sft.__dict__, "reward": reward.__dict__}
        stack_file.write_text(json.dumps(stack))
        timings["sft_and_reward_s"] = time.perf_counter() - t0
    sft, reward = Checkpoint(**stack["sft"]), Checkpoint(**stack["reward"])

    # 2. PPO with the KL penalty off (cached).
    ppo_file = out / "ppo.json"
    if ppo_file.exists():
        raw = json.loads(ppo_file.read_text())
        ppo = PPOResult(Checkpoint(**raw["final"]), {int(k): v for k, v in raw["checkpoints"].items()})
    else:
        t0 = time.perf_counter()
        with mlflow.start_run(run_id=parent_id):
            ppo = run_ppo(cfg, sft, reward, paths["prompts"], parent_id)
        ppo_file.write_text(json.dumps({"final": ppo.final.__dict__, "checkpoints": ppo.checkpoints}))
        timings["ppo_s"] = time.perf_counter() - t0

    # 3. The evaluate stage as the pipeline runs it.
    t0 = time.perf_counter()
    with mlflow.start_run(run_id=parent_id):
        evaluation = run_evaluate(cfg, sft, reward, ppo, paths["heldout_prompts"], parent_id, diagnostics=diagnostics)
    timings["evaluate_s"] = time.perf_counter() - t0

    # 4. Gold reward of every checkpoint on the test split, which the choice never saw.
    scratch = out / "downloads"
    tokenizer = load_tokenizer(str(download(sft.uri, scratch)))
    reward_model = load_reward_model(str(download(reward.uri, scratch)), tokenizer.pad_token_id)
    judge = make_judge(SUPPORT_TASK, None, reward_model, tokenizer)
    heldout = list(load_split(paths["heldout_prompts"])["prompt"])[: cfg.data.max_heldout_prompts]
    _, test_prompts = split_for_selection(heldout, diagnostics.selection_fraction, cfg.seed)
    prompts = [p for p in test_prompts for _ in range(cfg.eval.samples_per_prompt)]
    test_gold: dict[int, float] = {}
    for step, uri in sorted(ppo.checkpoints.items()):
        model = load_causal_lm(str(download(uri, scratch))).eval()
        scored = score_policy(model, None, tokenizer, prompts, reward_model, tokenizer, judge, cfg)
        test_gold[step] = sum(scored.judge) / len(scored.judge)

    client = mlflow.MlflowClient()
    history = {
        name: {int(m.step): m.value for m in client.get_metric_history(evaluation.run_id, f"eval/selection/{name}")}
        for name in ("judge_score_mean", "rm_score_mean", "kl_mean", "response_length_mean", "reward_length_corr")
    }
    best_step = max(test_gold, key=test_gold.get)
    chosen_gold = test_gold[evaluation.step]
    summary = {
        "command": f"PYTHONPATH=. python bench/overoptimization.py --out {args.out} --sft-steps {cfg.sft.max_steps} "
        f"--reward-steps {cfg.reward.max_steps} --ppo-steps {args.ppo_steps} --checkpoint-every {args.checkpoint_every}",
        "evaluate_run_id": evaluation.run_id,
        "chosen_step": evaluation.step,
        "last_step": max(ppo.checkpoints),
        "best_test_gold_step": best_step,
        "best_test_gold": test_gold[best_step],
        "chosen_test_gold": chosen_gold,
        "last_test_gold": test_gold[max(ppo.checkpoints)],
        "chosen_over_best": chosen_gold / test_gold[best_step] if test_gold[best_step] > 0 else float("nan"),
        "sft_test_gold": evaluation.metrics["eval/sft_gold_reward_mean"],
        "flags": {k: v for k, v in evaluation.tags.items() if k.startswith("hacking.")},
        "test_gold_by_step": test_gold,
        "selection_by_step": history,
        "eval_metrics": evaluation.metrics,
        "timings_s": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("eval_metrics", "selection_by_step")}, indent=2))
    print("step  kl  sel_gold  sel_rm  len  corr  test_gold")
    for step in sorted(history["kl_mean"]):
        print(
            f"{step:4d} {history['kl_mean'][step]:7.2f} {history['judge_score_mean'][step]:7.3f} "
            f"{history['rm_score_mean'][step]:7.3f} {history['response_length_mean'][step]:6.1f} "
            f"{history['reward_length_corr'][step]:6.3f} {test_gold.get(step, float('nan')):7.3f}"
        )


if __name__ == "__main__":
    main()
