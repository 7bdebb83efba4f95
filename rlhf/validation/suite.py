"""The GX 1.x expectation suite of each data kind, run on a pandas frame.

The frame holds the kind's standard columns, ``_row`` (1-based row number, used
to name failing rows) and the pandas check columns of ``checks.py``
(``check_*`` is null where a row is fine, ``tokens_*`` are token counts). Every
expectation carries ``meta.check``, the check's name, which maps it to the
problem/fix wording of ``CHECKS``. GX is imported inside functions: it takes
seconds to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rlhf.config import ValidationConfig
from rlhf.data.formats import REQUIRED_COLUMNS, DataKind
from rlhf.validation.checks import BLANK_REGEX

# Columns whose text is checked for blanks, length, tokens and PII; the others only exist, have a type, aren't null.
TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "traffic": ("prompt", "response"),
}
LABEL_COLUMNS: dict[str, tuple[str, ...]] = {"traffic": ("model_version",)}

# check -> (what is wrong, with {column}/{count}/{total}; how to fix it). docs/validation.md lists the same.
CHECKS: dict[str, tuple[str, str]] = {
    "columns": (
        "required column {column!r} is missing (the file has: {have})",
        "add it; {kind} data needs {required}, or use one of the formats in docs/validation.md",
    ),
    "type": (
        "column {column!r} is not text ({observed})",
        "store it as a string in every row (quote numbers, flatten lists)",
    ),
    "nulls": ("{column!r} is null or missing in {count} of {total} rows", "fill in those values or drop the rows"),
    "blank": (
        "{column!r} is empty, whitespace-only or only invisible (zero-width) characters in {count} of {total} rows",
        "drop those rows or fill in the text",
    ),
    "control": (
        "{column!r} contains control or bidirectional-override characters in {count} of {total} rows "
        "(they hide or reorder text as displayed)",
        "remove them, e.g. `re.sub(r'[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069]', '', text)`, "
        "or drop those rows",
    ),
    "chars": (
        "{column!r} is outside {low}..{high} characters in {count} of {total} rows",
        "drop or shorten those rows, or change validation.min_chars / validation.max_chars",
    ),
    "tokens": (
        "{column!r} is over {high} tokens of the model's tokenizer in {count} of {total} rows",
        "drop or shorten those rows, or raise validation.max_tokens",
    ),
    "pii": (
        "{column!r} contains personal data (e-mail, phone, card, SSN or IBAN numbers) in {count} of {total} rows",
        "remove it from the data, or set validation.pii_policy=redact to replace it with [EMAIL]/[PHONE]/[CARD]/...",
    ),
    "chosen_differs": (
        "chosen and rejected are the same text in {count} of {total} rows (no preference to learn)",
        "drop those pairs",
    ),
    "duplicates": (
        "{count} of {total} rows repeat an earlier row (for pairs: same prompt and responses, in either order), "
        "over the allowed {allowed:.1%}",
        "remove the duplicate rows (`df.drop_duplicates()`), or raise validation.max_duplicate_fraction",
    ),
    "leakage": (
        "{count} of {total} prompts also occur in a held-out split, over the allowed {allowed:.1%}",
        "remove those prompts from the training split (held-out prompts must never be trained on), "
        "or raise validation.max_leaked_fraction",
    ),
    "timestamp": (
        "{column!r} is not an ISO 8601 time (or positive epoch seconds) in {count} of {total} rows",
        "write times like 2024-05-01T12:30:00Z",
    ),
    "rows": (
        "has {observed} rows, outside validation.min_rows..max_rows = {low}..{high}",
        "supply more data (or fewer rows), or change validation.min_rows / validation.max_rows",
    ),
}


@dataclass(frozen=True)
class CheckFailure:
    """One failed check of one file: what, where (example rows) and the fix."""

    check: str
    column: str | None
    problem: str
    examples: tuple[str, ...]
    fix: str
    count: int

    def text(self) -> str:
        """'<check>: <problem> (e.g. line 4: ...). Fix: <fix>'."""
        eg = f" (e.g. {'; '.join(self.examples)})" if self.examples else ""
        return f"{self.check}: {self.problem}{eg}. Fix: {self.fix}"

    def message(self, name: str) -> str:
        """One line naming the file or split: '<name>: <check>: <problem> ... Fix: <fix>'."""
        return f"{name}: {self.text()}"


def build_suite(kind: DataKind, frame: pd.DataFrame, cfg: ValidationConfig) -> Any:
    """The kind's gx.ExpectationSuite for this frame (expectations on missing columns are left out)."""
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name=f"rlhf-{kind}")

    def add(expectation_cls: Any, check: str, description: str, column: str | None = None, **kwargs: Any) -> None:
        if column is not None:
            kwargs["column"] = column
        suite.add_expectation(
            expectation_cls(**kwargs, description=description, meta={"check": check, "column": column})
        )

    text_like = {c for c in frame.columns if is_text(frame[c])}
    for column in REQUIRED_COLUMNS[kind]:
        add(E.ExpectColumnToExist, "columns", f"`{column}` is present", column)
        if column not in frame.columns:
            continue
        add(E.ExpectColumnValuesToNotBeNull, "nulls", f"`{column}` is never null", column)
        if column == "timestamp":
            add(E.ExpectColumnValuesToBeNull, "timestamp", "timestamps parse", "check_timestamp")
            continue
        add(E.ExpectColumnValuesToBeOfType, "type", f"`{column}` is text", column, type_="str")
        if column not in text_like:
            continue
        add(
            E.ExpectColumnValuesToNotMatchRegex,
            "blank",
            f"`{column}` is not empty, whitespace-only or invisible",
            column,
            regex=BLANK_REGEX,
        )
        if f"check_control_{column}" in frame.columns:
            add(
                E.ExpectColumnValuesToBeNull,
                "control",
                f"`{column}` has no control or bidi-override characters",
                f"check_control_{column}",
            )
        if column not in TEXT_COLUMNS[kind]:
            continue
        add(
            E.ExpectColumnValueLengthsToBeBetween,
            "chars",
            f"`{column}` has {cfg.min_chars}..{cfg.max_chars} characters",
            column,
            min_value=cfg.min_chars,
            max_value=cfg.max_chars,
        )
        if f"tokens_{column}" in frame.columns:
            add(
                E.ExpectColumnValuesToBeBetween,
                "tokens",
                f"`{column}` has at most {cfg.max_tokens} tokens",
                f"tokens_{column}",
                max_value=cfg.max_tokens,
            )
        if f"check_pii_{column}" in frame.columns:
            add(
                E.ExpectColumnValuesToBeNull,
                "pii",
                f"`{column}` has no e-mail, phone, card, SSN or IBAN numbers",
                f"check_pii_{column}",
            )
    if "check_chosen_is_rejected" in frame.columns:
        add(E.ExpectColumnValuesToBeNull, "chosen_differs", "chosen differs from rejected", "check_chosen_is_rejected")
    if "check_duplicate" in frame.columns:
        add(
            E.ExpectColumnValuesToBeNull,
            "duplicates",
            f"at most {cfg.max_duplicate_fraction:.1%} of rows repeat an earlier row",
            "check_duplicate",
            mostly=1.0 - cfg.max_duplicate_fraction,
        )
    if "check_leakage" in frame.columns:
        add(
            E.ExpectColumnValuesToBeNull,
            "leakage",
            f"at most {cfg.max_leaked_fraction:.1%} of prompts occur in a held-out split",
            "check_leakage",
            mostly=1.0 - cfg.max_leaked_fraction,
        )
    add(
        E.ExpectTableRowCountToBeBetween,
        "rows",
        f"{cfg.min_rows}..{cfg.max_rows} rows",
        min_value=cfg.min_rows,
        max_value=cfg.max_rows,
    )
    return suite


