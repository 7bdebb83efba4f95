"""LoRA adapters through peft, as an option of the SFT and reward-model stages (``model.lora_r``).

The trainers get a ``peft.LoraConfig`` (TRL wraps the model); at the end of the stage
the adapters are merged into the base weights, so the checkpoint a stage logs is a
plain Hugging Face model that the next stage, evaluation and serving load as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import PreTrainedModel

from rlhf.config import ModelConfig


def lora_config(cfg: ModelConfig, task: Literal["causal_lm", "seq_cls"]):
    """The peft LoraConfig for ``cfg`` (None when ``lora_r`` is 0: train every weight)."""
    if cfg.lora_r == 0:
        return None
    from peft import LoraConfig, TaskType

    targets = cfg.lora_target_modules.strip()
    modules: str | list[str] = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
    if not modules:
        raise ValueError("model.lora_target_modules is empty: use 'all-linear' or module names such as 'q_proj,v_proj'")
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=modules,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The model with its LoRA adapters folded into the weights (the model itself if it has none)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_merged(model: PreTrainedModel, out: str | Path) -> None:
    """Save in Hugging Face layout (safetensors), adapters merged."""
    merged(model).save_pretrained(out, safe_serialization=True)
