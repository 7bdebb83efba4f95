"""Loading data files: accepted formats convert to the same rows, malformed files fail with a sentence.

The malformed-file corpus is generated in tmp_path; each case asserts its own
message (the file named, where, the problem and the fix).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from rlhf.builtin import support
from rlhf.builtin.dataset import build_builtin_rows
from rlhf.data import formats
from rlhf.data.loading import DataError, load_split, load_standard

GOOD = json.dumps({"prompt": "Customer: hi\nAgent:", "chosen": " a", "rejected": " b"}) + "\n"


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return build_builtin_rows(0)["preferences"][:40]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def as_conversational(row: dict) -> dict:
    message = support.customer_message(row["prompt"])
    return {
        "prompt": [{"role": "user", "content": message}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def as_implicit(row: dict) -> dict:
    conv = as_conversational(row)
    return {"chosen": conv["prompt"] + conv["chosen"], "rejected": conv["prompt"] + conv["rejected"]}


def as_transcript(row: dict) -> dict:
    human = f"\n\nHuman: {support.customer_message(row['prompt'])}\n\nAssistant:"
    return {"chosen": human + row["chosen"], "rejected": human + row["rejected"]}


def as_ultrafeedback(row: dict, i: int = 0) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized: string prompt, whole conversations, extra columns."""
    conv = as_conversational(row)
    message = conv["prompt"][0]["content"]
    return {
        "prompt": message,
        "prompt_id": f"{i:064x}",
        "chosen": conv["prompt"] + conv["chosen"],
        "rejected": conv["prompt"] + conv["rejected"],
        "messages": conv["prompt"] + conv["chosen"],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


# --- accepted formats ---------------------------------------------------------------------------


def test_every_preference_format_loads_to_the_same_rows(tmp_path, pairs):
    expected = pd.DataFrame(pairs)
    for name, convert, fmt in [
        ("trl", dict, "trl"),
        ("conversational", as_conversational, "conversational"),
        ("implicit", as_implicit, "conversational-implicit"),
        ("transcript", as_transcript, "transcript"),
        ("ultrafeedback", as_ultrafeedback, "conversational-full"),
    ]:
        loaded = load_standard(str(write_jsonl(tmp_path / f"{name}.jsonl", [convert(r) for r in pairs])), "preference")
        assert loaded.format == fmt
        pd.testing.assert_frame_equal(loaded.frame.astype(object), expected.astype(object), obj=name)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_json_csv_parquet_load_like_jsonl(tmp_path, pairs, suffix):
    frame = pd.DataFrame(pairs)
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(pairs), encoding="utf-8")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    loaded = load_standard(str(path), "preference")
    pd.testing.assert_frame_equal(loaded.frame.astype(object), frame.astype(object))
    assert len(load_split(str(path))) == len(pairs)


def test_one_row_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(GOOD, encoding="utf-8")
    assert load_standard(str(path), "preference").frame.to_dict("records") == [json.loads(GOOD)]


def test_csv_keeps_text_that_looks_like_numbers_or_null(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('prompt\nNA\n123\n"multi\nline"\n', encoding="utf-8")
    loaded = load_standard(str(path), "prompt")
    assert loaded.frame["prompt"].tolist() == ["NA", "123", "multi\nline"]
    assert [loaded.source.where(i) for i in (1, 2, 3)] == ["line 2", "line 3", "line 4"]


def test_jsonl_rows_are_named_by_their_line(tmp_path, pairs):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n" + json.dumps(pairs[0]) + "\n\n" + json.dumps(pairs[1]) + "\n", encoding="utf-8")
    loaded = load_standard(str(path), "preference")
    assert [loaded.source.where(1), loaded.source.where(2)] == ["line 2", "line 4"]


def test_multi_turn_conversation_renders_in_the_prompt_format():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my lamp?"},
        {"role": "assistant", "content": "Which order?"},
        {"role": "user", "content": " Order 7. "},
    ]
    assert formats.render_messages(messages) == (
        "System: Be brief.\nCustomer: Where is my lamp?\nAgent: Which order?\nCustomer: Order 7.\nAgent:"
    )
    prompt, chosen, rejected = formats.transcript_pair(
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: Sure, d",
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: Sure, e",
    )
    assert (prompt, chosen, rejected) == ("Customer: a\nAgent: b\nCustomer: c\nAgent:", " Sure, d", " Sure, e")