def run_suite(kind: DataKind, frame: pd.DataFrame, cfg: ValidationConfig) -> Any:
    """Validate the frame with the kind's suite in an ephemeral GX context; returns the GX result."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch_definition = (
        context.data_sources.add_pandas("rlhf")
        .add_dataframe_asset(kind)
        .add_batch_definition_whole_dataframe("all-rows")
    )
    suite = context.suites.add(build_suite(kind, frame, cfg))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(
        suite,
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": ["_row"],
            "partial_unexpected_count": cfg.max_examples,
        },
    )


def failures(
    result: Any, kind: DataKind, cfg: ValidationConfig, where: Callable[[int], str], file_columns: dict[str, str]
) -> list[CheckFailure]:
    """The failed expectations of a GX result in words, with example rows."""
    out = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        check, column = config.meta["check"], config.meta["column"]
        info = r.result or {}
        kwargs = config.kwargs
        shown = {
            "pii": (column or "").removeprefix("check_pii_"),
            "control": (column or "").removeprefix("check_control_"),
            "tokens": (column or "").removeprefix("tokens_"),
            "timestamp": "timestamp",
            "leakage": "prompt",
            "chosen_differs": None,
            "duplicates": None,
        }.get(check, column)
        fields = {
            "column": shown,
            "count": info.get("unexpected_count", 0),
            "total": info.get("element_count", 0),
            "observed": info.get("observed_value"),
            "low": kwargs.get("min_value"),
            "high": kwargs.get("max_value"),
            "have": ", ".join(file_columns) or "no columns",
            "kind": kind,
            "required": ", ".join(REQUIRED_COLUMNS[kind]),
            "allowed": {"duplicates": cfg.max_duplicate_fraction, "leakage": cfg.max_leaked_fraction}.get(check, 0.0),
        }
        if check == "tokens":
            fields["high"] = cfg.max_tokens
        if check == "type" and info.get("observed_value") is not None:
            fields["observed"] = f"its type is {info['observed_value']}"
        elif check == "type":
            fields["observed"] = f"{fields['count']} of {fields['total']} values are of another type"
        problem, fix = (template.format(**fields) for template in CHECKS[check])
        error = _exception_message(r.exception_info)
        if error is not None:
            problem = f"the check could not run ({error})"
        examples = tuple(_example(check, d, column, where) for d in info.get("partial_unexpected_index_list") or [])
        out.append(CheckFailure(check, shown, problem, examples[: cfg.max_examples], fix, int(fields["count"] or 0)))
    return out


def _exception_message(info: dict | None) -> str | None:
    """GX's exception info is flat for one metric, keyed by metric for several."""
    if not info:
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info["raised_exception"] else None
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _example(check: str, item: dict, column: str | None, where: Callable[[int], str]) -> str:
    row = where(int(item["_row"]))
    value = item.get(column) if column else None
    if check == "chars":
        return f"{row}: {len(value)} chars" if isinstance(value, str) else row
    if check == "tokens":
        return f"{row}: {int(value)} tokens"
    if check == "pii":  # never quote the personal data itself
        return f"{row}: {value}"
    if check in ("duplicates", "leakage"):  # "line 2 repeats line 1", "line 9 also in heldout_prompts line 3"
        return f"{row} {value}"
    if check in ("chosen_differs", "timestamp", "control"):
        return f"{row}: {value}"
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return row
    text = str(value)
    return f"{row}: {text[:60]!r}{'...' if len(text) > 60 else ''}"


def is_text(values: pd.Series) -> bool:
    """A column holding only strings (or nulls): the text checks run on these."""
    return pd.api.types.is_string_dtype(values) or bool(values.dropna().map(lambda v: isinstance(v, str)).all())


def data_docs_html(result: Any) -> str:
    """GX Data Docs page (HTML) of one validation result."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
