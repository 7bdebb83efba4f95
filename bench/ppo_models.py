"""The SFT policy and reward model both PPO implementations start from, built once per folder.

    PYTHONPATH=. python bench/ppo_models.py [--work outputs/bench/ppo] [--sft-steps 120] [--reward-steps 160]

Builds them with the project's own stage functions (tasks.sft.run_sft,
tasks.reward.run_reward) on the built-in data, logged to a bench-local MLflow
store, then copies both checkpoints and the prompt files to plain folders:

    <work>/models/sft       causal LM + tokenizer (Hugging Face layout)
    <work>/models/reward    GPT2ForSequenceClassification, num_labels=1 (TRL's reward/value model class)
    <work>/data/*.jsonl     prompts.jsonl (PPO), heldout_prompts.jsonl (evaluation)

Reused when <work>/models/reward/config.json exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from _common import WORK, offline_env


def ensure_models(work: Path, sft_steps: int = 120, reward_steps: int = 160, seed: int = 0) -> dict[str, str]:
    """Paths of the SFT checkpoint, reward checkpoint and prompt files; built if missing."""
    work = work.resolve()
    out = {
        "sft": str(work / "models" / "sft"),
        "reward": str(work / "models" / "reward"),
        "prompts": str(work / "data" / "prompts.jsonl"),
        "heldout_prompts": str(work / "data" / "heldout_prompts.jsonl"),
        "info": str(work / "models" / "info.json"),
    }
    if Path(out["info"]).exists():
        return out
    os.environ.update({k: v for k, v in offline_env().items() if k not in ("PYTHONPATH",)})
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)  # MLflow's local artifact folder is created beside the working folder
    try:
        from rlhf.infra.env import quiet_defaults

        quiet_defaults()
        import mlflow

        from rlhf.builtin.model import resolve_base_model
        from rlhf.builtin.task import resolve_data_paths
        from rlhf.config import load_config
        from rlhf.infra.tracking import download, setup_experiment
        from tasks.reward import run_reward
        from tasks.sft import run_sft

        cfg = load_config(None, [f"sft.max_steps={sft_steps}", f"reward.max_steps={reward_steps}", f"seed={seed}"])
        paths = resolve_data_paths(cfg.data, work, cfg.seed)
        base = resolve_base_model(cfg.model.base_model, work / "base-models", cfg.seed)
        t0 = time.perf_counter()
        with mlflow.start_run(experiment_id=setup_experiment("bench-ppo"), run_name="bench-models") as parent:
            sft = run_sft(cfg, base, paths["sft"], parent.info.run_id)
            reward = run_reward(cfg, sft, paths["preferences"], paths["preferences_heldout"], parent.info.run_id)
            accuracy = mlflow.get_run(reward.run_id).data.metrics.get("reward/accuracy")
        build_s = time.perf_counter() - t0
        for name, ckpt in (("sft", sft), ("reward", reward)):
            if Path(out[name]).exists():
                shutil.rmtree(out[name])
            shutil.copytree(download(ckpt.uri, work / "downloads"), out[name])
        Path(out["info"]).write_text(
            json.dumps(
                {
                    "sft_steps": sft_steps,
                    "reward_steps": reward_steps,
                    "seed": seed,
                    "build_s": build_s,
                    "reward_heldout_accuracy": accuracy,
                    "sft_run_id": sft.run_id,
                    "reward_run_id": reward.run_id,
                },
                indent=2,
            )
        )
    finally:
        os.chdir(cwd)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(WORK / "ppo"))
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--reward-steps", type=int, default=160)
    args = parser.parse_args()
    out = ensure_models(Path(args.work), args.sft_steps, args.reward_steps)
    print(json.dumps(out, indent=2))
    print(Path(out["info"]).read_text())


if __name__ == "__main__":
    main()
