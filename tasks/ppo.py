"""PPO stage: optimise the SFT policy against the reward model under a KL penalty.

The loop lives in rlhf/ppo_trainer.py; this stage loads the models, logs every
iteration's metrics to the stage's MLflow run, logs sample tables and full
checkpoints every ``ppo.checkpoint_every`` iterations, and shows progress.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.policy import PolicyWithValueHead
from rlhf.config import PipelineConfig
from rlhf.data.judge import GoldJudge
from rlhf.data.loading import load_split
from rlhf.ppo_trainer import PPOTrainer
from rlhf.tracking import download, flatten, log_checkpoint, stage_run
from tasks.common import Checkpoint


@dataclass(frozen=True)
class PPOResult:
    """The final policy and every logged checkpoint (step -> artifact URI)."""

    final: Checkpoint
    checkpoints: dict[int, str]


def run_ppo(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str,
    gold_judge: bool = True,
) -> PPOResult:
    """Run cfg.ppo.steps PPO iterations from the SFT policy; log metrics and checkpoints."""
    with stage_run(parent_run_id, "ppo", flatten({"ppo": cfg.ppo.model_dump()})) as run:
        mlflow.log_params({"sft_run_id": sft.run_id, "reward_run_id": reward.run_id})
        sft_dir, rm_dir = str(download(sft.uri)), str(download(reward.uri))
        tokenizer = load_tokenizer(sft_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        policy = PolicyWithValueHead(load_causal_lm(sft_dir)).to(device)
        ref_model = load_causal_lm(sft_dir).to(device)
        reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id).to(device)
        prompts = list(load_split(prompts_path)["prompt"])
        trainer = PPOTrainer(
            cfg.ppo, policy, ref_model, reward_model, tokenizer, prompts, cfg.seed,
            gold_scorer=GoldJudge().score if gold_judge else None,
        )
        checkpoints: dict[int, str] = {}
        with tempfile.TemporaryDirectory(prefix="rlhf-ppo-") as tmp:
            progress = tqdm(range(cfg.ppo.steps), desc="ppo", unit="step")
            for _ in progress:
                metrics = trainer.step()
                step = trainer.step_count
                mlflow.log_metrics(metrics, step=step)
                progress.set_postfix(
                    kl=f"{metrics['objective/kl']:.2f}", score=f"{metrics['objective/scores']:.2f}",
                    beta=f"{metrics['objective/kl_coef']:.3f}",
                )
                if step % cfg.ppo.sample_every == 0 or step == cfg.ppo.steps:
                    mlflow.log_table(_columns(trainer.last_samples[:8]), artifact_file=f"samples/step_{step:05d}.json")
                if step % cfg.ppo.checkpoint_every == 0 or step == cfg.ppo.steps:
                    local = trainer.save_checkpoint(Path(tmp) / f"step_{step:05d}")
                    checkpoints[step] = log_checkpoint(local, f"checkpoints/step_{step:05d}")
        final_step = max(checkpoints)
        mlflow.set_tag("ppo.final_checkpoint", checkpoints[final_step])
        return PPOResult(Checkpoint(run.info.run_id, checkpoints[final_step]), checkpoints)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


@task(name="ppo", cache_policy=NO_CACHE)
def ppo_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """PPO with a KL penalty to the SFT reference."""
    return run_ppo(cfg, sft, reward, prompts_path, parent_run_id)
