"""What may leave the process: secrets masked before they are logged, PII redacted from logged text.

- ``mask_secrets``: a parameter whose name looks like a credential (token, password,
  passphrase, secret, api key, access key, ... in snake_case, kebab-case or camelCase)
  or whose value looks like one (an ``hf_``/``sk-`` token, an AWS access key, a
  ``Bearer`` header, a URL with ``user:password@``) is replaced by ``***`` before
  ``mlflow.log_params`` or the logged config.yaml sees it.
- ``redact_text`` / ``redact_columns``: e-mail addresses, phone, payment card, US social
  security and IBAN numbers (the patterns of data validation, rlhf/validation/checks.py)
  become ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[SSN]``, ``[IBAN]`` in sample tables,
  reports and artifacts. An IPv4 address is not a phone number.
No MLflow or Prefect import here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

# IBANs first (their digits could pass for a card), cards next (their digits would also look like a phone number).
PII_KINDS = ("iban", "card", "ssn", "email", "phone")
REDACTION = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "ssn": "[SSN]", "iban": "[IBAN]"}
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)")
# US SSN: area 001-899 except 666, group 01-99, serial 0001-9999, written with dashes or spaces.
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-])")
# IBAN: country code, two check digits, 11-30 letters/digits, optionally in groups of four; mod-97 checked.
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}(?![A-Za-z0-9])")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_PREFILTER = {"email": "@", "card": r"\d\d\d", "phone": r"\d\d\d", "ssn": r"\d\d\d", "iban": r"[A-Z]{2}\d\d"}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_phone(text: str) -> bool:
    return 10 <= sum(ch.isdigit() for ch in text) <= 15 and not _IPV4.fullmatch(text)


def iban_valid(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    digits = "".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


_ACCEPT = {"card": (_CARD, _is_card), "phone": (_PHONE, _is_phone), "iban": (_IBAN, iban_valid)}


def _substitute(kind: str, text: str) -> tuple[str, int]:
    """Replace one kind of PII in a text; returns (new text, replacements)."""
    if kind in ("email", "ssn"):
        return (_EMAIL if kind == "email" else _SSN).subn(REDACTION[kind], text)
    pattern, accept = _ACCEPT[kind]
    count = 0

    def repl(m: re.Match) -> str:
        nonlocal count
        if accept(m.group()):
            count += 1
            return REDACTION[kind]
        return m.group()

    return pattern.sub(repl, text), count


def scan_pii(texts: pd.Series, kinds: Iterable[str]) -> tuple[pd.Series, pd.Series, dict[str, int]]:
    """(texts with PII replaced by [EMAIL]/[PHONE]/[CARD]/[SSN]/[IBAN], per-row kinds found or NA, count per kind)."""
    wanted = [k for k in PII_KINDS if k in set(kinds)]
    redacted = texts.copy()
    found: dict[Any, list[str]] = {}
    counts = dict.fromkeys(wanted, 0)
    for kind in wanted:
        candidates = redacted.str.contains(_PREFILTER[kind], regex=kind != "email", na=False)
        for idx in redacted.index[candidates.to_numpy()]:
            new, n = _substitute(kind, redacted.at[idx])
            if n:
                redacted.at[idx] = new
                found.setdefault(idx, []).append(kind)
                counts[kind] += n
    flags = pd.Series(pd.NA, index=texts.index, dtype=object)
    for idx, hits in found.items():
        flags.at[idx] = ", ".join(hits)
    return redacted, flags, counts


MASK = "***"
SECRET_NAME = re.compile(
    r"(?i)(^|[._-])(token|access[_-]?token|auth|authorization|password|passwd|pwd|pass|passphrase|secret|"
    r"api[_-]?key|apikey|access[_-]?key|secret[_-]?key|private[_-]?key|credentials?|client[_-]?secret|"
    r"session[_-]?key|cookie)($|[._-])"
)
SECRET_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|"
    r"xox[abpr]-[A-Za-z0-9-]{10,}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})"
)
BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a parameter or tag name looks like a credential (``db_pass``, ``openaiApiKey``, ``aws_access_key``)."""
    return bool(SECRET_NAME.search(_CAMEL.sub("_", name)))


URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def mask_value(value: Any) -> Any:
    """A string with embedded credentials masked (tokens, URL passwords); other values unchanged."""
    if not isinstance(value, str):
        return value
    value = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
    value = BEARER.sub(lambda m: f"{m[1]} {MASK}", value)
    return SECRET_VALUE.sub(MASK, value)


def mask_secrets(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params (flat or nested) with credential-like names or values masked."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[key] = mask_secrets(value)
        elif is_secret_name(str(key)) and value not in (None, "", False):
            out[key] = MASK
        elif isinstance(value, (list, tuple)):
            out[key] = type(value)(mask_value(v) for v in value)
        else:
            out[key] = mask_value(value)
    return out


def redact_text(text: str) -> str:
    """One text with e-mail addresses, phone, card, SSN and IBAN numbers replaced by [EMAIL]/[PHONE]/... ."""
    return redact_texts([text])[0]


def redact_texts(texts: list[Any]) -> list[Any]:
    """Texts with PII replaced (non-strings pass through unchanged)."""
    series = pd.Series(texts, dtype=object)
    is_str = series.map(lambda v: isinstance(v, str))
    if not is_str.any():
        return list(texts)
    redacted, _, _ = scan_pii(series[is_str], PII_KINDS)
    series[is_str] = redacted
    return series.tolist()


def redact_columns(table: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """A column-oriented table (as mlflow.log_table takes) with PII redacted in every text column."""
    return {name: redact_texts(list(values)) for name, values in table.items()}


def redact_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row-oriented records (as Prefect table artifacts take) with PII redacted in every text field."""
    if not rows:
        return []
    columns = redact_columns({key: [row.get(key) for row in rows] for key in rows[0]})
    return [{key: columns[key][i] for key in columns} for i in range(len(rows))]
