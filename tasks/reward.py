"""Reward-model training on preference pairs: TRL's RewardTrainer (Bradley-Terry loss).

The reward model starts from the SFT trunk with a fresh scalar head. Its accuracy
is measured on held-out pairs ordered by the gold judge (``reward/accuracy``), not
on the noisy training labels.

With ``distributed.num_processes > 1`` the training runs in that many processes
(tasks/launch.py), each on an equal share of every batch; only rank 0 logs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from datasets import Dataset
from prefect import task
from transformers.trainer_callback import ProgressCallback
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from models.loading import load_reward_model, load_tokenizer
from models.lora import lora_config
from models.reward import score_texts
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.infra.distributed import device
from rlhf.infra.hf_logging import MlflowStepLogger
from rlhf.infra.progress import TrainerProgress
from rlhf.infra.tracking import download, flatten, log_checkpoint, stage_run
from tasks.caching import cached_stage
from tasks.common import REWARD, Checkpoint, save_trained, trl_training_args
from tasks.launch import launch_stage


def run_reward(
    cfg: PipelineConfig, sft: Checkpoint, preferences_path: str, heldout_path: str, parent_run_id: str
) -> Checkpoint:
    """Train the reward model from the SFT checkpoint; log it and its held-out accuracy."""
    inputs = {"preferences": preferences_path, "preferences_heldout": heldout_path}
    with stage_run(
        parent_run_id, REWARD, flatten({"reward": cfg.reward.model_dump()}), inputs, system_metrics=True
    ) as run:
        mlflow.log_param("sft_run_id", sft.run_id)
        args = {"sft_uri": sft.uri, "preferences_path": preferences_path, "heldout_path": heldout_path}
        if cfg.distributed.num_processes > 1:
            uri = launch_stage(REWARD, cfg, run.info.run_id, args)
        else:
            uri = train_reward(cfg, **args)
        return Checkpoint(run.info.run_id, uri)


def train_reward(cfg: PipelineConfig, sft_uri: str, preferences_path: str, heldout_path: str) -> str | None:
    """Train in this process, one of several under a launcher; rank 0 logs into the active MLflow run.

    Each process takes an equal share of every global batch of ``reward.batch_size`` pairs.
    Returns the logged checkpoint's URI on rank 0, None on the others.
    """
    trust = cfg.model.trust_remote_code
    with tempfile.TemporaryDirectory(prefix="rlhf-reward-sft-") as scratch:  # the model is read into memory
        sft_dir = str(download(sft_uri, scratch))
        tokenizer = load_tokenizer(sft_dir, trust)
        # The new score head's initialisation belongs to the seeded run, not to whatever this process ran before
        # (a fresh or a cached SFT stage, a launched process's random start).
        torch.manual_seed(cfg.seed)
        model = load_reward_model(sft_dir, tokenizer.pad_token_id, trust_remote_code=trust)
    with tempfile.TemporaryDirectory(prefix="rlhf-reward-") as tmp:
        logger = MlflowStepLogger("reward", rename={"accuracy": "train_accuracy", "margin": "train_margin"})
        trainer = reward_trainer(cfg, model, tokenizer, preferences_path, tmp, [logger, TrainerProgress("reward")])
        trainer.train()
        out = Path(tmp) / "checkpoint"
        if not save_trained(trainer, tokenizer, cfg.model.lora_r, out):
            return None
        # The held-out accuracy of exactly what is logged (merged adapters, gathered shards).
        logged = load_reward_model(str(out), tokenizer.pad_token_id, trust_remote_code=trust).to(device())
        pairs = heldout_pairs(heldout_path, cfg.reward.max_heldout_pairs, cfg.seed)
        accuracy, margin = heldout_accuracy(logged, tokenizer, pairs)
        return log_checkpoint(out, "checkpoint", {"reward/accuracy": accuracy, "reward/heldout_margin": margin})


def reward_trainer(
    cfg: PipelineConfig, model, tokenizer, preferences_path: str, output_dir: str, callbacks: list
) -> RewardTrainer:
    """TRL's RewardTrainer as the stage configures it (progress bar replaced by ``callbacks``)."""
    # Kept columns: the length-grouped sampler reads `length` (added below), the collator only its own.
    args = TRLRewardConfig(**trl_training_args(cfg.reward, cfg.seed, output_dir), remove_unused_columns=False)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=load_split(preferences_path),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=lora_config(
            cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.model.lora_target_modules, "seq_cls"
        ),
    )
    trainer.remove_callback(ProgressCallback)
    if cfg.reward.group_by_length:  # a pair's cost is its longer sequence (chosen and rejected share a batch)
        trainer.train_dataset = trainer.train_dataset.map(
            lambda row: {"length": max(len(row["chosen_ids"]), len(row["rejected_ids"]))}
        )
    return trainer


def heldout_pairs(heldout_path: str, max_pairs: int | None, seed: int) -> Dataset:
    """The held-out pairs to measure on: all of them, or ``max_pairs`` drawn with ``seed``."""
    pairs = load_split(heldout_path)
    if max_pairs is None or max_pairs >= len(pairs):
        return pairs
    return pairs.shuffle(seed=seed).select(range(max_pairs))


def heldout_accuracy(model, tokenizer, pairs: Dataset) -> tuple[float, float]:
    """(accuracy, mean margin) of r(chosen) > r(rejected) on held-out pairs."""
    chosen = score_texts(model, tokenizer, pairs["prompt"], pairs["chosen"])
    rejected = score_texts(model, tokenizer, pairs["prompt"], pairs["rejected"])
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


@task(**cached_stage(REWARD))
def reward_task(
    cfg: PipelineConfig, sft: Checkpoint, preferences_path: str, heldout_path: str, parent_run_id: str
) -> Checkpoint:
    """Reward-model training."""
    return run_reward(cfg, sft, preferences_path, heldout_path, parent_run_id)
