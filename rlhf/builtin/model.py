"""The embedded default model: a tiny causal LM and tokenizer trained on the built-in corpus.

``resolve_base_model`` turns ``model.base_model`` into a ``from_pretrained``-able name or
path: a Hugging Face name or local path passes through; ``builtin:tiny-gpt2`` and
``builtin:tiny-llama`` are built on first use into a cache folder (models/tiny.py), from
the built-in data set's text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from models.tiny import build_tiny_checkpoint
from rlhf.builtin.dataset import build_builtin_rows

BUILTIN_PREFIX = "builtin:"
BUILTIN_ARCHS: dict[str, Literal["gpt2", "llama"]] = {"builtin:tiny-gpt2": "gpt2", "builtin:tiny-llama": "llama"}


def resolve_base_model(name_or_path: str, cache_dir: str | Path, seed: int = 0) -> str:
    """A from_pretrained-able name or path; builds the embedded default when asked for."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    if name_or_path not in BUILTIN_ARCHS:
        raise ValueError(
            f"unknown built-in model {name_or_path!r}: use one of {sorted(BUILTIN_ARCHS)} "
            "or a Hugging Face model name or local path"
        )
    out = Path(cache_dir) / f"{name_or_path.removeprefix(BUILTIN_PREFIX)}-seed{seed}"
    if not (out / "config.json").exists():
        rows = build_builtin_rows(seed)
        corpus = [r["prompt"] + r["completion"] for r in rows["sft"]]
        corpus += [r["prompt"] + r["chosen"] + r["rejected"] for r in rows["preferences"]]
        build_tiny_checkpoint(out, corpus, arch=BUILTIN_ARCHS[name_or_path], seed=seed)
    return str(out)
