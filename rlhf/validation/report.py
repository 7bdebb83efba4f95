"""One file's validation: pandas row checks and the kind's GX suite, as a report (no MLflow, no Prefect).

``validate_frame`` is what the pipeline's validate stage (tasks/validate.py) runs on every split, and what the
label page (tasks/label.py) runs on each feedback batch it saves, so both pass the same gate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rlhf.config import ValidationConfig
from rlhf.data.formats import DataKind
from rlhf.data.loading import LoadedData, load_standard
from rlhf.infra.security import scan_pii
from rlhf.validation import checks
from rlhf.validation.suite import TEXT_COLUMNS, CheckFailure, data_docs_html, failures, is_text, run_suite

# Key columns of a duplicate row, and the pair compared in either order.
DUPLICATE_KEYS: dict[str, tuple[list[str], tuple[str, str] | None]] = {
    "sft": (["prompt", "completion"], None),
    "preference": (["prompt", "chosen", "rejected"], ("chosen", "rejected")),
}


@dataclass
class ValidationReport:
    """One file's validation result."""

    success: bool
    path: str
    kind: DataKind
    format: str
    """The layout the file was in: "trl", "conversational", "transcript", ..."""
    rows: int
    fingerprint: str
    failures: list[CheckFailure]
    redactions: dict[str, int]
    """PII kind -> number replaced (pii_policy=redact) or found (pii_policy=fail)."""
    pii_policy: str = "fail"
    name: str | None = None
    """The split name inside a pipeline run; None for a lone file."""
    frame: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    """The normalised rows (standard columns)."""
    content: bytes = field(default=b"", repr=False)
    """``frame`` as the JSONL bytes written for the trainers (and fingerprinted)."""
    gx_result: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.path})" if self.name else self.path

    def messages(self) -> list[str]:
        """One line per failed check."""
        return [f.message(self.label) for f in self.failures]

    def summary(self) -> str:
        """Human-readable lines for the terminal."""
        head = f"{self.label}: {self.kind} data, {self.format} format, {self.rows} rows, fingerprint {self.fingerprint[:12]}"
        lines = [("PASS " if self.success else "FAIL ") + head]
        found = {k: n for k, n in self.redactions.items() if n}
        if found:
            verb = "redacted" if self.pii_policy == "redact" else "found"
            lines.append(f"  PII {verb}: " + ", ".join(f"{n} {k}" for k, n in found.items()))
        for f in self.failures:
            lines.append(f"  - {f.text()}")
        return "\n".join(lines)

    def result_json(self) -> str:
        """The GX validation result as JSON."""
        return json.dumps(self.gx_result.to_json_dict(), indent=2, default=str)

    def data_docs(self) -> str:
        """The GX Data Docs page (HTML) of this result."""
        return data_docs_html(self.gx_result)


def validate_frame(
    data: LoadedData,
    kind: DataKind,
    cfg: ValidationConfig,
    tokenizer: Any = None,
    heldout: dict[str, str] | None = None,
    name: str | None = None,
) -> ValidationReport:
    """Pandas row checks, then the kind's GX suite, on one loaded file."""
    frame = data.frame.copy()
    frame["_row"] = np.arange(1, len(frame) + 1)
    where = data.source.where
    text = [c for c in TEXT_COLUMNS[kind] if c in frame.columns and is_text(frame[c])]

    # 1. Token lengths under the model's tokenizer, of the text as the trainers would see it.
    if tokenizer is not None:
        for column in text:
            frame[f"tokens_{column}"] = checks.token_lengths(frame[column], tokenizer)
    # 2. PII: redacted before any other check or GX sees the text (GX quotes failing values in its result JSON
    # and Data Docs, which are logged); under pii_policy=fail the rows are also flagged for the suite.
    redactions = {k: 0 for k in cfg.pii_kinds}
    for column in text:
        redacted, flags, counts = scan_pii(frame[column], cfg.pii_kinds)
        for k, n in counts.items():
            redactions[k] += n
        frame[column] = redacted
        if cfg.pii_policy == "fail":
            frame[f"check_pii_{column}"] = flags
    # 3. Kind-specific row checks.
    if kind == "preference" and {"chosen", "rejected"} <= set(text):
        frame["check_chosen_is_rejected"] = checks.chosen_is_rejected(frame["chosen"], frame["rejected"])
    if kind in DUPLICATE_KEYS and set(DUPLICATE_KEYS[kind][0]) <= set(text):
        keys, unordered = DUPLICATE_KEYS[kind]
        frame["check_duplicate"] = checks.duplicate_rows(frame, keys, where, unordered)
    if heldout is not None and "prompt" in text:
        frame["check_leakage"] = checks.leaked_prompts(frame["prompt"], heldout)
    for column in text:
        frame[f"check_control_{column}"] = checks.control_characters(frame[column])
    if kind == "traffic" and "timestamp" in frame.columns:
        frame["check_timestamp"] = checks.bad_timestamps(frame["timestamp"])
    # 4. The GX suite over the columns and the check columns.
    result = run_suite(kind, frame, cfg)
    failed = failures(result, kind, cfg, where, data.columns)
    out = frame[list(data.frame.columns)]
    content = checks.jsonl_bytes(out)
    return ValidationReport(
        success=bool(result.success),
        path=data.source.path,
        kind=kind,
        format=data.format,
        rows=len(out),
        fingerprint=checks.fingerprint(kind, out, content),
        failures=failed,
        redactions=redactions,
        pii_policy=cfg.pii_policy,
        name=name,
        frame=out,
        content=content,
        gx_result=result,
    )


def validate_file(path: str, kind: DataKind, cfg: ValidationConfig, tokenizer: Any = None) -> ValidationReport:
    """Validate one file (for `rlhf validate`); raises DataError for a malformed file."""
    return validate_frame(load_standard(path, kind, cfg.max_row_bytes, cfg.max_file_bytes), kind, cfg, tokenizer)
