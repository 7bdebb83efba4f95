"""Checkpoint integrity: a sha256 manifest written with each checkpoint folder, verified on load.

The manifest is ``SHA256SUMS`` in the folder itself, in the format of coreutils'
``sha256sum`` (``<hex>  <relative path>`` per line), so a user can also check a
downloaded checkpoint by hand: ``cd step_00004 && sha256sum -c SHA256SUMS``.
A truncated upload, a disk error or a file edited after the fact changes a hash;
``verify_manifest`` then raises ``CheckpointCorrupted`` naming the file and the fix.
No MLflow or Prefect import here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 20


class CheckpointCorrupted(ValueError):
    """A checkpoint whose files do not match its manifest; the message names the file and the fix."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every regular file under folder except the manifest, sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> Path:
    """Write SHA256SUMS for every file under folder (written last, after everything else)."""
    root = Path(folder)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in _files(root)]
    out = root / MANIFEST
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, out)  # never a half-written manifest
    return out


def read_manifest(folder: str | Path) -> dict[str, str] | None:
    """relative path -> sha256 from the folder's manifest; None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    entries: dict[str, str] = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise CheckpointCorrupted(
                f"checkpoint {folder}: line {n} of its {MANIFEST} is not '<sha256>  <file>' ({line[:80]!r}); the "
                "manifest itself is damaged. Fix: use an earlier checkpoint, or re-run the stage that logged this one"
            )
        entries[name] = digest
    return entries


def verify_manifest(folder: str | Path, required: bool = True) -> bool:
    """Check every file listed in the manifest; True when verified, False when absent and not required.

    Raises CheckpointCorrupted on a missing, truncated or changed file, or a missing
    manifest when ``required``.
    """
    root = Path(folder)
    entries = read_manifest(root)
    if entries is None:
        if required:
            raise CheckpointCorrupted(
                f"checkpoint {folder} has no {MANIFEST}, so its files cannot be checked (an upload cut short, or a "
                "folder not written by this pipeline). Fix: use a checkpoint logged by the pipeline, or an earlier one"
            )
        return False
    if not entries:
        raise CheckpointCorrupted(f"checkpoint {folder}: its {MANIFEST} lists no files. Fix: use an earlier checkpoint")
    for name, expected in entries.items():
        path = root / name
        if not path.is_file():
            raise CheckpointCorrupted(
                f"checkpoint {folder} is incomplete: {name} is listed in {MANIFEST} but missing. Fix: use an "
                "earlier checkpoint (ppo.resume_from=<run id> falls back to the latest good one), or re-run the stage"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointCorrupted(
                f"checkpoint {folder} is corrupted: {name} ({path.stat().st_size} bytes) has sha256 {actual[:16]}..., "
                f"{MANIFEST} records {expected[:16]}...; the file was truncated or changed after it was written. "
                "Fix: use an earlier checkpoint (ppo.resume_from=<run id> falls back to the latest good one), "
                "or re-run the stage that logged it"
            )
    return True


def fingerprint(value: object) -> str:
    """Hex sha256 of a JSON-able value (keys sorted), for cache and resume keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_path(path: str | Path, full_hash_limit: int = 64 * 1024 * 1024) -> str:
    """Content fingerprint of a file or folder.

    Files up to ``full_hash_limit`` bytes are hashed in full; bigger ones (multi-GB
    weights of a Hub model) by size and modification time, which a re-download changes.
    """
    root = Path(path)
    files = [root] if root.is_file() else _files(root)
    parts = []
    for p in files:
        stat = p.stat()
        content = sha256_file(p) if stat.st_size <= full_hash_limit else f"mtime:{stat.st_mtime_ns}"
        parts.append([p.relative_to(root).as_posix() if p != root else "", stat.st_size, content])
    return fingerprint(parts)
