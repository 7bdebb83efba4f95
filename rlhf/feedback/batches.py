"""Feedback batches on disk: the versioned preference data sets that rankings and production thumbs become.

A batch is a folder under the feedback directory (``feedback.dir``), named ``<source>-<UTC time>-v<version>``:

- ``rankings.jsonl``: every ranking as the rater gave it (the page's batches only);
- ``preferences.jsonl``: the pairs in TRL's format (``prompt``, ``chosen``, ``rejected``) with their provenance
  columns (``rlhf.feedback.pairs.PROVENANCE``);
- ``manifest.json``: rows, raters, the data fingerprint, and the validation gate's verdict on the pairs (the same
  GX suite and row checks as the pipeline's validate stage, ``rlhf.validation.report``).

Every save rewrites the pairs and the manifest and marks the batch not validated; ``validate_batch`` runs the gate
and records its verdict, so a manifest never carries a verdict on other content. The feedback flow learns only from
batches whose manifest says they passed (and validates the merged data again).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from rlhf.config import ValidationConfig
from rlhf.feedback.agreement import krippendorff_alpha, pairwise_agreement, ranking_units
from rlhf.feedback.pairs import FeedbackPair, Ranking, deduplicate, ranking_pairs
from rlhf.validation.report import validate_file

RANKINGS_FILE = "rankings.jsonl"
PAIRS_FILE = "preferences.jsonl"
MANIFEST_FILE = "manifest.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def batch_name(source: str, model_version: str, now: datetime) -> str:
    """``<source>-<UTC time>-v<version>``: sortable by time, safe as a folder name and an MLflow tag value."""
    version = "-vs-v".join(v.rsplit("/", 1)[-1] for v in model_version.split(" vs "))  # champion vs challenger
    return _UNSAFE.sub("_", f"{source}-{now:%Y%m%dT%H%M%S%fZ}-v{version}")


@dataclass
class BatchManifest:
    """What a batch holds and whether it passed the validation gate."""

    batch: str
    source: str
    """``ranking`` (the label page) or ``production`` (thumbs in a traffic window)."""
    model_version: str
    created: str
    rankings: int = 0
    all_bad: int = 0
    pairs: int = 0
    duplicates_dropped: int = 0
    """Pairs another rater (or row) of the batch had already given, in either order: kept once, the first."""
    raters: list[str] = field(default_factory=list)
    fingerprint: str = ""
    """The validated pairs' fingerprint (schema + content), as the pipeline's validate stage computes it."""
    validated: bool = False
    failures: list[str] = field(default_factory=list)
    """One line per failed check (empty when it passed)."""
    origin: str = ""
    """Where the batch came from: the page's prompt file, or the traffic window."""


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # readers never see half a file


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_manifest(folder: str | Path) -> BatchManifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_FILE}: it is not a feedback batch (batches are written by `rlhf label` and "
            "`rlhf monitor`); remove it from feedback.dir or from feedback.batches"
        )
    return BatchManifest(**json.loads(path.read_text()))


NOT_VALIDATED = "not validated since the last change: validate the batch (the page's Validate button)"


def write_manifest(folder: str | Path, manifest: BatchManifest) -> BatchManifest:
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def save_pairs(folder: str | Path, manifest: BatchManifest, pairs: Sequence[FeedbackPair]) -> BatchManifest:
    """Write the batch's pairs (repeats of a pair dropped, ``deduplicate``) and its manifest, marked not validated."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows, dropped = deduplicate([p.row() for p in pairs])
    _write_jsonl(out / PAIRS_FILE, rows)
    manifest.pairs, manifest.duplicates_dropped = len(rows), dropped
    manifest.validated, manifest.failures, manifest.fingerprint = False, [NOT_VALIDATED], ""
    return write_manifest(out, manifest)


def validate_batch(folder: str | Path, manifest: BatchManifest, cfg: ValidationConfig) -> BatchManifest:
    """Run the validation gate (GX suite and row checks, as the validate stage) on the batch's pairs; record the
    verdict and the fingerprint in its manifest. Seconds to a minute: GX builds a context per file."""
    out = Path(folder)
    if manifest.pairs == 0:
        manifest.validated, manifest.failures, manifest.fingerprint = False, ["the batch has no pairs yet"], ""
        return write_manifest(out, manifest)
    # A batch is small: the pipeline's row minimum applies to the merged data set, not to one batch.
    report = validate_file(str(out / PAIRS_FILE), "preference", cfg.model_copy(update={"min_rows": 1}))
    manifest.validated, manifest.failures, manifest.fingerprint = report.success, report.messages(), report.fingerprint
    return write_manifest(out, manifest)


def add_ranking(folder: str | Path, manifest: BatchManifest, ranking: Ranking) -> BatchManifest:
    """Append one ranking to the batch and rewrite its pairs (every ranking's); the batch needs validating again."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rankings = read_rankings(out) + [ranking]
    _write_jsonl(out / RANKINGS_FILE, [asdict(r) for r in rankings])
    manifest.rankings = len(rankings)
    manifest.all_bad = sum(r.all_bad for r in rankings)
    manifest.raters = sorted({r.rater for r in rankings})
    return save_pairs(out, manifest, [p for r in rankings for p in ranking_pairs(r)])


def read_rankings(folder: str | Path) -> list[Ranking]:
    rows = read_jsonl(Path(folder) / RANKINGS_FILE)
    return [
        Ranking(
            **{
                **r,
                "responses": tuple(r["responses"]),
                "ranks": tuple(r["ranks"]),
                "response_versions": tuple(r["response_versions"]) if r.get("response_versions") else None,
            }
        )
        for r in rows
    ]


def list_batches(root: str | Path) -> list[Path]:
    """Every batch folder (one holding a manifest) under ``root``, in name (= time) order."""
    base = Path(root)
    return sorted(p.parent for p in base.glob(f"*/{MANIFEST_FILE}")) if base.is_dir() else []


def agreement_metrics(rankings: Sequence[Ranking]) -> dict[str, float]:
    """``feedback/pairwise_agreement``, ``feedback/krippendorff_alpha`` (ordinal, on ranks) and the number of
    comparisons, over prompts that two or more raters ranked; an all-bad ranking counts as all responses tied
    last. A rater's latest ranking of a prompt counts. Empty when no prompt has two raters."""
    by_prompt: dict[str, dict[str, Sequence[int]]] = {}
    for r in rankings:
        k = len(r.ranks)
        by_prompt.setdefault(r.prompt_id, {})[r.rater] = (k,) * k if r.all_bad else r.ranks
    shared = {p: raters for p, raters in by_prompt.items() if len(raters) >= 2}
    share, comparisons = pairwise_agreement(shared)
    if share is None:
        return {}
    metrics = {"feedback/pairwise_agreement": share, "feedback/agreement_comparisons": float(comparisons)}
    alpha = krippendorff_alpha(ranking_units(shared), "ordinal")
    if alpha is not None:
        metrics["feedback/krippendorff_alpha"] = alpha
    return metrics
