"""Stage 0: the data validation gate. Bad data fails the flow before any training starts.

Every split is loaded in whatever accepted format it comes in (TRL strings,
conversational messages, Human/Assistant transcripts; JSON/JSONL/CSV/Parquet),
converted to TRL's string format, and validated by the GX suite of its data kind
(``rlhf/validation/suite.py``), with pandas row checks for PII, duplicate pairs,
chosen == rejected and train/held-out prompt leakage (``rlhf/validation/checks.py``).
The stage's MLflow run gets the GX result (JSON), Data Docs (HTML), row counts and
the dataset fingerprints; a Prefect table artifact lists the failed checks. Only
when everything passes are the normalised JSONL files written and handed on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import mlflow
import numpy as np
import pandas as pd
from prefect import task

from rlhf.config import PipelineConfig, ValidationConfig
from rlhf.data.formats import DataKind
from rlhf.data.loading import DataError, LoadedData, load_standard
from rlhf.infra.security import mask_value, scan_pii
from rlhf.infra.tracking import flatten, log_dataset_input, stage_run
from rlhf.validation import checks
from rlhf.validation.suite import TEXT_COLUMNS, CheckFailure, data_docs_html, failures, is_text, run_suite
from tasks.caching import cached_stage
from tasks.common import VALIDATE

__all__ = [
    "DataKind",
    "SPLIT_KINDS",
    "ValidatedData",
    "ValidationFailed",
    "ValidationReport",
    "validate_file",
    "run_validation",
    "validate_task",
    "validate_command",
]

SPLIT_KINDS: dict[str, DataKind] = {
    "sft": "sft",
    "preferences": "preference",
    "preferences_heldout": "preference",
    "prompts": "prompt",
    "heldout_prompts": "prompt",
}
TRAIN_SPLITS = ("sft", "preferences", "prompts")
HELDOUT_SPLITS = ("heldout_prompts", "preferences_heldout")
# Key columns of a duplicate row, and the pair compared in either order.
DUPLICATE_KEYS: dict[str, tuple[list[str], tuple[str, str] | None]] = {
    "sft": (["prompt", "completion"], None),
    "preference": (["prompt", "chosen", "rejected"], ("chosen", "rejected")),
}


@dataclass(frozen=True)
class ValidatedData:
    """What the stage hands on: normalised files and their fingerprints."""

    paths: dict[str, str]
    """split -> normalised JSONL (TRL string format, redacted if validation.pii_policy=redact)."""
    fingerprints: dict[str, str]
    """split -> sha256 hex of schema + content of that file."""


class ValidationFailed(Exception):
    """Bad data; one message line per failed check, naming split/file, rows and the fix."""

    def __init__(self, lines: list[str]):
        super().__init__("data validation failed:\n" + "\n".join(f"- {line}" for line in lines))
        self.lines = lines


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


def run_validation(
    cfg: PipelineConfig, paths: dict[str, str], out_dir: str, parent_run_id: str, tokenizer: Any = None
) -> ValidatedData:
    """Validate every split, log the evidence to the stage's MLflow run, write the normalised files to out_dir.

    Raises ValidationFailed (after logging) when any file is malformed or any check fails.
    """
    unknown = sorted(set(paths) - set(SPLIT_KINDS))
    if unknown:
        raise ValueError(f"unknown data split(s) {unknown}: the pipeline reads {sorted(SPLIT_KINDS)}")
    for split, path in paths.items():
        if (Path(out_dir) / f"{split}.jsonl").resolve() == Path(path).resolve():
            raise ValueError(f"out_dir {out_dir!r} holds the input file {path!r}: give validation its own folder")
    vcfg = cfg.validation
    with stage_run(parent_run_id, VALIDATE, flatten({"validation": vcfg.model_dump()})):
        # 1. Load and convert every split; a malformed file is a failure, not a crash.
        errors: list[str] = []
        loaded: dict[str, LoadedData] = {}
        for split, path in paths.items():
            try:
                loaded[split] = load_standard(path, SPLIT_KINDS[split], vcfg.max_row_bytes, vcfg.max_file_bytes)
            except DataError as e:
                errors.append(f"{split}: malformed file: {e}")
        # 2. Held-out prompts, for the leakage check of the training splits.
        index = checks.heldout_index(
            {
                s: (loaded[s].frame["prompt"], loaded[s].source.where)
                for s in HELDOUT_SPLITS
                if s in loaded and "prompt" in loaded[s].frame.columns and is_text(loaded[s].frame["prompt"])
            }
        )
        # 3. Validate each split.
        reports = {
            split: validate_frame(
                data, SPLIT_KINDS[split], vcfg, tokenizer, index if split in TRAIN_SPLITS else None, name=split
            )
            for split, data in loaded.items()
        }
        lines = errors + [m for r in reports.values() for m in r.messages()]
        # 4. Evidence: metrics, fingerprint tags (stage and parent run), GX JSON and Data Docs.
        _log_to_mlflow(reports, errors, parent_run_id, vcfg.pii_policy)
        _publish_prefect_table(reports, errors)
        if lines:
            raise ValidationFailed(lines)
        # 5. Hand on the normalised files.
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        out_paths = {}
        for split, report in reports.items():
            out_paths[split] = str(folder / f"{split}.jsonl")
            Path(out_paths[split]).write_bytes(report.content)
        return ValidatedData(out_paths, {s: r.fingerprint for s, r in reports.items()})


def failure_table(reports: dict[str, ValidationReport], errors: list[str]) -> list[dict[str, Any]]:
    """Rows of the Prefect table artifact: one per failed check (or malformed file)."""
    rows: list[dict[str, Any]] = [
        {
            "split": e.split(":", 1)[0],
            "check": "file",
            "column": "",
            "rows": "",
            "examples": "",
            "problem": e.split(": ", 2)[-1],
            "fix": "",
        }
        for e in errors
    ]
    for split, report in reports.items():
        for f in report.failures:
            rows.append(
                {
                    "split": split,
                    "check": f.check,
                    "column": f.column or "",
                    "rows": f.count,
                    "examples": "; ".join(f.examples),
                    "problem": f.problem,
                    "fix": f.fix,
                }
            )
    return rows


def _log_to_mlflow(
    reports: dict[str, ValidationReport], errors: list[str], parent_run_id: str, pii_policy: str
) -> None:
    client = mlflow.MlflowClient()
    for split, r in reports.items():
        mlflow.log_metric(f"data/{split}_rows", r.rows)
        mlflow.log_metric(f"data/{split}_failed_checks", len(r.failures))
        if pii_policy == "redact":
            mlflow.log_metric(f"data/{split}_pii_redacted", sum(r.redactions.values()))
        tags = {
            f"data.fingerprint.{split}": r.fingerprint,
            f"data.format.{split}": r.format,
            f"data.source.{split}": mask_value(r.path),  # a Hub name or URL may carry a token
        }
        mlflow.set_tags(tags)
        for key, value in tags.items():
            client.set_tag(parent_run_id, key, value)
        log_dataset_input(r.path, split, r.fingerprint)
        mlflow.log_text(r.result_json(), f"validation/{split}.gx_result.json")
        mlflow.log_text(r.data_docs(), f"validation/{split}.data_docs.html")
    summary = [r.summary() for r in reports.values()] + [f"FAIL {e}" for e in errors]
    mlflow.log_text(mask_value("\n".join(summary)) + "\n", "validation/summary.txt")
    mlflow.set_tag("validation.success", str(not errors and all(r.success for r in reports.values())).lower())


def _publish_prefect_table(reports: dict[str, ValidationReport], errors: list[str]) -> None:
    """A table artifact in the Prefect UI (only inside a flow or task run)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_table_artifact

    failed = failure_table(reports, errors)
    if failed:
        create_table_artifact(table=failed, key="validation-failures", description="Failed data validation checks")
    else:
        table = [
            {"split": s, "kind": r.kind, "format": r.format, "rows": r.rows, "fingerprint": r.fingerprint}
            for s, r in reports.items()
        ]
        create_table_artifact(table=table, key="validation-summary", description="Validated data splits")


