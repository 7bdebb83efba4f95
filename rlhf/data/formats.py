"""Recognise the data formats users have and convert them to TRL's string format.

Every data kind has one standard (TRL "standard", string) layout, the one the
trainers read:

====================  ==================================================
kind                  columns
====================  ==================================================
``sft``               ``prompt``, ``completion``
``preference``        ``prompt``, ``chosen``, ``rejected``
``prompt``            ``prompt``
``traffic``           ``timestamp``, ``prompt``, ``response``, ``model_version`` (+ ``feedback``)
====================  ==================================================

Also accepted and converted here (row by row, errors naming the row):

- conversational (TRL): lists of ``{"role", "content"}`` messages, with an
  explicit ``prompt`` or (preferences) an implicit one, the messages shared by
  ``chosen`` and ``rejected``; SFT ``messages`` (the last assistant turn is the
  completion);
- the UltraFeedback-binarized layout: a string ``prompt`` and ``chosen`` /
  ``rejected`` as whole conversations that repeat the user turn (the prompt must
  be the last user message they share; only the assistant replies are kept);
  extra columns (``prompt_id``, ``messages``, ``score_chosen``, ...) are dropped;
  for SFT, its ``messages`` column;
- transcripts in the ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` style (Anthropic
  HH): for preferences ``chosen`` and ``rejected`` are whole transcripts and the
  prompt is their shared prefix up to the last ``"\\n\\nAssistant:"``; for SFT a
  ``text`` column.

Conversations are rendered in the pipeline's prompt format (``support.py``):
``"Customer: ...\\nAgent: ...\\nCustomer: ...\\nAgent:"``, and a completion is one
space plus the assistant's text, so all three preference formats give the same
rows. Pure Python and pandas: no ``datasets``, GX or MLflow here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pandas as pd

PROMPT_PREFIX = "Customer: "
PROMPT_SUFFIX = "\nAgent:"
"""The prompt format the pipeline renders conversations in: ``Customer: <message>\nAgent:``."""
FILES = {
    "sft": "sft.jsonl",
    "preferences": "preferences.jsonl",
    "preferences_heldout": "preferences_heldout.jsonl",
    "prompts": "prompts.jsonl",
    "heldout_prompts": "heldout_prompts.jsonl",
}
"""Split name -> file name in a data folder (``data.source``)."""


DataKind = Literal["sft", "preference", "prompt", "traffic"]
Format = Literal["trl", "conversational", "conversational-implicit", "conversational-full", "messages", "transcript"]

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "traffic": ("timestamp", "prompt", "response", "model_version"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"traffic": ("feedback",)}

ROLE_PREFIX = {
    "system": "System: ",
    "user": PROMPT_PREFIX,
    "human": PROMPT_PREFIX,
    "assistant": "Agent: ",
    "gpt": "Agent: ",
}
ASSISTANT_ROLES = ("assistant", "gpt")
AGENT_CUE = PROMPT_SUFFIX.lstrip("\n")  # "Agent:", the cue the policy answers after
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
MAX_LISTED_ROWS = 5


class ConversionError(ValueError):
    """Rows that cannot be converted; the loader adds the file name."""


def detect_format(columns: Mapping[str, str], kind: DataKind) -> Format:
    """The layout of a file from its column types ("string", "list", ...)."""
    if kind not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown data kind {kind!r}: use one of {sorted(REQUIRED_COLUMNS)}")
    is_list = {name for name, t in columns.items() if t == "list"}
    if kind == "preference":
        if {"chosen", "rejected"} <= is_list:
            if columns.get("prompt") == "string":  # UltraFeedback binarized: the prompt repeated in both
                return "conversational-full"
            return "conversational" if "prompt" in columns else "conversational-implicit"
        if "prompt" not in columns and columns.get("chosen") == "string" and columns.get("rejected") == "string":
            return "transcript"
    elif kind == "sft":
        if "messages" in is_list and "completion" not in columns:  # a string prompt beside it repeats the first turn
            return "messages"
        if {"prompt", "completion"} <= is_list:
            return "conversational"
        if columns.get("text") == "string" and "prompt" not in columns:
            return "transcript"
    elif kind == "prompt" and "prompt" in is_list:
        return "conversational"
    return "trl"


def to_standard(rows: Mapping[str, list[Any]], kind: DataKind, fmt: Format) -> pd.DataFrame:
    """Columns of a non-standard file -> the kind's standard string columns (one row per input row)."""
    if fmt == "trl":
        raise ValueError("to_standard converts non-standard formats only")
    convert = _CONVERTERS[(kind, fmt)]
    n = len(next(iter(rows.values())))
    out: list[dict[str, str]] = []
    problems: list[tuple[int, str]] = []
    for i in range(n):
        try:
            out.append(convert({name: col[i] for name, col in rows.items()}))
        except ConversionError as e:
            problems.append((i + 1, str(e)))
            out.append({})
    if problems:
        listed = "; ".join(f"row {row}: {why}" for row, why in problems[:MAX_LISTED_ROWS])
        more = f" (and {len(problems) - MAX_LISTED_ROWS} more)" if len(problems) > MAX_LISTED_ROWS else ""
        raise ConversionError(
            f"{len(problems)} of {n} rows cannot be converted from the {fmt} format: {listed}{more}. Fix: {_FIXES[fmt]}"
        )
    return pd.DataFrame(out, columns=list(REQUIRED_COLUMNS[kind]), dtype="str")


