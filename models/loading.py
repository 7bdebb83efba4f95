"""Load tokenizers and models by Hugging Face name or local path.

The embedded defaults (``builtin:tiny-gpt2``, ``builtin:tiny-llama``) are built into a
folder by ``rlhf.builtin.model.resolve_base_model`` and then loaded like any checkpoint.
Remote code is never run unless the config asks for it (``trust_remote_code``), and
weights load from safetensors only: a pickled ``pytorch_model.bin`` can run code when
unpickled, so a folder that has only those is refused with the conversion to do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (the EOS token when the checkpoint has none)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(name_or_path: str) -> None:
    """Refuse a local checkpoint folder whose weights exist only in pickle-based formats."""
    folder = Path(name_or_path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(
        p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern) if p.name != "training_args.bin"
    )
    if pickled:
        raise ValueError(
            f"{name_or_path} has weights only as {', '.join(pickled)} (pickle-based, which can run code when loaded); "
            "this pipeline loads safetensors only. Fix: convert it once where you trust the file: "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)`"
        )


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM from a Hugging Face name or a local checkpoint folder (safetensors weights only)."""
    require_safetensors(name_or_path)
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_reward_model(
    name_or_path: str, pad_token_id: int, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A scalar-output sequence classifier (score at the last non-pad token; safetensors weights only)."""
    require_safetensors(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.config.pad_token_id = pad_token_id
    return model
