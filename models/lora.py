"""LoRA adapters through peft, as an option of the SFT and reward-model stages (``model.lora_r``).

The trainers get a ``peft.LoraConfig`` (TRL wraps the model); at the end of the stage
the adapters are merged into the base weights, so the checkpoint a stage logs is a
plain Hugging Face model that the next stage, evaluation and serving load as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from peft import LoraConfig, TaskType
from transformers import PreTrainedModel


def lora_config(
    r: int, alpha: int, dropout: float, target_modules: str, task: Literal["causal_lm", "seq_cls"]
) -> LoraConfig | None:
    """The peft LoraConfig (None when ``r`` is 0: train every weight); arguments as in ``model.lora_*``."""
    if r == 0:
        return None
    targets = target_modules.strip()
    modules: str | list[str] = (
        targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
    )
    if not modules:
        raise ValueError("model.lora_target_modules is empty: use 'all-linear' or module names such as 'q_proj,v_proj'")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The model with its LoRA adapters folded into the weights (the model itself if it has none)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_merged(model: PreTrainedModel, out: str | Path) -> None:
    """Save in Hugging Face layout (safetensors), adapters merged."""
    merged(model).save_pretrained(out, safe_serialization=True)
