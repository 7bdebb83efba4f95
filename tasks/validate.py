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

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlflow
from prefect import task

from rlhf.config import PipelineConfig, ValidationConfig
from rlhf.data.formats import DataKind
from rlhf.data.loading import DataError, LoadedData, load_standard
from rlhf.infra.security import mask_value
from rlhf.infra.tracking import flatten, log_dataset_input, stage_run
from rlhf.validation import checks
from rlhf.validation.report import ValidationReport, validate_file, validate_frame
from rlhf.validation.suite import is_text
from tasks.caching import cached_stage
from tasks.common import VALIDATE

__all__ = [
    "DataKind",
    "SPLIT_KINDS",
    "ValidatedData",
    "ValidationFailed",
    "ValidationReport",
    "validate_file",
    "validate_frame",
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