def test_ultrafeedback_keeps_the_assistant_replies_of_multi_turn_conversations(tmp_path):
    user, bot = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant", "content": text})
    history = [{"role": "system", "content": "Be brief."}, user("Where is my lamp?"), bot("Which order?")]
    rows = [
        {  # multi-turn: the string prompt is the last shared user turn
            "prompt": "Order 7.",
            "chosen": [*history, user("Order 7."), bot("It ships today.")],
            "rejected": [*history, user("Order 7."), bot("No idea.")],
            "score_chosen": 9.0,
        },
        {  # replies only: the string prompt is the whole user turn
            "prompt": "hi",
            "chosen": [bot("Hello! How can I help?")],
            "rejected": [bot("What.")],
            "score_chosen": 7.0,
        },
    ]
    loaded = load_standard(str(write_jsonl(tmp_path / "uf.jsonl", rows)), "preference")
    assert loaded.format == "conversational-full"
    assert loaded.frame.to_dict("records") == [
        {
            "prompt": "System: Be brief.\nCustomer: Where is my lamp?\nAgent: Which order?\nCustomer: Order 7.\nAgent:",
            "chosen": " It ships today.",
            "rejected": " No idea.",
        },
        {"prompt": "Customer: hi\nAgent:", "chosen": " Hello! How can I help?", "rejected": " What."},
    ]


def test_ultrafeedback_prompt_that_is_not_the_shared_user_turn_is_refused(tmp_path):
    row = {
        "prompt": "Where is my lamp?",
        "chosen": [{"role": "user", "content": "Cancel my order."}, {"role": "assistant", "content": "Done."}],
        "rejected": [{"role": "user", "content": "Cancel my order."}, {"role": "assistant", "content": "No."}],
    }
    ok = {**row, "prompt": "Cancel my order."}
    with pytest.raises(
        DataError,
        match=r"1 of 2 rows .*conversational-full format: line 2: prompt 'Where is my lamp\?' is not the last user message",
    ):
        load_standard(str(write_jsonl(tmp_path / "uf.jsonl", [ok, row])), "preference")


