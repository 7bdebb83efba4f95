"""LoRA adapters through peft, as an option of the SFT, reward-model and PPO stages (``model.lora_r``).

SFT and the reward model: the trainers get a ``peft.LoraConfig`` (TRL wraps the model); at the
end of the stage the adapters are merged into the base weights. PPO wraps the policy itself
(``add_adapters``); its checkpoints hold a merged copy and, for resuming, the adapters alone
(``save_adapters``, ``load_adapters``). Either way the checkpoint a stage logs is a plain Hugging
Face model that the next stage, evaluation and serving load as before, without peft.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
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


def add_adapters(model: PreTrainedModel, config: LoraConfig | None) -> PreTrainedModel:
    """The model with trainable LoRA adapters and every base weight frozen (the model itself when config is None)."""
    return model if config is None else get_peft_model(model, config)


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether the model is wrapped with peft adapters."""
    return isinstance(model, PeftModel)


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The model with its LoRA adapters folded into the weights (the model itself if it has none)."""
    return model.merge_and_unload() if has_adapters(model) else model


def save_merged(model: PreTrainedModel, out: str | Path, keep_adapters: bool = False) -> None:
    """Save in Hugging Face layout (safetensors), adapters merged.

    ``keep_adapters``: merge a copy and leave the model's adapters in place to train on (a copy of
    the weights while saving; merging in place and unmerging after would not give the base back bit for bit).
    """
    if keep_adapters and has_adapters(model):
        model = copy.deepcopy(model)
    merged(model).save_pretrained(out, safe_serialization=True)


def save_adapters(model: PeftModel, out: str | Path) -> None:
    """The adapters alone, in peft's layout (adapter_config.json, adapter_model.safetensors).

    Never the base's embedding layers: the base is the SFT checkpoint, which a resume loads first.
    """
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)


def load_adapters(model: PeftModel, folder: str | Path) -> None:
    """Load adapters written by ``save_adapters`` into a model wrapped with the same LoRA settings."""
    saved = LoraConfig.from_pretrained(str(folder))
    current = model.peft_config["default"]
    if (saved.r, saved.lora_alpha, set(saved.target_modules)) != (
        current.r,
        current.lora_alpha,
        set(current.target_modules),
    ):
        raise ValueError(
            f"the adapters in {folder} have r={saved.r}, alpha={saved.lora_alpha} on {sorted(saved.target_modules)}, "
            f"this run r={current.r}, alpha={current.lora_alpha} on {sorted(current.target_modules)}: set "
            f"model.lora_r={saved.r} and model.lora_alpha={saved.lora_alpha}, and the same model.lora_target_modules"
        )
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, load_peft_weights(str(folder), device=str(device)))
