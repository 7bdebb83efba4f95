"""Why the feedback flow's PPO run made the champion worse, and what fixes it (docs/feedback.md, round 3).

    PYTHONPATH=.:bench .venv/bin/python bench/feedback_continuation.py --store outputs/fb/a-replay3 \
        --reward-run RUN_ID NAME [--value-head] [--optimizer] [--set ppo_field=value ...]

PPO continued from the store's champion (its policy checkpoint, the KL reference too, as in the feedback flow)
against the reward model of ``--reward-run`` (a feedback run's `reward` stage run), on the store's PPO prompts, with
the champion's value head (``--value-head``) and optimizer state (``--optimizer``) or fresh ones, and PPO settings
overridden by ``--set``. Every ``--every`` steps, the gold judge's mean on 4 samples of each of the first 96 held-out
prompts, and the paired win rate against the champion's samples (same prompts, same sampling seed). This is the
loop of tasks/ppo.py without MLflow, so that variants cost a minute each; it appends one line per variant to
bench/results/feedback-continuation.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="label of the variant in the result line")
    parser.add_argument("--store", required=True, help="--work folder of bench/feedback_loop.py (mlflow.db, data/)")
    parser.add_argument("--reward-run", required=True, help="run id of the feedback run's `reward` stage")
    parser.add_argument("--value-head", action="store_true", help="start from the champion's value head")
    parser.add_argument(
        "--optimizer", action="store_true", help="start from the champion's optimizer state (Adam moments)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=96, help="held-out prompts judged")
    args = parser.parse_args()

    store = Path(args.store).resolve()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.chdir(store)  # artifact paths in the store may be relative to it
    import torch
    from mlflow.tracking import MlflowClient

    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from models.policy import PolicyWithValueHead
    from rlhf.builtin.judge import GoldJudge
    from rlhf.builtin.task import task_knowledge
    from rlhf.config import DataConfig, load_config
    from rlhf.data.loading import load_split
    from rlhf.drift.features import sample_responses
    from rlhf.drift.lineage import resolve_lineage
    from rlhf.infra.tracking import download
    from rlhf.ppo.trainer import OPTIMIZER_FILE, PPOTrainer
    from rlhf.registry.promotion import CHAMPION

    client = MlflowClient()
    cfg = load_config(None, [f"ppo.{kv}" for kv in args.overrides])
    champion = resolve_lineage(client, cfg.registered_model, alias=CHAMPION)
    data = next(store.glob("data/**/heldout_prompts.jsonl")).parent
    judge, task = GoldJudge(), task_knowledge(DataConfig())
    with tempfile.TemporaryDirectory() as scratch:
        policy_dir = str(download(champion.policy_uri, scratch + "/p"))
        reward_dir = str(download(f"runs:/{args.reward_run}/checkpoint", scratch + "/r"))
        tokenizer = load_tokenizer(policy_dir)
        torch.manual_seed(0)
        policy = PolicyWithValueHead(load_causal_lm(policy_dir))
        if args.value_head and not policy.load_value_head(policy_dir):
            sys.exit(f"{champion.policy_uri} has no value head: drop --value-head")
        reference = load_causal_lm(policy_dir)
        reward = load_reward_model(reward_dir, tokenizer.pad_token_id)
        optimizer_state = None
        if args.optimizer:
            if not (Path(policy_dir) / OPTIMIZER_FILE).exists():
                sys.exit(f"{champion.policy_uri} has no {OPTIMIZER_FILE}: drop --optimizer")
            optimizer_state = torch.load(Path(policy_dir) / OPTIMIZER_FILE, weights_only=True)
    prompts = list(load_split(str(data / "prompts.jsonl"))["prompt"])
    trainer = PPOTrainer(cfg.ppo, policy, reference, reward, tokenizer, prompts, 0, gold_scorer=task.gold_score)
    if optimizer_state is not None:
        trainer.optimizer.load_state_dict(optimizer_state)
    heldout = list(load_split(str(data / "heldout_prompts.jsonl"))["prompt"])[: args.prompts]
    flat = [p for p in heldout for _ in range(4)]

    def gold(lm) -> list[float]:
        torch.manual_seed(123)
        lm.eval()
        outs = sample_responses(lm, tokenizer, flat, 48, 1.0)
        lm.train()
        return [judge.score(p, o) for p, o in zip(flat, outs)]

    base = gold(reference)
    result = {
        "name": args.name,
        "value_head": args.value_head,
        "optimizer": args.optimizer,
        "overrides": args.overrides,
        "champion": f"models:/{champion.model_name}/{champion.version}",
        "reward_run": args.reward_run,
        "commit": git_commit(),
        "champion_gold": sum(base) / len(base),
        "evals": [],
    }
    t0 = time.monotonic()
    for step in range(1, args.steps + 1):
        metrics = trainer.step().metrics
        if step % args.every == 0:
            g = gold(policy.lm)
            win = sum((a > b) + 0.5 * (a == b) for a, b in zip(g, base)) / len(g)
            row = {
                "step": step,
                "gold": sum(g) / len(g),
                "win_vs_champion": win,
                "kl": metrics["objective/kl"],
                "score": metrics["objective/scores"],
                "entropy": metrics["objective/entropy"],
            }
            result["evals"].append(row)
            print(args.name, row, f"{time.monotonic() - t0:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "feedback-continuation.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
