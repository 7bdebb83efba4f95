"""Resolve, check and load the pipeline's data files through Hugging Face `datasets`.

A split is a local JSON/JSONL/CSV/Parquet file or a Hub data set,
``org/name[:split][@revision]`` (where the user's machine reaches the Hub).
``user_data_paths`` finds the files of a data folder (the built-in data set is
written by ``rlhf.builtin.task.resolve_data_paths``).

Before `datasets` sees a local file, ``inspect_file`` reads it once, line by line,
and turns every way a file can be malformed (empty, not UTF-8, truncated, a JSON
array in a .jsonl file, a CSV file named .jsonl, a multi-MB row, ...) into a
``DataError`` that names the file, the line or row, the problem and the fix:
users see a sentence, never a pyarrow traceback.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd

from rlhf.config import DataConfig, ValidationConfig
from rlhf.data.formats import (
    FILES,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    ConversionError,
    DataKind,
    Format,
    detect_format,
    to_standard,
)

SPLITS = tuple(FILES)
EXTENSION_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_MAX_ROW_BYTES = ValidationConfig().max_row_bytes
DEFAULT_MAX_FILE_BYTES = ValidationConfig().max_file_bytes
MAX_NESTING = 16
"""Deepest nesting of lists/objects a row may have (a conversational row needs 3: row, messages, message)."""
_MB = 1_000_000


class DataError(ValueError):
    """Data the user must fix; the message names the file and the fix."""


@dataclass(frozen=True)
class SourceInfo:
    """Where a loaded file's rows came from, to name them in messages."""

    path: str
    file_type: str
    """"jsonl", "json" (one array), "csv", "parquet" or "hub"."""
    line_numbers: tuple[int, ...] | None = None
    """Line of the file where each row starts (JSONL and CSV)."""

    def where(self, row: int) -> str:
        """1-based row -> "line 7" (text files) or "row 7"."""
        if self.line_numbers is not None and 0 < row <= len(self.line_numbers):
            return f"line {self.line_numbers[row - 1]}"
        return f"row {row}"


def hub_spec(path: str) -> tuple[str, str, str | None]:
    """A Hub data set reference ``org/name[:split][@revision]`` -> (name, split, revision).

    The split defaults to ``train``; a revision (a commit sha, tag or branch) pins the
    data, so a re-run reads the same rows (and the stage cache can trust the name), e.g.
    ``HuggingFaceH4/ultrafeedback_binarized:test_prefs@<sha>`` as the held-out preferences.
    """
    head, _, revision = path.partition("@")
    name, _, split = head.partition(":")
    return name, split or "train", revision or None


def _is_local(path: str) -> bool:
    """A path that can only mean a local file: it exists, has an extension or starts like a path."""
    return Path(path).exists() or bool(Path(hub_spec(path)[0]).suffix) or path.startswith((".", "/", "~"))


def user_data_paths(cfg: DataConfig, paths: dict[str, str] | None = None) -> dict[str, str]:
    """Split name -> file path (or Hub name) for every split the pipeline reads.

    ``paths`` are the files of a data set already written (the built-in one); without
    them, the files of the folder ``data.source``. Per-split paths (``data.<split>_path``)
    override either.
    """
    if paths is None:
        root = Path(cfg.source)
        if not root.is_dir():
            raise DataError(
                f"data.source {cfg.source!r} is not a folder: use 'builtin' or a folder holding "
                f"{', '.join(FILES.values())} (or set data.<split>_path for each file)"
            )
        paths = {k: str(root / name) for k, name in FILES.items()}
    paths = dict(paths)
    for split in SPLITS:
        override = getattr(cfg, f"{split}_path")
        if override:
            paths[split] = override
    for split, path in paths.items():
        if not Path(path).exists() and ("/" not in hub_spec(path)[0] or _is_local(path)):
            raise DataError(f"{split} data {path!r} does not exist: fix the path in data.source or data.{split}_path")
    return paths


