"""Supervised fine-tuning on demonstrations, with TRL's SFTTrainer (loss on completions only)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from models.loading import load_causal_lm, load_tokenizer
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.hf_logging import MlflowStepLogger
from rlhf.progress import TrainerProgress
from rlhf.tracking import flatten, log_checkpoint, stage_run
from tasks.common import Checkpoint, trainer_precision_args


def run_sft(cfg: PipelineConfig, base_model: str, sft_path: str, parent_run_id: str) -> Checkpoint:
    """Fine-tune the base model on (prompt, completion) rows; log the checkpoint."""
    with stage_run(parent_run_id, "sft", flatten({"sft": cfg.sft.model_dump()})) as run:
        mlflow.log_param("base_model", base_model)
        tokenizer = load_tokenizer(base_model, cfg.model.trust_remote_code)
        model = load_causal_lm(base_model, trust_remote_code=cfg.model.trust_remote_code)
        dataset = load_split(sft_path)
        with tempfile.TemporaryDirectory(prefix="rlhf-sft-") as tmp:
            args = TRLSFTConfig(
                output_dir=tmp,
                max_steps=cfg.sft.max_steps,
                per_device_train_batch_size=cfg.sft.batch_size,
                learning_rate=cfg.sft.learning_rate,
                lr_scheduler_type="linear",
                warmup_steps=max(1, cfg.sft.max_steps // 20),
                max_length=cfg.sft.max_length,
                completion_only_loss=True,
                logging_steps=max(1, cfg.sft.max_steps // 30),
                save_strategy="no",
                report_to="none",
                disable_tqdm=False,
                seed=cfg.seed,
                data_seed=cfg.seed,
                dataloader_num_workers=0,
                **trainer_precision_args(),
            )
            logger = MlflowStepLogger("sft")
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                callbacks=[logger, TrainerProgress("sft")],
            )
            trainer.remove_callback(ProgressCallback)  # TrainerProgress replaces its bar and log prints
            trainer.train()
            out = Path(tmp) / "checkpoint"
            trainer.save_model(str(out))
            tokenizer.save_pretrained(out)
            uri = log_checkpoint(out, "checkpoint")
        losses = [h["sft/loss"] for h in logger.history if "sft/loss" in h]
        if losses:
            mlflow.log_metric("sft/final_loss", losses[-1])
        return Checkpoint(run.info.run_id, uri)


@task(name="sft", cache_policy=NO_CACHE)
def sft_task(cfg: PipelineConfig, base_model: str, sft_path: str, parent_run_id: str) -> Checkpoint:
    """Supervised fine-tuning."""
    return run_sft(cfg, base_model, sft_path, parent_run_id)
