"""Load tokenizers and models by Hugging Face name or local path.

``builtin:tiny-gpt2`` and ``builtin:tiny-llama`` name the embedded defaults; they
are built on first use into a cache folder and then loaded like any checkpoint.
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

BUILTIN_PREFIX = "builtin:"
BUILTIN_ARCHS = {"builtin:tiny-gpt2": "gpt2", "builtin:tiny-llama": "llama"}


def resolve_base_model(name_or_path: str, cache_dir: str | Path, seed: int = 0) -> str:
    """A from_pretrained-able name or path; builds the embedded default when asked for."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    if name_or_path not in BUILTIN_ARCHS:
        raise ValueError(
            f"unknown built-in model {name_or_path!r}: use one of {sorted(BUILTIN_ARCHS)} "
            "or a Hugging Face model name or local path"
        )
    from models.tiny import build_tiny_checkpoint
    from rlhf.data.builtin import build_builtin_rows

    out = Path(cache_dir) / f"{name_or_path.removeprefix(BUILTIN_PREFIX)}-seed{seed}"
    if not (out / "config.json").exists():
        rows = build_builtin_rows(seed)
        corpus = [r["prompt"] + r["completion"] for r in rows["sft"]]
        corpus += [r["prompt"] + r["chosen"] + r["rejected"] for r in rows["preferences"]]
        build_tiny_checkpoint(out, corpus, arch=BUILTIN_ARCHS[name_or_path], seed=seed)  # type: ignore[arg-type]
    return str(out)


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
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern) if p.name != "training_args.bin")
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