def test_sft_ultrachat_layout_takes_the_messages(tmp_path):
    """A string prompt beside messages (UltraChat, UltraFeedback's train_sft): the messages are the example."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"prompt": "hi", "prompt_id": "0a", "messages": messages, "chosen": messages}]
    loaded = load_standard(str(write_jsonl(tmp_path / "sft.jsonl", rows)), "sft")
    assert loaded.format == "messages"
    assert loaded.frame.to_dict("records") == [{"prompt": "Customer: hi\nAgent:", "completion": " hello"}]


def test_hub_data_sets_take_a_split_and_a_revision(monkeypatch):
    import datasets

    from rlhf.data import loading

    assert loading.hub_spec("org/prefs") == ("org/prefs", "train", None)
    assert loading.hub_spec("HuggingFaceH4/ultrafeedback_binarized:test_prefs@3949bf5") == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "test_prefs",
        "3949bf5",
    )
    assert loading.hub_spec("org/prefs@v1.0") == ("org/prefs", "train", "v1.0")
    calls = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **kw: calls.append((a, kw)) or datasets.Dataset.from_list([{"prompt": "p"}]),
    )
    assert load_split("org/prefs:test_prefs@v1.0")["prompt"] == ["p"]  # a dotted revision is not a file extension
    assert calls == [(("org/prefs",), {"split": "test_prefs", "revision": "v1.0"})]
    with pytest.raises(DataError, match="no such file"):
        load_split("./org/prefs:test")


def test_sft_messages_and_transcripts_convert(tmp_path):
    messages = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    texts = [{"text": "Human: hi\n\nAssistant: hello"}]
    for name, rows in (("messages", messages), ("transcript", texts)):
        loaded = load_standard(str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), "sft")
        assert loaded.frame.to_dict("records") == [{"prompt": "Customer: hi\nAgent:", "completion": " hello"}], name


def test_conversational_prompts_convert(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    assert load_standard(str(path), "prompt").frame["prompt"].tolist() == ["Customer: hi\nAgent:"]


def test_unused_columns_are_dropped_and_missing_ones_kept_for_the_suite(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": " a", "score": 1}])
    loaded = load_standard(str(path), "preference")
    assert list(loaded.frame.columns) == ["prompt", "chosen"]
    assert loaded.columns == {"prompt": "string", "chosen": "string", "score": "int64"}


# --- malformed files: each case asserts its own message --------------------------------------------


def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"prompt": ["p"] * 50, "chosen": [" a"] * 50, "rejected": [" b"] * 50}).to_parquet(buf)
    return buf.getvalue()


def _conv(role: str) -> str:
    row = {
        "prompt": [{"role": role, "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    return json.dumps(row) + "\n"


MALFORMED: list[tuple[str, str, bytes | None, list[str]]] = [
    ("empty", "p.jsonl", b"", ["the file is empty (0 bytes)", "Fix: export the data again"]),
    ("blank-lines", "p.jsonl", b"\n  \n\n", ["has no rows (only blank lines)"]),
    ("plain-text", "p.jsonl", b"hello there\n", ["line 1 is not JSON ('hello there')", "one JSON object per line"]),
    (
        "bad-json-line",
        "p.jsonl",
        (GOOD + '{"prompt": "p" "chosen": " a"}\n' + GOOD).encode(),
        ["line 2 is not valid JSON (Expecting ',' delimiter at column 16)", "Fix: correct that line"],
    ),
    (
        "truncated-line",
        "p.jsonl",
        (GOOD * 2 + '{"prompt": "p", "chosen": " a').encode(),
        ["line 3 is truncated", "Fix: export the file again, or delete the last line"],
    ),
    (
        "latin-1",
        "p.jsonl",
        GOOD.encode() + '{"prompt": "café"}\n'.encode("latin-1"),
        ["line 2, byte 16: not UTF-8 (byte 0xe9)", "iconv -f WINDOWS-1252 -t UTF-8"],
    ),
    ("utf-16", "p.jsonl", GOOD.encode("utf-16"), ["is UTF-16 or binary, not UTF-8", "iconv -f UTF-16 -t UTF-8"]),
    ("utf-8-bom", "p.csv", b"\xef\xbb\xbfprompt\nhi\n", ["byte-order mark", "save as UTF-8 without BOM"]),
    (
        "csv-named-jsonl",
        "p.jsonl",
        b"prompt,chosen,rejected\nhi,a,b\n",
        ["looks like CSV, not JSON Lines (line 1: 'prompt,chosen,rejected')", "Fix: rename it to .csv"],
    ),
    (
        "json-array-in-jsonl",
        "p.jsonl",
        ("[" + GOOD.strip() + ", " + GOOD.strip() + "]\n").encode(),
        ["holds a JSON array, not JSON Lines", "jq -c '.[]'"],
    ),
    (
        "pretty-printed",
        "p.jsonl",
        json.dumps({"prompt": "p"}, indent=2).encode(),
        ["line 1 opens a JSON object that spans several lines", "jq -c ."],
    ),
    (
        "multi-mb-row",
        "p.jsonl",
        (GOOD + json.dumps({"prompt": "x" * 2_500_000}) + "\n" + GOOD).encode(),
        ["line 2 is 2.5 MB, over the 1.0 MB limit (validation.max_row_bytes)", "raise validation.max_row_bytes"],
    ),
    (
        "two-objects-one-line",
        "p.jsonl",
        (GOOD.strip() + " " + GOOD).encode(),
        ["line 1 holds more than one JSON value", "exactly one object per line"],
    ),
    ("row-not-object", "p.jsonl", (GOOD + '["p", " a", " b"]\n').encode(), ["line 2 is a list, not a JSON object"]),
    (
        "mixed-types",
        "p.jsonl",
        (GOOD + '{"prompt": "p", "chosen": 5, "rejected": " b"}\n').encode(),
        ["line 2: field 'chosen' is a number but line 1 has a string", "quote numbers as strings"],
    ),
    ("gzip", "p.jsonl", gzip.compress(GOOD.encode()), ["is gzip-compressed", "gunzip -k"]),
    ("parquet-named-jsonl", "p.jsonl", _parquet_bytes(), ["is a Parquet file named .jsonl", "rename it to .parquet"]),
    ("truncated-parquet", "p.parquet", _parquet_bytes()[:300], ["the Parquet file is truncated (no footer)"]),
    ("not-parquet", "p.parquet", GOOD.encode(), ["is named .parquet but is not a Parquet file"]),
    (
        "json-object-of-rows",
        "p.json",
        json.dumps({"data": [json.loads(GOOD)]}, indent=1).encode(),
        ["holds one JSON object (keys ['data'])", "jq -c '.data[]'"],
    ),
    (
        "truncated-json",
        "p.json",
        ("[" + GOOD.strip() + ", " + GOOD.strip()[:20]).encode(),
        ["the JSON document is truncated"],
    ),
    ("empty-json-array", "p.json", b"[]", ["holds an empty JSON array"]),
    (
        "csv-wrong-field-count",
        "p.csv",
        b"prompt,chosen,rejected\nhi,a,b\nhi,a,b,c\n",
        ["line 3 has 4 fields but the header has 3", "quote fields that contain commas"],
    ),
    ("csv-header-only", "p.csv", b"prompt,chosen,rejected\n", ["has a header (prompt, chosen, rejected) but no rows"]),
    ("csv-saved-index", "p.csv", b",prompt\n0,hi\n", ["the header has a column with no name", "index=False"]),
    ("json-named-csv", "p.csv", GOOD.encode(), ["holds JSON, not CSV", "rename it to .jsonl"]),
    ("excel", "p.csv", b"PK\x03\x04" + b"\x00" * 40, ["is a zip archive (or an Excel workbook)"]),
    ("unsupported-extension", "p.txt", GOOD.encode(), ["unsupported file type '.txt'", ".jsonl"]),
    ("missing-file", "nope.jsonl", None, ["no such file", "Fix: correct the path"]),
    (
        "unknown-role",
        "p.jsonl",
        _conv("robot").encode(),
        ["1 of 1 rows cannot be converted from the conversational format", "line 1: prompt message 1 has role 'robot'"],
    ),
    (
        "transcripts-without-shared-prompt",
        "p.jsonl",
        (
            json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}) + "\n"
        ).encode(),
        ["line 1: chosen and rejected share no", "or add a prompt column"],
    ),
    (
        "deeply-nested-jsonl",  # json.loads raised RecursionError: a traceback, not a sentence
        "p.jsonl",
        (GOOD + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n").encode(),
        ["line 2 nests lists/objects more than 16 levels deep", "Fix: flatten that row's fields"],
    ),
    (
        "nested-jsonl-under-recursion-limit",
        "p.jsonl",
        (GOOD + '{"prompt": "p", "chosen": ' + '{"a": ' * 40 + '" a"' + "}" * 40 + ', "rejected": " b"}\n').encode(),
        ["line 2 nests lists/objects more than 16 levels deep"],
    ),
    (
        "deeply-nested-json",
        "p.json",
        ("[" + GOOD.strip() + ", " + "[" * 100_000 + "]" * 100_000 + "]").encode(),
        ["the document nests lists/objects more than 16 levels deep", "Fix: flatten"],
    ),
    (
        "nested-json-row",
        "p.json",
        ("[" + GOOD.strip() + ", " + '{"prompt": ' + "[" * 30 + "]" * 30 + "}]").encode(),
        ["row 2 nests lists/objects more than 16 levels deep"],
    ),
]


@pytest.mark.parametrize("name,filename,content,expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_file_fails_with_its_message(tmp_path, name, filename, content, expected):
    path = tmp_path / filename
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_standard(str(path), "preference")
    message = str(info.value)
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message, message  # one line
    assert re.search(r"\bFix: \S", message), f"no 'Fix: <what to do>' in {message!r}"


def test_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: is a folder, not a data file")):
        load_split(str(tmp_path))


def test_row_limit_is_configurable(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD + json.dumps({"prompt": "x" * 5000}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is 5.0 kB, over the 2.0 kB limit"):
        load_split(str(path), max_row_bytes=2000)
    assert len(load_split(str(path))) == 2