def load_split(
    path: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> datasets.Dataset:
    """One split as a `datasets.Dataset` (local file by extension, else a Hub data set, see ``hub_spec``)."""
    return _load(path, max_row_bytes, max_file_bytes)[0]


@dataclass(frozen=True)
class LoadedData:
    """A file converted to its kind's standard columns, and where it came from."""

    frame: pd.DataFrame
    source: SourceInfo
    format: Format
    """The layout the file was in ("trl", "conversational", "transcript", ...)."""
    columns: dict[str, str]
    """The file's own columns and their types, for messages about missing ones."""


def load_standard(
    path: str, kind: DataKind, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> LoadedData:
    """A file of any accepted format as the kind's standard string columns (see formats.py).

    Columns the kind does not use are dropped; missing ones are left for the
    validation suite to report.
    """
    dataset, info = _load(path, max_row_bytes, max_file_bytes)
    columns = {name: _feature_type(feature) for name, feature in dataset.features.items()}
    fmt = detect_format(columns, kind)
    if fmt == "trl":
        wanted = [c for c in REQUIRED_COLUMNS[kind] + OPTIONAL_COLUMNS.get(kind, ()) if c in columns]
        frame = dataset.select_columns(wanted).to_pandas() if wanted else pd.DataFrame(index=range(len(dataset)))
        return LoadedData(frame, info, fmt, columns)
    try:
        frame = to_standard(dataset.to_dict(), kind, fmt)
    except ConversionError as e:
        raise DataError(f"{path}: {_with_lines(str(e), info)}") from None
    return LoadedData(frame, info, fmt, columns)


def inspect_file(
    path: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> SourceInfo:
    """Check a local file is readable as its extension says; raise DataError naming line and fix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise DataError(f"{path}: is a folder, not a data file. Fix: point at a .jsonl/.json/.csv/.parquet file")
    if suffix not in EXTENSION_BUILDERS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}. Fix: save it as one of "
            f"{', '.join(sorted(EXTENSION_BUILDERS))} (JSON Lines is the native format)"
        )
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). Fix: export the data again, or point at the right file")
    if size > max_file_bytes:
        raise DataError(
            f"{path}: the file is {_size(size)}, over the {_size(max_file_bytes)} limit (validation.max_file_bytes), "
            "so it is not read. Fix: split it or sample the rows you need, or raise validation.max_file_bytes"
        )
    with p.open("rb") as f:
        head = f.read(4096)
    _check_magic(path, suffix, head)
    if suffix == ".parquet":
        return SourceInfo(path, "parquet")
    if suffix == ".csv":
        return _scan_csv(path, max_row_bytes)
    if suffix == ".json":
        return _scan_json(path, size, max_row_bytes)
    return _scan_jsonl(path, max_row_bytes)


# --- loading --------------------------------------------------------------------------------------


def _load(
    path: str, max_row_bytes: int, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> tuple[datasets.Dataset, SourceInfo]:
    p = Path(path)
    if not p.exists():
        if _is_local(path):
            raise DataError(f"{path}: no such file. Fix: correct the path (data.source or data.<split>_path)")
        name, split, revision = hub_spec(path)
        try:
            return datasets.load_dataset(name, split=split, revision=revision), SourceInfo(path, "hub")
        except Exception as e:  # the Hub raises many types; all mean "cannot get it"
            raise DataError(
                f"{path}: not a local file, and loading it as a Hub dataset failed ({_first_line(e)}). "
                "Fix: check the name and that this machine reaches the Hub, or download it and pass the file"
            ) from e
    info = inspect_file(path, max_row_bytes, max_file_bytes)
    kwargs: dict = {}
    if info.file_type == "csv":
        # Text stays text: "NA" or "1" in a prompt must not become null or an int.
        header = _csv_header(path)
        kwargs = {
            "features": datasets.Features({c: datasets.Value("string") for c in header}),
            "keep_default_na": False,
        }
    try:
        dataset = datasets.load_dataset(EXTENSION_BUILDERS[p.suffix.lower()], data_files=path, split="train", **kwargs)
    except Exception as e:  # pyarrow/pandas errors past the checks above; re-raised with the file named
        cause = e.__cause__ or e
        raise DataError(
            f"{path}: `datasets` could not read this {info.file_type} file ({type(cause).__name__}: "
            f"{_first_line(cause)}). Fix: re-export it with one JSON object per line "
            "(`df.to_json(path, orient='records', lines=True)`)"
        ) from e
    if len(dataset) == 0:
        raise DataError(f"{path}: has no rows. Fix: export the data again, or point at the right file")
    return dataset, info


def _feature_type(feature: object) -> str:
    if isinstance(feature, datasets.Value):
        return "string" if feature.dtype in ("string", "large_string") else feature.dtype
    if isinstance(feature, (list, datasets.List, datasets.LargeList)):
        return "list"
    if isinstance(feature, dict):
        return "struct"
    return type(feature).__name__


# --- file checks ------------------------------------------------------------------------------------

_JSON_TYPES = {
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "an object",
}


def _check_magic(path: str, suffix: str, head: bytes) -> None:
    """Binary signatures and encodings that no text parser should see."""
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path}: is gzip-compressed. Fix: decompress it (`gunzip -k {path}`) and point at the result")
    if head.startswith(b"PK\x03\x04"):
        raise DataError(
            f"{path}: is a zip archive (or an Excel workbook). Fix: extract it, or save the sheet as CSV/JSON Lines"
        )
    if suffix == ".parquet":
        with open(path, "rb") as f:
            f.seek(-4, 2)
            tail = f.read(4)
        if not head.startswith(b"PAR1"):
            raise DataError(
                f"{path}: is named .parquet but is not a Parquet file. Fix: rename it to its real type "
                "(.jsonl/.json/.csv) or re-export it with `df.to_parquet(path)`"
            )
        if tail != b"PAR1":
            raise DataError(
                f"{path}: the Parquet file is truncated (no footer). Fix: copy or export it again completely"
            )
        return
    if head.startswith(b"PAR1"):
        raise DataError(f"{path}: is a Parquet file named {suffix}. Fix: rename it to .parquet")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (b"\x00" in head):
        raise DataError(
            f"{path}: is UTF-16 or binary, not UTF-8 text. Fix: re-encode it as UTF-8 "
            f"(`iconv -f UTF-16 -t UTF-8 {path} > fixed{suffix}`)"
        )
    if head.startswith(b"\xef\xbb\xbf"):
        raise DataError(
            f"{path}: starts with a UTF-8 byte-order mark (as Excel writes), which JSON and CSV readers take "
            f"for part of the first field. Fix: remove it (`sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`) or save as "
            "UTF-8 without BOM"
        )


def _lines(path: str, max_row_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) with UTF-8 and row-size checks that name the line."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_row_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw.rstrip(b"\r\n")) > max_row_bytes:
                rest = len(f.readline())
                total = len(raw) + rest
                raise DataError(
                    f"{path}: line {lineno} is {_size(total)}, over the {_size(max_row_bytes)} limit "
                    "(validation.max_row_bytes); a row this long is usually a whole document pasted into a field "
                    "or lost newlines. Fix: split or drop that row, or raise validation.max_row_bytes"
                )
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.start + 1].hex()
                raise DataError(
                    f"{path}: line {lineno}, byte {e.start + 1}: not UTF-8 (byte 0x{bad}); the file is in "
                    f"another encoding, probably Latin-1/Windows-1252. Fix: re-encode it as UTF-8 "
                    f"(`iconv -f WINDOWS-1252 -t UTF-8 {path} > fixed{Path(path).suffix}`)"
                ) from None


def _scan_jsonl(path: str, max_row_bytes: int) -> SourceInfo:
    """Every line one JSON object, field types consistent across rows."""
    line_numbers: list[int] = []
    types: dict[str, tuple[str, int]] = {}
    lines = _lines(path, max_row_bytes)
    for lineno, text in lines:
        stripped = text.strip()
        if not stripped:
            continue
        if not line_numbers:
            _check_first_line(path, lineno, stripped)
        try:
            obj = json.loads(stripped)
        except RecursionError:
            raise DataError(_too_deep(path, f"line {lineno}")) from None
        except json.JSONDecodeError as e:
            # Only the last line lacks a newline; an error at its end means the file was cut short.
            cut_short = e.msg.startswith("Unterminated string") or e.pos >= len(stripped)
            if cut_short and not text.endswith("\n"):
                raise DataError(
                    f"{path}: line {lineno} is truncated (the file ends in the middle of a JSON object: "
                    f"{e.msg.removesuffix(' at')} at column {e.colno}); the export or copy was cut short. Fix: export the file again, "
                    "or delete the last line"
                ) from None
            if e.msg == "Extra data":
                raise DataError(
                    f"{path}: line {lineno} holds more than one JSON value (extra data at column {e.colno}). "
                    "Fix: put exactly one object per line"
                ) from None
            raise DataError(
                f"{path}: line {lineno} is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}). Fix: correct that line; "
                "write files with one `json.dumps(row)` per line"
            ) from None
        _check_depth(path, f"line {lineno}", obj)
        _check_row(path, f"line {lineno}", obj, types, lineno)
        line_numbers.append(lineno)
    if not line_numbers:
        raise DataError(
            f"{path}: has no rows (only blank lines). Fix: export the data again, or point at the right file"
        )
    return SourceInfo(path, "jsonl", tuple(line_numbers))


def _check_first_line(path: str, lineno: int, line: str) -> None:
    """Whole-file mix-ups show on the first line: arrays, pretty-printed JSON, CSV."""
    if line.startswith("["):
        raise DataError(
            f"{path}: holds a JSON array, not JSON Lines (one object per line). Fix: convert it with "
            f"`jq -c '.[]' {path} > fixed.jsonl`, or rename it to .json"
        )
    if line == "{":
        raise DataError(
            f"{path}: line {lineno} opens a JSON object that spans several lines: the file is pretty-printed "
            f"JSON, not JSON Lines. Fix: convert it with `jq -c . {path} > fixed.jsonl`"
        )
    if not line.startswith("{"):
        if "," in line or "\t" in line:
            raise DataError(
                f"{path}: looks like CSV, not JSON Lines (line {lineno}: {line[:80]!r}). Fix: rename it to .csv"
            )
        raise DataError(
            f"{path}: line {lineno} is not JSON ({line[:80]!r}). Fix: write one JSON object per line, "
            'e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}'
        )


def _check_row(path: str, where: str, obj: object, types: dict[str, tuple[str, int]], number: int) -> None:
    """A row is a JSON object whose fields keep one type across the file (Arrow needs one per column)."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: {where} is {_JSON_TYPES.get(type(obj), 'null')}, not a JSON object. Fix: write each row as an "
            'object with named fields, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}'
        )
    for key, value in obj.items():
        if value is None:
            continue
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        seen = types.setdefault(key, (kind, number))
        if seen[0] != kind:
            first = where.split(" ")[0]
            raise DataError(
                f"{path}: {where}: field {key!r} is {kind} but {first} {seen[1]} has {seen[0]}; a field must have "
                "one type in every row. Fix: convert that value (e.g. quote numbers as strings) or drop the row"
            )


def _depth(obj: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a string is 0, {"a": "b"} is 1), at most
    MAX_NESTING + 1; iterative, so a hostile row cannot exhaust the stack."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_NESTING:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _too_deep(path: str, where: str) -> str:
    return (
        f"{path}: {where} nests lists/objects more than {MAX_NESTING} levels deep, the most a row may have "
        '(text fields are strings; a conversation is a list of {"role", "content"} objects). '
        "Fix: flatten that row's fields to strings or message lists, or drop the row"
    )


def _check_depth(path: str, where: str, obj: object) -> None:
    if _depth(obj) > MAX_NESTING:
        raise DataError(_too_deep(path, where))


def _scan_json(path: str, size: int, max_row_bytes: int) -> SourceInfo:
    """A .json file: one top-level array of objects, or JSON Lines (which `datasets` also reads)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        for _ in _lines(path, max(size, max_row_bytes)):  # names the line of the bad byte
            pass
        raise
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(_too_deep(path, "the document")) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines in a .json file
            return _scan_jsonl(path, max_row_bytes)
        if e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip()):
            raise DataError(
                f"{path}: the JSON document is truncated (it ends at line {e.lineno} before it is complete). "
                "Fix: export or copy the file again completely"
            ) from None
        if not text.strip():
            raise DataError(f"{path}: has no rows (only blank lines). Fix: export the data again") from None
        raise DataError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}). Fix: correct it, or export "
            "with `json.dump(rows, f)` or as JSON Lines"
        ) from None
    if isinstance(data, dict) and "\n" not in text.strip():  # one line: a JSON Lines file with one row
        return _scan_jsonl(path, max_row_bytes)
    if isinstance(data, dict):
        keys = list(data)[:5]
        listed = [k for k in keys if isinstance(data[k], list)]
        hint = f"`jq -c '.{listed[0]}[]' {path} > fixed.jsonl`" if listed else f"`jq -c . {path} > fixed.jsonl`"
        raise DataError(
            f"{path}: holds one JSON object (keys {keys}), not rows: the rows must be a top-level array or one "
            f"object per line. Fix: extract them with {hint}"
        )
    if not isinstance(data, list):
        raise DataError(
            f"{path}: holds {_JSON_TYPES.get(type(data), 'null')}, not rows. Fix: write an array of objects"
        )
    if not data:
        raise DataError(f"{path}: holds an empty JSON array (no rows). Fix: export the data again")
    types: dict[str, tuple[str, int]] = {}
    for i, obj in enumerate(data, 1):
        _check_depth(path, f"row {i}", obj)
        _check_row(path, f"row {i}", obj, types, i)
        if size > max_row_bytes and len(json.dumps(obj, ensure_ascii=False).encode()) > max_row_bytes:
            n = len(json.dumps(obj, ensure_ascii=False).encode())
            raise DataError(
                f"{path}: row {i} is {_size(n)}, over the {_size(max_row_bytes)} limit (validation.max_row_bytes). "
                "Fix: split or drop that row, or raise validation.max_row_bytes"
            )
    return SourceInfo(path, "json")


def _scan_csv(path: str, max_row_bytes: int) -> SourceInfo:
    """A header, then records with as many fields as the header."""
    csv.field_size_limit(max(csv.field_size_limit(), max_row_bytes))
    lines = _lines(path, max_row_bytes)
    line_of = {}

    def texts() -> Iterator[str]:
        for lineno, text in lines:
            line_of["last"] = lineno
            yield text

    reader = csv.reader(texts())
    header: list[str] | None = None
    line_numbers: list[int] = []
    start = 1
    try:
        for record in reader:
            if not record or record == [""]:
                start = reader.line_num + 1
                continue
            if header is None:
                first = record[0].lstrip()
                if first.startswith(("{", "[")):
                    raise DataError(f"{path}: holds JSON, not CSV. Fix: rename it to .jsonl (or .json for an array)")
                if any(not c.strip() for c in record):
                    raise DataError(
                        f"{path}: the header has a column with no name ({record}), usually a saved index. "
                        "Fix: save with `df.to_csv(path, index=False)` or name the column"
                    )
                dupes = sorted({c for c in record if record.count(c) > 1})
                if dupes:
                    raise DataError(
                        f"{path}: the header repeats column(s) {dupes}. Fix: give every column a unique name"
                    )
                header = record
            elif len(record) != len(header):
                raise DataError(
                    f"{path}: line {start} has {len(record)} fields but the header has {len(header)} "
                    f"({', '.join(header)}). Fix: quote fields that contain commas, quotes or newlines "
                    "(`df.to_csv(path, index=False)` does), or export as JSON Lines"
                )
            else:
                line_numbers.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(
            f"{path}: line {line_of.get('last', '?')}: the CSV cannot be parsed ({e}). Fix: re-export it with "
            "`df.to_csv(path, index=False)`, or as JSON Lines"
        ) from None
    if header is None:
        raise DataError(f"{path}: has no rows (only blank lines). Fix: export the data again")
    if not line_numbers:
        raise DataError(f"{path}: has a header ({', '.join(header)}) but no rows. Fix: export the data again")
    return SourceInfo(path, "csv", tuple(line_numbers))


def _csv_header(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        for record in csv.reader(f):
            if record and record != [""]:
                return record
    return []


def _size(n: int) -> str:
    if n >= 1000 * _MB:
        return f"{n / (1000 * _MB):.1f} GB"
    return f"{n / _MB:.1f} MB" if n >= 100_000 else f"{n / 1000:.1f} kB"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _with_lines(message: str, info: SourceInfo) -> str:
    """Rewrite 'row N' of a conversion message to the file's line where the file has lines."""
    if info.line_numbers is None:
        return message
    return re.sub(r"\brow (\d+)\b", lambda m: info.where(int(m.group(1))), message)