_FIXES = {
    "conversational": 'every message must be an object {"role": "user"|"assistant"|"system", "content": text}; '
    "the prompt must end with a user message and each response must be one assistant message",
    "conversational-implicit": "chosen and rejected must be the same conversation up to the last user message, "
    "each followed by one assistant message (or give an explicit prompt column)",
    "conversational-full": "chosen and rejected must be conversations that share everything up to the last user "
    "message, which must be the prompt, each followed by one assistant message",
    "messages": "each row's messages must end with one assistant message after a user message",
    "transcript": "each text must read '\\n\\nHuman: ...\\n\\nAssistant: ...'; chosen and rejected must share "
    "everything up to the last '\\n\\nAssistant:' (or add a prompt column)",
}


# --- rendering ---------------------------------------------------------------------------------


def render_messages(messages: Any, what: str = "prompt") -> str:
    """Messages -> "Customer: ...\\nAgent: ...\\nCustomer: ...\\nAgent:" (the prompt format)."""
    turns = _check_messages(messages, what)
    if not turns:
        raise ConversionError(f"{what} has no messages")
    if turns[-1][0] in ASSISTANT_ROLES:
        raise ConversionError(f"{what} ends with an assistant message; it must end with a user message")
    lines = [ROLE_PREFIX[role] + content.strip() for role, content in turns]
    return "\n".join(lines + [AGENT_CUE])


def render_response(messages: Any, what: str) -> str:
    """One assistant message -> its text after one space (TRL completions follow the prompt)."""
    turns = _check_messages(messages, what)
    if len(turns) != 1 or turns[0][0] not in ASSISTANT_ROLES:
        roles = [role for role, _ in turns]
        raise ConversionError(f"{what} must be exactly one assistant message, got roles {roles}")
    return " " + turns[0][1].strip()


def _check_messages(messages: Any, what: str) -> list[tuple[str, str]]:
    if not isinstance(messages, (list, tuple)):
        raise ConversionError(f"{what} is {type(messages).__name__}, not a list of messages")
    turns = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise ConversionError(f"{what} message {j + 1} is not an object with string 'role' and 'content'")
        role = m["role"].lower()
        if role not in ROLE_PREFIX:
            raise ConversionError(f"{what} message {j + 1} has role {m['role']!r}; use user, assistant or system")
        turns.append((role, m["content"]))
    return turns


