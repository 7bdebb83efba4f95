"""Supervised fine-tuning on demonstrations, with TRL's SFTTrainer (loss on completions only).

``run_sft`` opens the stage's MLflow run and trains here, or, with
``distributed.num_processes > 1``, in that many processes (rlhf/launch.py) that each run
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
from models.lora import lora_config, save_merged
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.distributed import is_main_process, world_size
from rlhf.hf_logging import MlflowStepLogger
from rlhf.launch import launch_stage
from rlhf.progress import TrainerProgress
from rlhf.tracking import flatten, log_checkpoint, stage_run
from tasks.caching import RETRY_DELAYS_S, retry_on_tracking_error, stage_cache
from tasks.common import Checkpoint, trainer_precision_args


def run_sft(cfg: PipelineConfig, base_model: str, sft_path: str, parent_run_id: str) -> Checkpoint:
    """Fine-tune the base model on (prompt, completion) rows; log the checkpoint."""
    with stage_run(parent_run_id, "sft", flatten({"sft": cfg.sft.model_dump()})) as run:
        mlflow.log_param("base_model", base_model)
        args = {"base_model": base_model, "sft_path": sft_path}
        if cfg.distributed.num_processes > 1:
            uri = launch_stage("sft", cfg, run.info.run_id, args)
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
        args = TRLSFTConfig(
            output_dir=tmp,
            max_steps=cfg.sft.max_steps,
            per_device_train_batch_size=cfg.sft.batch_size // world_size(),
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
            callbacks=[logger, TrainerProgress("sft")], peft_config=lora_config(cfg.model, "causal_lm"),
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
        uri = log_checkpoint(out, "checkpoint")
    losses = [h["sft/loss"] for h in logger.history if "sft/loss" in h]
    if losses:
        mlflow.log_metric("sft/final_loss", losses[-1])
    return uri


@task(
    name="sft", cache_policy=stage_cache("sft"), persist_result=True,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_on_tracking_error,
)
def sft_task(cfg: PipelineConfig, base_model: str, sft_path: str, parent_run_id: str) -> Checkpoint:
    """Supervised fine-tuning."""
    return run_sft(cfg, base_model, sft_path, parent_run_id)
