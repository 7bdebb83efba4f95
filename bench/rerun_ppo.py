"""Re-run only PPO and evaluation on the SFT and reward model of a finished pipeline run, and print the alignment bar.

With a ``reward.*`` override the reward model is trained again first (the pipeline's ``run_reward``, on the
run's validated preference data), and PPO and evaluation use the new one.

The seeds-5-10 rows of docs/evaluation.md (round three) were measured this way: one `check-quality` store per seed,
then every PPO variant on the same SFT and reward model, about a minute each instead of a whole `rlhf run`. The
stage functions are the pipeline's own (`run_ppo`, `run_evaluate`); with the store's code and thread count, the
default variant reproduces the pipeline run's evaluation exactly. New runs are logged into the same store.

Usage (from the project root; STORE holds mlflow.db and outputs/, as check-quality leaves them):

    PYTHONPATH=. .venv/bin/python bench/rerun_ppo.py STORE SEED [section.field=value ...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main(store: str, seed: int, overrides: list[str]) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(store).resolve()}/mlflow.db"
    import mlflow

    from rlhf.config import PipelineConfig, resolve_config
    from tasks.common import Checkpoint
    from tasks.evaluate import run_evaluate
    from tasks.ppo import run_ppo
    from tasks.reward import run_reward

    client = mlflow.MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=5000)]
    first_ppo = min((r for r in runs if r.data.tags.get("rlhf.stage") == "ppo"), key=lambda r: r.info.start_time)
    params = first_ppo.data.params
    sft = Checkpoint(params["sft_run_id"], params["sft_uri"])
    reward = Checkpoint(params["reward_run_id"], params["reward_uri"])
    validate = next(r for r in runs if r.data.tags.get("rlhf.stage") == "validate").data.tags
    validated = Path(validate["data.source.prompts"]).parent.parent / "validated"
    reward_run = next(r for r in runs if r.info.run_id == reward.run_id)
    accuracy = reward_run.data.metrics.get("reward/accuracy", -1.0)
    cfg = resolve_config(
        PipelineConfig(), None, [f"seed={seed}", f"output_dir={store}/outputs", "ppo.auto_resume=false", *overrides]
    )
    start = time.time()
    with mlflow.start_run(run_name="rerun-ppo " + " ".join(overrides)) as parent:
        if any(o.startswith("reward.") for o in overrides):
            reward = run_reward(
                cfg,
                sft,
                str(validated / "preferences.jsonl"),
                str(validated / "preferences_heldout.jsonl"),
                parent.info.run_id,
            )
            accuracy = client.get_run(reward.run_id).data.metrics["reward/accuracy"]
        ppo = run_ppo(cfg, sft, reward, str(validated / "prompts.jsonl"), parent.info.run_id)
        metrics = run_evaluate(
            cfg, sft, reward, ppo, str(validated / "heldout_prompts.jsonl"), parent.info.run_id
        ).metrics
    g = metrics.get
    ok = (
        g("eval/win_rate_vs_sft") >= 0.75
        and g("eval/win_rate_vs_sft_low") >= 0.6
        and g("eval/intent_accuracy") >= 0.85
        and g("eval/violation_rate") <= 0.5 * g("eval/sft_violation_rate")
        and g("eval/distinct_2") >= 0.8 * g("eval/sft_distinct_2")
        and g("eval/kl_within_budget") == 1.0
    )
    print(
        f"RESULT seed {seed} {' '.join(overrides) or 'default'}: {'ok' if ok else 'SHORT'} "
        f"win {g('eval/win_rate_vs_sft'):.3f} low {g('eval/win_rate_vs_sft_low'):.3f} "
        f"intent {g('eval/intent_accuracy'):.3f} viol {g('eval/violation_rate'):.3f}/{g('eval/sft_violation_rate'):.3f} "
        f"d2 {g('eval/distinct_2'):.3f}/{g('eval/sft_distinct_2'):.3f} best {g('eval/best_checkpoint_step')} "
        f"rm {accuracy:.3f} ({time.time() - start:.0f}s) ppo_run {ppo.final.run_id}",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