def split_transcript(text: str, what: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [("user", "a"), ("assistant", "b")]."""
    if not isinstance(text, str):
        raise ConversionError(f"{what} is {type(text).__name__}, not a transcript string")
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ConversionError(f"{what} does not start with '\\n\\nHuman:'")
    return [("user" if who == "Human" else "assistant", body) for who, body in zip(parts[1::2], parts[2::2])]


def transcript_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Two transcripts -> (prompt, chosen, rejected); the prompt is the shared prefix up to the last Assistant cue."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise ConversionError(f"{name} is {type(value).__name__}, not a transcript string")
    if chosen.startswith("Human:"):
        chosen = "\n\n" + chosen
    if rejected.startswith("Human:"):
        rejected = "\n\n" + rejected
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise ConversionError("chosen and rejected share no '\\n\\nHuman: ...\\n\\nAssistant:' prefix")
    cut += len(ASSISTANT)
    prompt = _render_transcript_prompt(chosen[:cut], "prompt")
    return prompt, _transcript_response(chosen[cut:], "chosen"), _transcript_response(rejected[cut:], "rejected")


def _render_transcript_prompt(prefix: str, what: str) -> str:
    turns = split_transcript(prefix, what)
    if turns[-1][0] != "assistant" or turns[-1][1].strip():
        raise ConversionError(f"{what} does not end with an empty '\\n\\nAssistant:' cue")
    turns = turns[:-1]
    if not turns or turns[-1][0] != "user":
        raise ConversionError(f"{what} must end with a Human turn before the last Assistant cue")
    return render_messages([{"role": r, "content": c} for r, c in turns], what)


def _transcript_response(text: str, what: str) -> str:
    if HUMAN in text or ASSISTANT in text:
        raise ConversionError(f"{what} goes on for more turns after the responses diverge")
    return " " + text.strip()


# --- per (kind, format) row converters ----------------------------------------------------------


def _pref_conversational(row: dict) -> dict[str, str]:
    return {
        "prompt": render_messages(row["prompt"], "prompt"),
        "chosen": render_response(row["chosen"], "chosen"),
        "rejected": render_response(row["rejected"], "rejected"),
    }


def _pref_implicit(row: dict) -> dict[str, str]:
    shared, chosen, rejected = _split_shared(row["chosen"], row["rejected"])
    return {
        "prompt": render_messages(shared, "shared prompt"),
        "chosen": render_response(chosen, "chosen"),
        "rejected": render_response(rejected, "rejected"),
    }


def _pref_full(row: dict) -> dict[str, str]:
    """UltraFeedback binarized: the string prompt is the last user turn chosen and rejected share."""
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise ConversionError(f"prompt is {type(prompt).__name__}, not text")
    shared, chosen, rejected = _split_shared(row["chosen"], row["rejected"])
    if not shared:  # chosen and rejected hold only the replies: the prompt is the whole user turn
        shared = [{"role": "user", "content": prompt}]
    elif shared[-1]["content"].strip() != prompt.strip():
        raise ConversionError(
            f"prompt {_clip(prompt)!r} is not the last user message chosen and rejected share "
            f"({_clip(shared[-1]['content'])!r})"
        )
    return {
        "prompt": render_messages(shared, "shared prompt"),
        "chosen": render_response(chosen, "chosen"),
        "rejected": render_response(rejected, "rejected"),
    }


def _split_shared(chosen_messages: Any, rejected_messages: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """Two conversations -> (the messages they share up to a user turn, chosen's rest, rejected's rest)."""
    chosen = _check_messages(chosen_messages, "chosen")
    rejected = _check_messages(rejected_messages, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1][0] in ASSISTANT_ROLES:  # the shared part ends at a user turn
        n -= 1
    as_messages = [[{"role": r, "content": c} for r, c in turns] for turns in (chosen, rejected)]
    return as_messages[0][:n], as_messages[0][n:], as_messages[1][n:]


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _pref_transcript(row: dict) -> dict[str, str]:
    prompt, chosen, rejected = transcript_pair(row["chosen"], row["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _sft_messages(row: dict) -> dict[str, str]:
    messages = row["messages"]
    turns = _check_messages(messages, "messages")
    if len(turns) < 2 or turns[-1][0] not in ASSISTANT_ROLES:
        raise ConversionError("messages must end with an assistant message after a user message")
    return {
        "prompt": render_messages(messages[:-1], "messages"),
        "completion": render_response(messages[-1:], "last message"),
    }


def _sft_conversational(row: dict) -> dict[str, str]:
    return {
        "prompt": render_messages(row["prompt"], "prompt"),
        "completion": render_response(row["completion"], "completion"),
    }


def _sft_transcript(row: dict) -> dict[str, str]:
    text = row["text"]
    if not isinstance(text, str):
        raise ConversionError(f"text is {type(text).__name__}, not a transcript string")
    if text.startswith("Human:"):
        text = "\n\n" + text
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ConversionError("text has no '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return {"prompt": _render_transcript_prompt(text[:cut], "text"), "completion": " " + text[cut:].strip()}


def _prompt_conversational(row: dict) -> dict[str, str]:
    return {"prompt": render_messages(row["prompt"], "prompt")}


_CONVERTERS: dict[tuple[str, str], Callable[[dict], dict[str, str]]] = {
    ("preference", "conversational"): _pref_conversational,
    ("preference", "conversational-implicit"): _pref_implicit,
    ("preference", "conversational-full"): _pref_full,
    ("preference", "transcript"): _pref_transcript,
    ("sft", "messages"): _sft_messages,
    ("sft", "conversational"): _sft_conversational,
    ("sft", "transcript"): _sft_transcript,
    ("prompt", "conversational"): _prompt_conversational,
}
