"""Bridge from a Hugging Face Trainer's logs to the active MLflow run."""

from __future__ import annotations

import math

import mlflow
from transformers import TrainerCallback


class MlflowStepLogger(TrainerCallback):
    """Log each numeric Trainer log entry as ``{prefix}/{name}`` at the global step.

    Trainer's own MLflow integration starts runs of its own; this logs into the
    stage's child run instead, under the stage's namespace.
    """

    def __init__(self, prefix: str, rename: dict[str, str] | None = None):
        self.prefix = prefix
        self.rename = rename or {}
        self.history: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return  # several training processes: only rank 0 logs
        metrics = {}
        for key, value in (logs or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value) and not key.startswith("train_"):
                metrics[f"{self.prefix}/{self.rename.get(key, key)}"] = float(value)
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)
            self.history.append(metrics)
