"""Supervised fine-tuning on demonstrations, with TRL's SFTTrainer (loss on completions only).

``run_sft`` opens the stage's MLflow run and trains here, or, with
``distributed.num_processes > 1``, in that many processes (tasks/launch.py) that each run
``train_sft`` on an equal share of every batch; only rank 0 logs and writes the checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from prefect import task
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from models.loading import load_causal_lm, load_tokenizer
from models.lora import lora_config
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.infra.hf_logging import MlflowStepLogger
from rlhf.infra.progress import TrainerProgress
from rlhf.infra.tracking import flatten, log_checkpoint, stage_run
from tasks.caching import cached_stage
from tasks.common import SFT, Checkpoint, save_trained, trl_training_args
from tasks.launch import launch_stage


def run_sft(cfg: PipelineConfig, base_model: str, sft_path: str, parent_run_id: str) -> Checkpoint:
    """Fine-tune the base model on (prompt, completion) rows; log the checkpoint."""
    with stage_run(
        parent_run_id, SFT, flatten({"sft": cfg.sft.model_dump()}), {"sft": sft_path}, system_metrics=True
    ) as run:
        mlflow.log_param("base_model", base_model)
        args = {"base_model": base_model, "sft_path": sft_path}
        if cfg.distributed.num_processes > 1:
            uri = launch_stage(SFT, cfg, run.info.run_id, args)
        else:
            uri = train_sft(cfg, **args)
        return Checkpoint(run.info.run_id, uri)


def train_sft(cfg: PipelineConfig, base_model: str, sft_path: str) -> str | None:
    """Train in this process, one of several under a launcher; rank 0 logs into the active MLflow run.

    Each process takes an equal share of every global batch of ``sft.batch_size``. Returns
    the logged checkpoint's URI on rank 0, None on the others.
    """
    tokenizer = load_tokenizer(base_model, cfg.model.trust_remote_code)
    model = load_causal_lm(base_model, trust_remote_code=cfg.model.trust_remote_code)
    dataset = load_split(sft_path)
    with tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp:
        logger = MlflowStepLogger("sft")
        trainer = sft_trainer(cfg, model, tokenizer, dataset, tmp, [logger, TrainerProgress("sft")])
        trainer.train()
        out = Path(tmp) / "checkpoint"
        if not save_trained(trainer, tokenizer, cfg.model.lora_r, out):
            return None
        losses = [h["sft/loss"] for h in logger.history if "sft/loss" in h]
        return log_checkpoint(out, "checkpoint", {"sft/final_loss": losses[-1]} if losses else None)


def sft_trainer(cfg: PipelineConfig, model, tokenizer, dataset, output_dir: str, callbacks: list) -> SFTTrainer:
    """TRL's SFTTrainer as the stage configures it (loss on completions only; progress bar replaced by ``callbacks``)."""
    args = TRLSFTConfig(completion_only_loss=True, **trl_training_args(cfg.sft, cfg.seed, output_dir))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=lora_config(
            cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.model.lora_target_modules, "causal_lm"
        ),
    )
    trainer.remove_callback(ProgressCallback)  # TrainerProgress replaces its bar and log prints
    return trainer


@task(**cached_stage(SFT))
def sft_task(cfg: PipelineConfig, base_model: str, sft_path: str, parent_run_id: str) -> Checkpoint:
    """Supervised fine-tuning."""
    return run_sft(cfg, base_model, sft_path, parent_run_id)
