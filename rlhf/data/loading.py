"""Resolve and load the pipeline's data files through Hugging Face `datasets`.

A split is a local JSON/JSONL/CSV/Parquet file or a Hub dataset name (where the
user's machine reaches the Hub). ``resolve_data_paths`` writes the built-in data
set when the config asks for it.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from rlhf.config import DataConfig
from rlhf.data.builtin import FILES, write_builtin_dataset

SPLITS = tuple(FILES)
EXTENSION_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Data the user must fix; the message names the file and the fix."""


def resolve_data_paths(cfg: DataConfig, out_dir: str | Path, seed: int) -> dict[str, str]:
    """Split name -> file path (or Hub name) for every split the pipeline reads."""
    if cfg.source == "builtin":
        paths = {k: str(v) for k, v in write_builtin_dataset(Path(out_dir) / "data", seed).items()}
    else:
        root = Path(cfg.source)
        if not root.is_dir():
            raise DataError(
                f"data.source {cfg.source!r} is not a folder: use 'builtin' or a folder holding "
                f"{', '.join(FILES.values())} (or set data.<split>_path for each file)"
            )
        paths = {k: str(root / name) for k, name in FILES.items()}
    for split in SPLITS:
        override = getattr(cfg, f"{split}_path")
        if override:
            paths[split] = override
    for split, path in paths.items():
        if not Path(path).exists() and ("/" not in path or Path(path).suffix):
            raise DataError(
                f"{split} data {path!r} does not exist: fix the path in data.source or data.{split}_path"
            )
    return paths


def load_split(path: str) -> datasets.Dataset:
    """One split as a `datasets.Dataset` (local file by extension, else a Hub dataset's train split)."""
    suffix = Path(path).suffix.lower()
    if Path(path).exists():
        builder = EXTENSION_BUILDERS.get(suffix)
        if builder is None:
            raise DataError(
                f"{path!r}: unsupported file type {suffix!r}; use one of {sorted(EXTENSION_BUILDERS)}"
            )
        return datasets.load_dataset(builder, data_files=path, split="train")
    return datasets.load_dataset(path, split="train")
