"""Reward-model training on preference pairs: TRL's RewardTrainer (Bradley-Terry loss).

The reward model starts from the SFT trunk with a fresh scalar head. Its accuracy
is measured on held-out pairs ordered by the gold judge (``reward/accuracy``), not
on the noisy training labels.

With ``distributed.num_processes > 1`` the training runs in that many processes
(rlhf/launch.py), each on an equal share of every batch; only rank 0 logs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from prefect import task
from transformers.trainer_callback import ProgressCallback
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from models.loading import load_reward_model, load_tokenizer
from models.lora import lora_config, save_merged
from models.reward import score_texts
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.distributed import device, is_distributed, is_main_process, world_size
from rlhf.hf_logging import MlflowStepLogger
from rlhf.launch import launch_stage
from rlhf.progress import TrainerProgress
from rlhf.tracking import download, flatten, log_checkpoint, stage_run
from tasks.caching import RETRY_DELAYS_S, retry_on_tracking_error, stage_cache
from tasks.common import Checkpoint, trainer_precision_args


def run_reward(
    cfg: PipelineConfig, sft: Checkpoint, preferences_path: str, heldout_path: str, parent_run_id: str
) -> Checkpoint:
    """Train the reward model from the SFT checkpoint; log it and its held-out accuracy."""
    with stage_run(parent_run_id, "reward", flatten({"reward": cfg.reward.model_dump()})) as run:
        mlflow.log_param("sft_run_id", sft.run_id)
        args = {"sft_uri": sft.uri, "preferences_path": preferences_path, "heldout_path": heldout_path}
        if cfg.distributed.num_processes > 1:
            uri = launch_stage("reward", cfg, run.info.run_id, args)
        else:
            uri = train_reward(cfg, **args)
        return Checkpoint(run.info.run_id, uri)


def train_reward(cfg: PipelineConfig, sft_uri: str, preferences_path: str, heldout_path: str) -> str | None:
    """Train in this process, one of several under a launcher; rank 0 logs into the active MLflow run.

    Each process takes an equal share of every global batch of ``reward.batch_size`` pairs.
    Returns the logged checkpoint's URI on rank 0, None on the others.
    """
    sft_dir = str(download(sft_uri))
    tokenizer = load_tokenizer(sft_dir)
    if is_distributed():  # a launched process starts with a random RNG: seed the new score head's init
        torch.manual_seed(cfg.seed)
    model = load_reward_model(sft_dir, tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory(prefix="rlhf-reward-") as tmp:
        args = TRLRewardConfig(
            output_dir=tmp,
            max_steps=cfg.reward.max_steps,
            per_device_train_batch_size=cfg.reward.batch_size // world_size(),
            learning_rate=cfg.reward.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=max(1, cfg.reward.max_steps // 20),
            max_length=cfg.reward.max_length,
            logging_steps=max(1, cfg.reward.max_steps // 30),
            save_strategy="no",
            report_to="none",
            disable_tqdm=False,
            seed=cfg.seed,
            data_seed=cfg.seed,
            dataloader_num_workers=0,
            **trainer_precision_args(),
        )
        logger = MlflowStepLogger("reward", rename={"accuracy": "train_accuracy", "margin": "train_margin"})
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=load_split(preferences_path),
            processing_class=tokenizer, callbacks=[logger, TrainerProgress("reward")],
            peft_config=lora_config(cfg.model, "seq_cls"),
        )
        trainer.remove_callback(ProgressCallback)  # TrainerProgress replaces its bar and log prints
        trainer.train()
        out = Path(tmp) / "checkpoint"
        if cfg.model.lora_r and is_main_process():
            save_merged(trainer.model, out)
        elif not cfg.model.lora_r:
            trainer.save_model(str(out))  # every process calls it: under FSDP it gathers the full weights
        if not is_main_process():
            return None
        tokenizer.save_pretrained(out)
        # The held-out accuracy of exactly what is logged (merged adapters, gathered shards).
        logged = load_reward_model(str(out), tokenizer.pad_token_id).to(device())
        accuracy, margin = heldout_accuracy(logged, tokenizer, heldout_path)
        mlflow.log_metrics({"reward/accuracy": accuracy, "reward/heldout_margin": margin})
        return log_checkpoint(out, "checkpoint")


def heldout_accuracy(model, tokenizer, heldout_path: str) -> tuple[float, float]:
    """(accuracy, mean margin) of r(chosen) > r(rejected) on held-out pairs."""
    pairs = load_split(heldout_path)
    chosen = score_texts(model, tokenizer, pairs["prompt"], pairs["chosen"])
    rejected = score_texts(model, tokenizer, pairs["prompt"], pairs["rejected"])
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


@task(
    name="reward-model", cache_policy=stage_cache("reward-model"), persist_result=True,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_on_tracking_error,
)
def reward_task(
    cfg: PipelineConfig, sft: Checkpoint, preferences_path: str, heldout_path: str, parent_run_id: str
) -> Checkpoint:
    """Reward-model training."""
    return run_reward(cfg, sft, preferences_path, heldout_path, parent_run_id)
