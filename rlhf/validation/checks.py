"""Row checks computed with pandas, and dataset fingerprints.

Each check returns a column aligned with the data frame: missing (NA) where the
row is fine, else a short description of the problem ("repeats line 12",
"email, phone"). The GX suite (``suite.py``) then expects those columns to be
null, so every check shows up in the GX result and Data Docs with its rows.
No GX, MLflow or Prefect import here.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

# Characters that render as nothing: zero-width spaces/joiners, word joiner, BOM, soft hyphen, Mongolian vowel
# separator. Text made only of these (and whitespace) is blank; they are ignored when texts are compared.
INVISIBLE = "\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff"
BLANK_REGEX = rf"^[\s{INVISIBLE}]*$"
# C0/C1 control characters other than tab and newlines, and the bidirectional embeddings, overrides and isolates
# that reorder how text is displayed ("Trojan Source", CVE-2021-42574).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_INVISIBLE_RE = re.compile(f"[{INVISIBLE}]")


def strip_control_characters(text: str) -> str:
    """``text`` without the control and bidi-override characters ``control_characters`` flags."""
    return _CONTROL.sub("", text)


def control_characters(texts: pd.Series) -> pd.Series:
    """'U+202E at character 7' where a text holds a control or bidi-override character (the first one found)."""
    out = pd.Series(None, index=texts.index, dtype=object)
    for idx, value in texts.items():
        if isinstance(value, str):
            m = _CONTROL.search(value)
            if m:
                out.at[idx] = f"U+{ord(m.group()):04X} at character {m.start() + 1}"
    return out


def comparison_key(text: str) -> str:
    """The text as duplicate and leakage checks compare it: NFKC (full-width and ligature forms folded),
    invisible characters dropped, case-folded, punctuation ignored, whitespace collapsed."""
    text = _INVISIBLE_RE.sub("", unicodedata.normalize("NFKC", text)).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def chosen_is_rejected(chosen: pd.Series, rejected: pd.Series) -> pd.Series:
    """'chosen == rejected' where the two responses are the same text (ignoring outer whitespace)."""
    same = (chosen.str.strip() == rejected.str.strip()).fillna(False).astype(bool)
    return pd.Series(np.where(same, "chosen == rejected", None), index=chosen.index, dtype=object)


def duplicate_rows(
    frame: pd.DataFrame, columns: list[str], where: Callable[[int], str], unordered: tuple[str, str] | None = None
) -> pd.Series:
    """'repeats line N' for each row whose key columns repeat an earlier row's (compared by ``comparison_key``).

    ``unordered`` names two columns compared as a set: a preference pair with
    chosen and rejected swapped repeats (and contradicts) the earlier one.
    """
    keys = pd.DataFrame({c: frame[c].fillna("").astype(str).map(comparison_key) for c in columns})
    if unordered is not None:
        a, b = keys[unordered[0]], keys[unordered[1]]
        keys[unordered[0]], keys[unordered[1]] = a.where(a <= b, b), b.where(a <= b, a)
    repeated = keys.duplicated(keep="first").to_numpy()
    out = pd.Series(None, index=frame.index, dtype=object)
    if repeated.any():
        first = frame["_row"].groupby([keys[c] for c in columns], sort=False).transform("first")
        for idx in frame.index[repeated]:
            out.at[idx] = f"repeats {where(int(first.at[idx]))}"
    return out


def normalize_prompt(prompts: pd.Series) -> pd.Series:
    """Prompt text by ``comparison_key``: the key for train/held-out leakage."""
    return prompts.fillna("").astype(str).map(comparison_key)


def heldout_index(heldout: Mapping[str, tuple[pd.Series, Callable[[int], str]]]) -> dict[str, str]:
    """Normalised held-out prompt -> where it first occurs ("heldout_prompts line 4")."""
    index: dict[str, str] = {}
    for split, (prompts, where) in heldout.items():
        for i, key in enumerate(normalize_prompt(prompts).tolist(), 1):
            if key and key not in index:
                index[key] = f"{split} {where(i)}"
    return index


def leaked_prompts(prompts: pd.Series, index: Mapping[str, str]) -> pd.Series:
    """'also in heldout_prompts line 4' where a training prompt is a held-out prompt."""
    hits = normalize_prompt(prompts).map(index)
    return pd.Series(
        np.where(hits.notna(), "also in " + hits.fillna("").astype(str), None), index=prompts.index, dtype=object
    )


def bad_timestamps(values: pd.Series) -> pd.Series:
    """A note where a non-null timestamp is not ISO 8601 text or positive epoch seconds."""
    out = pd.Series(None, index=values.index, dtype=object)
    if pd.api.types.is_datetime64_any_dtype(values):
        return out
    if pd.api.types.is_numeric_dtype(values):
        bad = values.notna() & ~(np.isfinite(values.astype(float)) & (values > 0))
    else:
        parsed = pd.to_datetime(values.astype(object), errors="coerce", utc=True, format="ISO8601")
        bad = values.notna() & parsed.isna()
    for idx in values.index[bad.to_numpy()]:
        out.at[idx] = f"not a time: {str(values.at[idx])[:40]!r}"
    return out


def token_lengths(texts: pd.Series, tokenizer: Any, batch_size: int = 1024) -> pd.Series:
    """Tokens per text under the model's tokenizer (no special tokens); NA for nulls."""
    out = pd.Series(np.nan, index=texts.index, dtype=float)
    present = texts[texts.notna()]
    values = present.astype(str).tolist()
    lengths: list[int] = []
    for start in range(0, len(values), batch_size):
        ids = tokenizer(values[start : start + batch_size], add_special_tokens=False)["input_ids"]
        lengths.extend(len(x) for x in ids)
    out.loc[present.index] = lengths
    return out


# --- fingerprints ----------------------------------------------------------------------------------


def logical_type(values: pd.Series) -> str:
    """A column's type in words stable across pandas versions ("string", "number", ...)."""
    if pd.api.types.is_bool_dtype(values):
        return "boolean"
    if pd.api.types.is_numeric_dtype(values):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(values):
        return "datetime"
    if pd.api.types.is_string_dtype(values):
        return "string"
    return "object"


def jsonl_bytes(frame: pd.DataFrame) -> bytes:
    """The frame as UTF-8 JSON Lines, nulls as null (the file the trainers read)."""
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode("utf-8")


def fingerprint(kind: str, frame: pd.DataFrame, content: bytes) -> str:
    """sha256 of the schema (kind, column names and types) and the content bytes."""
    schema = {"kind": kind, "columns": {c: logical_type(frame[c]) for c in frame.columns}}
    h = hashlib.sha256(json.dumps(schema, sort_keys=True).encode("utf-8"))
    h.update(b"\n")
    h.update(content)
    return h.hexdigest()