@task(**cached_stage(VALIDATE))
def validate_task(
    cfg: PipelineConfig, paths: dict[str, str], out_dir: str, parent_run_id: str, tokenizer_path: str | None = None
) -> ValidatedData:
    """Validate every data split; fail the flow on bad data."""
    tokenizer = None
    if tokenizer_path:
        from models.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    return run_validation(cfg, paths, out_dir, parent_run_id, tokenizer)


def validate_command(
    path: str,
    kind: DataKind,
    cfg: ValidationConfig,
    tokenizer_path: str | None = None,
    report_dir: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    trust_remote_code: bool = False,
) -> int:
    """`rlhf validate PATH --kind KIND`: print the report; exit status 0 pass, 1 failed checks, 2 malformed file."""
    tokenizer = None
    if tokenizer_path:
        from models.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    try:
        report = validate_file(path, kind, cfg, tokenizer)
    except DataError as e:
        print(f"FAIL {e}", file=err)
        return 2
    print(report.summary(), file=out)
    if report_dir:
        folder = Path(report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(path).stem
        (folder / f"{stem}.gx_result.json").write_text(report.result_json(), encoding="utf-8")
        (folder / f"{stem}.data_docs.html").write_text(report.data_docs(), encoding="utf-8")
        print(f"GX result and Data Docs written to {folder}", file=out)
    return 0 if report.success else 1
