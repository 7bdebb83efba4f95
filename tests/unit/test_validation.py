"""The validation gate: pandas checks, GX suites per data kind, the stage's MLflow evidence, the CLI helper.

The good built-in data passes with the default config; each bad-data case
asserts its own message (check, rows, fix). Malformed files are covered in
test_data_formats.py.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from rlhf.builtin.dataset import BuiltinSizes, build_builtin_rows, write_builtin_dataset
from rlhf.config import ConfigError, PipelineConfig, ValidationConfig, load_config
from rlhf.data.loading import load_split
from rlhf.infra import security
from rlhf.validation import checks
from tasks.validate import (
    SPLIT_KINDS,
    ValidationFailed,
    failure_table,
    run_validation,
    validate_command,
    validate_file,
)


class WhitespaceTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return build_builtin_rows(0)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> dict[str, str]:
    return {k: str(v) for k, v in write_builtin_dataset(tmp_path_factory.mktemp("builtin"), 0).items()}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A throwaway SQLite tracking store for the tests that log."""
    root = tmp_path_factory.mktemp("mlflow")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    yield mlflow.create_experiment("validation-tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_tracking_uri(before)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def stage_run_of(parent_run_id: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`rlhf.stage` = 'validate'"
    )
    assert len(runs) == 1
    return runs[0]


# --- good data ----------------------------------------------------------------------------------


def test_builtin_data_passes_every_suite_with_default_config(builtin):
    for split, path in builtin.items():
        report = validate_file(path, SPLIT_KINDS[split], ValidationConfig())
        assert report.success, report.summary()
        assert report.failures == [] and report.format == "trl"
        assert report.summary().startswith(f"PASS {path}: {SPLIT_KINDS[split]} data")


def test_stage_passes_builtin_data_and_logs_the_evidence(builtin, experiment, tmp_path):
    cfg = PipelineConfig()
    token = "hf_" + "a1B2c3D4e5" * 3  # a path (or Hub name) that carries a token is logged masked
    (tmp_path / token).mkdir()
    builtin = dict(builtin, prompts=str(shutil.copy(builtin["prompts"], tmp_path / token / "prompts.jsonl")))
    with mlflow.start_run(experiment_id=experiment) as parent:
        validated = run_validation(
            cfg, builtin, str(tmp_path / "validated"), parent.info.run_id, tokenizer=WhitespaceTokenizer()
        )
    assert set(validated.paths) == set(builtin) == set(validated.fingerprints)
    for split, path in validated.paths.items():
        assert Path(path).parent == tmp_path / "validated"
        assert load_split(path).to_list() == [
            json.loads(line) for line in Path(builtin[split]).read_text().splitlines()
        ]
        assert len(validated.fingerprints[split]) == 64
    run = stage_run_of(parent.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["validation.success"] == "true"
    assert run.data.metrics["data/preferences_rows"] == BuiltinSizes().preferences
    assert run.data.metrics["data/heldout_prompts_rows"] == 128
    assert run.data.params["validation.pii_policy"] == "fail"
    parent_tags = mlflow.MlflowClient().get_run(parent.info.run_id).data.tags
    for split, fp in validated.fingerprints.items():
        assert run.data.tags[f"data.fingerprint.{split}"] == fp == parent_tags[f"data.fingerprint.{split}"]
    assert parent_tags["data.source.prompts"] == run.data.tags["data.source.prompts"] == f"{tmp_path}/***/prompts.jsonl"
    summary = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/validation/summary.txt")
    assert token not in summary and "***/prompts.jsonl" in summary
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "validation")}
    assert {
        "validation/preferences.gx_result.json",
        "validation/preferences.data_docs.html",
        "validation/summary.txt",
    } <= artifacts
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="validation", dst_path=str(tmp_path / "dl")
        )
    )
    gx_result = json.loads((local / "preferences.gx_result.json").read_text())
    assert gx_result["success"] is True and len(gx_result["results"]) > 10
    assert "<html" in (local / "preferences.data_docs.html").read_text().lower()


def test_stage_fails_on_prompt_leakage_and_hands_on_nothing(builtin, experiment, tmp_path):
    heldout = Path(builtin["heldout_prompts"]).read_text().splitlines()
    shouted = json.dumps({"prompt": json.loads(heldout[1])["prompt"].upper()})  # leakage ignores case
    leaky = Path(builtin["prompts"]).read_text() + heldout[0] + "\n" + shouted + "\n"
    paths = dict(builtin, prompts=str(tmp_path / "prompts.jsonl"))
    Path(paths["prompts"]).write_text(leaky)
    with mlflow.start_run(experiment_id=experiment) as parent:
        with pytest.raises(ValidationFailed) as info:
            run_validation(PipelineConfig(), paths, str(tmp_path / "validated"), parent.info.run_id)
    assert len(info.value.lines) == 1
    assert info.value.lines[0] == (
        f"prompts ({paths['prompts']}): leakage: 2 of 2002 prompts also occur in a held-out split, over the allowed "
        "0.0% (e.g. line 2001 also in heldout_prompts line 1; line 2002 also in heldout_prompts line 2). "
        "Fix: remove those prompts from the training split (held-out prompts must never be trained on), "
        "or raise validation.max_leaked_fraction"
    )
    assert not (tmp_path / "validated").exists()
    run = stage_run_of(parent.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["validation.success"] == "false"
    assert run.data.metrics["data/prompts_failed_checks"] == 1
    assert "data.fingerprint.prompts" in run.data.tags
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "validation")}
    assert "validation/prompts.gx_result.json" in artifacts


def test_stage_reports_a_malformed_file_as_a_failure(builtin, experiment, tmp_path):
    paths = dict(builtin, preferences=str(tmp_path / "preferences.jsonl"))
    Path(paths["preferences"]).write_text(Path(builtin["preferences"]).read_text()[:-40])
    with mlflow.start_run(experiment_id=experiment) as parent:
        with pytest.raises(ValidationFailed) as info:
            run_validation(PipelineConfig(), paths, str(tmp_path / "validated"), parent.info.run_id)
    assert info.value.lines[0].startswith(
        f"preferences: malformed file: {paths['preferences']}: line {BuiltinSizes().preferences} is truncated"
    )
    table = failure_table({}, info.value.lines)
    assert table[0]["split"] == "preferences" and table[0]["check"] == "file"


def test_stage_rejects_unknown_split_names(builtin, tmp_path):
    with pytest.raises(ValueError, match=r"unknown data split\(s\) \['traffic'\]"):
        run_validation(PipelineConfig(), dict(builtin, traffic="x.jsonl"), str(tmp_path), "no-run")
    with pytest.raises(ValueError, match="holds the input file"):
        run_validation(PipelineConfig(), {"prompts": str(tmp_path / "prompts.jsonl")}, str(tmp_path), "no-run")


# --- bad data: each case asserts its own message ---------------------------------------------------


def _set(i: int, **fields):
    def edit(rows: list[dict]) -> list[dict]:
        rows[i].update(fields)
        return rows

    return edit


def _duplicates(rows):
    rows[1] = dict(rows[0])
    rows[2] = dict(rows[0])
    rows[3] = dict(rows[0], chosen=rows[0]["rejected"], rejected=rows[0]["chosen"])  # swapped: contradicts row 1
    return rows


def _near_duplicates(rows):
    """Rows 2-4 are row 1 with a zero-width space, full-width letters, or other case and punctuation."""
    first = rows[0]
    rows[1] = dict(first, prompt=first["prompt"].replace(" ", " \u200b", 1))
    rows[2] = dict(first, chosen="".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in first["chosen"]))
    rows[3] = dict(first, rejected=first["rejected"].upper().replace(".", "!") + "?")
    return rows


BAD_PREFERENCES = [
    (
        "missing-column",
        lambda rows: [{k: v for k, v in r.items() if k != "rejected"} for r in rows],
        "columns: required column 'rejected' is missing (the file has: prompt, chosen). Fix: add it; preference data "
        "needs prompt, chosen, rejected, or use one of the formats in docs/validation.md",
    ),
    (
        "null-response",
        _set(4, rejected=None),
        "nulls: 'rejected' is null or missing in 1 of 100 rows (e.g. line 5). Fix: fill in those values or drop the rows",
    ),
    (
        "whitespace-only",
        _set(2, chosen="  \n "),
        "blank: 'chosen' is empty, whitespace-only or only invisible (zero-width) characters in 1 of 100 rows "
        "(e.g. line 3: '  \\n '). Fix: drop those rows",
    ),
    (
        "empty-prompt",
        _set(9, prompt=""),
        "blank: 'prompt' is empty, whitespace-only or only invisible (zero-width) characters in 1 of 100 rows "
        "(e.g. line 10: '')",
    ),
    (
        "zero-width-only",  # U+200B/U+200D/U+FEFF are not whitespace to a regex: passed the blank check
        _set(2, chosen="\u200b\u200d \ufeff"),
        "blank: 'chosen' is empty, whitespace-only or only invisible (zero-width) characters in 1 of 100 rows",
    ),
    (
        "bidi-override",
        _set(3, chosen=" Refund approved\u202e.dlrow olleh"),
        "control: 'chosen' contains control or bidirectional-override characters in 1 of 100 rows (they hide or "
        "reorder text as displayed) (e.g. line 4: U+202E at character 17). Fix: remove them",
    ),
    (
        "control-character",
        _set(6, prompt="Customer: hi\x1b[2J\nAgent:"),
        "control: 'prompt' contains control or bidirectional-override characters in 1 of 100 rows",
    ),
    (
        "near-duplicate-pairs",
        _near_duplicates,
        "duplicates: 3 of 100 rows repeat an earlier row (for pairs: same prompt and responses, in either order), over "
        "the allowed 1.0% (e.g. line 2 repeats line 1; line 3 repeats line 1; line 4 repeats line 1)",
    ),
    (
        "too-long",
        _set(7, chosen=" " + "x" * 9000),
        "chars: 'chosen' is outside 1..8000 characters in 1 of 100 rows (e.g. line 8: 9001 chars). Fix: drop or "
        "shorten those rows, or change validation.min_chars / validation.max_chars",
    ),
    (
        "chosen-equals-rejected",
        lambda rows: _set(5, rejected=rows[5]["chosen"] + " ")(rows),
        "chosen_differs: chosen and rejected are the same text in 1 of 100 rows (no preference to learn) "
        "(e.g. line 6: chosen == rejected). Fix: drop those pairs",
    ),
    (
        "duplicate-pairs",
        _duplicates,
        "duplicates: 3 of 100 rows repeat an earlier row (for pairs: same prompt and responses, in either order), over "
        "the allowed 1.0% (e.g. line 2 repeats line 1; line 3 repeats line 1; line 4 repeats line 1). Fix: remove the "
        "duplicate rows (`df.drop_duplicates()`), or raise validation.max_duplicate_fraction",
    ),
    (
        "email",
        _set(9, prompt="Customer: write to jane.doe@example.com please\nAgent:"),
        "pii: 'prompt' contains personal data (e-mail, phone, card, SSN or IBAN numbers) in 1 of 100 rows (e.g. line 10: email). "
        "Fix: remove it from the data, or set validation.pii_policy=redact",
    ),
    (
        "phone",
        _set(11, chosen=" Call us on +1 (555) 010-9999 today."),
        "pii: 'chosen' contains personal data (e-mail, phone, card, SSN or IBAN numbers) in 1 of 100 rows (e.g. line 12: phone)",
    ),
    (
        "card-number",
        _set(12, rejected=" Your card 4111-1111-1111-1111 was charged."),
        "pii: 'rejected' contains personal data (e-mail, phone, card, SSN or IBAN numbers) in 1 of 100 rows (e.g. line 13: card)",
    ),
    (
        "too-few-rows",
        lambda rows: rows[:5],
        "rows: has 5 rows, outside validation.min_rows..max_rows = 8..5000000. Fix: supply more data",
    ),
    (
        "numbers-not-text",
        lambda rows: [dict(r, chosen=i) for i, r in enumerate(rows)],
        "type: column 'chosen' is not text (its type is int64). Fix: store it as a string in every row",
    ),
    (
        "mixed-formats",
        lambda rows: [dict(r, prompt=[{"role": "user", "content": r["prompt"]}]) for r in rows],
        "type: column 'prompt' is not text (100 of 100 values are of another type) (e.g. line 1: ",
    ),
]


@pytest.mark.parametrize("name,edit,expected", BAD_PREFERENCES, ids=[c[0] for c in BAD_PREFERENCES])
def test_bad_preference_data_fails_with_its_message(tmp_path, rows, name, edit, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", edit(copy.deepcopy(rows["preferences"][:100])))
    report = validate_file(path, "preference", ValidationConfig())
    assert not report.success
    messages = report.messages()
    assert any(m.startswith(f"{path}: {expected}") for m in messages), "\n".join(messages)
    assert f"FAIL {path}" in report.summary()


def test_pii_is_never_quoted_in_messages(tmp_path, rows):
    edited = _set(0, chosen=" mail jane.doe@example.com or 555-010-9999")(copy.deepcopy(rows["preferences"][:20]))
    report = validate_file(write_jsonl(tmp_path / "p.jsonl", edited), "preference", ValidationConfig())
    text = report.summary() + report.result_json()
    assert "jane.doe" not in text and "010-9999" not in text
    assert report.redactions == {"email": 1, "phone": 1, "card": 0, "ssn": 0, "iban": 0}


def test_token_length_bound_uses_the_tokenizer(tmp_path, rows):
    path = write_jsonl(tmp_path / "p.jsonl", rows["preferences"][:20])
    assert validate_file(path, "preference", ValidationConfig()).success  # no tokenizer: no token check
    report = validate_file(path, "preference", ValidationConfig(max_tokens=5), tokenizer=WhitespaceTokenizer())
    tokens = [m for m in report.messages() if ": tokens: 'chosen' is over 5 tokens" in m]
    assert tokens and "Fix: drop or shorten those rows, or raise validation.max_tokens" in tokens[0]
    assert "in 20 of 20 rows (e.g. line 1: 19 tokens; line 2: 27 tokens" in tokens[0]


def traffic_rows(n: int = 20) -> list[dict]:
    return [
        {
            "timestamp": f"2024-05-01T12:{i:02d}:00Z",
            "prompt": f"Customer: where is order {i}?\nAgent:",
            "response": " On its way.",
            "model_version": "3",
            "feedback": 1 if i % 2 else None,
        }
        for i in range(n)
    ]


def test_good_traffic_and_other_kinds_pass(tmp_path, rows):
    report = validate_file(write_jsonl(tmp_path / "t.jsonl", traffic_rows()), "traffic", ValidationConfig())
    assert report.success, report.summary()
    assert list(report.frame.columns) == ["timestamp", "prompt", "response", "model_version", "feedback"]


BAD_OTHER_KINDS = [
    (
        "sft-missing-completion",
        "sft",
        lambda rows: [{"prompt": r["prompt"], "response": r["completion"]} for r in rows["sft"][:50]],
        "columns: required column 'completion' is missing (the file has: prompt, response)",
    ),
    (
        "sft-duplicates",
        "sft",
        lambda rows: rows["sft"][:50] + rows["sft"][:5],
        "duplicates: 5 of 55 rows repeat an earlier row",
    ),
    (
        "prompt-blank",
        "prompt",
        lambda rows: rows["prompts"][:50] + [{"prompt": "\t"}],
        "blank: 'prompt' is empty, whitespace-only or only invisible (zero-width) characters in 1 of 51 rows "
        "(e.g. line 51: '\\t')",
    ),
    (
        "traffic-bad-timestamp",
        "traffic",
        lambda rows: [dict(r, timestamp="yesterday") if i == 1 else r for i, r in enumerate(traffic_rows())],
        "timestamp: 'timestamp' is not an ISO 8601 time (or positive epoch seconds) in 1 of 20 rows "
        "(e.g. line 2: not a time: 'yesterday'). Fix: write times like 2024-05-01T12:30:00Z",
    ),
    (
        "traffic-missing-model-version",
        "traffic",
        lambda rows: [{k: v for k, v in r.items() if k != "model_version"} for r in traffic_rows()],
        "columns: required column 'model_version' is missing",
    ),
    (
        "traffic-null-version",
        "traffic",
        lambda rows: [dict(r, model_version=None) if i == 3 else r for i, r in enumerate(traffic_rows())],
        "nulls: 'model_version' is null or missing in 1 of 20 rows (e.g. line 4)",
    ),
]


@pytest.mark.parametrize("name,kind,make,expected", BAD_OTHER_KINDS, ids=[c[0] for c in BAD_OTHER_KINDS])
def test_bad_data_of_other_kinds_fails_with_its_message(tmp_path, rows, name, kind, make, expected):
    path = write_jsonl(tmp_path / "d.jsonl", make(rows))
    report = validate_file(path, kind, ValidationConfig())
    assert not report.success
    assert any(m.startswith(f"{path}: {expected}") for m in report.messages()), "\n".join(report.messages())


def test_redact_policy_replaces_pii_and_reports_it(tmp_path, rows, experiment):
    edited = copy.deepcopy(rows["preferences"][:30])
    edited[0]["prompt"] = "Customer: I am jane@example.com, card 4111 1111 1111 1111\nAgent:"
    path = write_jsonl(tmp_path / "p.jsonl", edited)
    cfg = ValidationConfig(pii_policy="redact")
    report = validate_file(path, "preference", cfg)
    assert report.success, report.summary()
    assert report.frame.loc[0, "prompt"] == "Customer: I am [EMAIL], card [CARD]\nAgent:"
    assert "PII redacted: 1 email, 1 card" in report.summary()


# --- fingerprints --------------------------------------------------------------------------------


def test_fingerprint_traces_content_and_schema_not_file_format(tmp_path, rows):
    pairs = rows["preferences"][:30]
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"].removeprefix("Customer: ").removesuffix("\nAgent:")}],
            "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
        }
        for r in pairs
    ]
    cfg = ValidationConfig()
    a = validate_file(write_jsonl(tmp_path / "a.jsonl", pairs), "preference", cfg).fingerprint
    pd.DataFrame(pairs).to_parquet(tmp_path / "a.parquet")
    assert validate_file(str(tmp_path / "a.parquet"), "preference", cfg).fingerprint == a
    assert validate_file(write_jsonl(tmp_path / "c.jsonl", conversational), "preference", cfg).fingerprint == a
    edited = copy.deepcopy(pairs)
    edited[3]["chosen"] += "!"
    assert validate_file(write_jsonl(tmp_path / "e.jsonl", edited), "preference", cfg).fingerprint != a
    frame = pd.DataFrame({"prompt": ["p"]})
    content = checks.jsonl_bytes(frame)
    assert checks.fingerprint("prompt", frame, content) != checks.fingerprint("sft", frame, content)


# --- the CLI helper --------------------------------------------------------------------------------


def test_validate_command_exit_status(tmp_path, builtin, rows):
    out, err = io.StringIO(), io.StringIO()
    assert (
        validate_command(
            builtin["preferences"], "preference", ValidationConfig(), report_dir=str(tmp_path / "r"), out=out, err=err
        )
        == 0
    )
    assert out.getvalue().startswith(f"PASS {builtin['preferences']}")
    assert (tmp_path / "r" / "preferences.gx_result.json").exists() and (
        tmp_path / "r" / "preferences.data_docs.html"
    ).exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(r, rejected=r["chosen"]) for r in rows["preferences"][:10]])
    out = io.StringIO()
    assert validate_command(bad, "preference", ValidationConfig(), out=out, err=err) == 1
    assert (
        "FAIL" in out.getvalue()
        and "chosen_differs: chosen and rejected are the same text in 10 of 10 rows" in out.getvalue()
    )
    (tmp_path / "empty.jsonl").write_bytes(b"")
    err = io.StringIO()
    assert validate_command(str(tmp_path / "empty.jsonl"), "preference", ValidationConfig(), out=out, err=err) == 2
    assert err.getvalue().startswith(f"FAIL {tmp_path / 'empty.jsonl'}: the file is empty (0 bytes)")


# --- pure checks and config ---------------------------------------------------------------------------


def test_pii_patterns_and_false_positives():
    texts = pd.Series(
        [
            "a.b+tag@mail.example.org",
            "(555) 123-4567",
            "+44 20 7946 0958",
            "4111 1111 1111 1111",
            "order 2024-01-15 at 10:30",
            "4111 1111 1111 1112",
            "12 items for 3 days",
            None,
        ]
    )
    redacted, flags, counts = security.scan_pii(texts, ["email", "phone", "card"])
    assert flags.tolist()[:4] == ["email", "phone", "phone", "card"]
    assert flags.iloc[4:].isna().all()  # a date, a number failing Luhn (16 digits: no phone either), small numbers
    assert redacted.tolist()[:4] == ["[EMAIL]", "[PHONE]", "[PHONE]", "[CARD]"]
    assert counts == {"card": 1, "email": 1, "phone": 2}
    only_email = security.scan_pii(texts, ["email"])[1]
    assert only_email.notna().sum() == 1


def test_luhn():
    assert security.luhn_valid("4111111111111111") and security.luhn_valid("79927398713")
    assert not security.luhn_valid("4111111111111112")


def test_leakage_ignores_invisible_characters_width_and_punctuation():
    heldout = pd.Series(["Customer: Where is my order?\nAgent:", "ﬁle a claim"])
    index = checks.heldout_index({"heldout_prompts": (heldout, lambda r: f"line {r}")})
    near = pd.Series(
        [
            "Customer: Where\u200b is my order?\nAgent:",  # a zero-width space
            "Ｃｕｓｔｏｍｅｒ: Ｗｈｅｒｅ ｉｓ ｍｙ ｏｒｄｅｒ?\nAgent:",  # full-width letters
            "customer -- where is my order!!! agent",  # case and punctuation
            "file a claim",  # the "ﬁ" ligature
            "Customer: Where is my parcel?\nAgent:",
        ]
    )
    assert checks.leaked_prompts(near, index).tolist() == ["also in heldout_prompts line 1"] * 3 + [
        "also in heldout_prompts line 2",
        None,
    ]


def test_stage_fails_on_near_duplicate_leakage(builtin, experiment, tmp_path):
    heldout = load_split(builtin["heldout_prompts"])["prompt"]
    prompts = [{"prompt": p} for p in load_split(builtin["prompts"])["prompt"]]
    prompts[3] = {"prompt": heldout[0].replace(" ", "\u200b ", 2).upper()}
    paths = dict(builtin, prompts=write_jsonl(tmp_path / "prompts.jsonl", prompts))
    cfg = PipelineConfig()
    with mlflow.start_run(experiment_id=experiment) as parent:
        with pytest.raises(ValidationFailed) as info:
            run_validation(cfg, paths, str(tmp_path / "out"), parent.info.run_id)
    assert any(
        ": leakage: 1 of 2000 prompts" in line and "line 4 also in heldout_prompts line 1" in line
        for line in info.value.lines
    ), info.value.lines


def test_control_and_invisible_characters_checks():
    texts = pd.Series(["plain\ttext\n", "a\u202eb", "\x00", "zero\u200bwidth", None])
    found = checks.control_characters(texts)
    assert found[1] == "U+202E at character 2" and found[2] == "U+0000 at character 1"
    assert found[[0, 3, 4]].isna().all()
    assert checks.comparison_key("  Ｈｅｌｌｏ,\u200b  WORLD! ") == "hello world"


def test_gx_result_and_data_docs_never_quote_pii(tmp_path, rows):
    # The row with the e-mail also fails the length check, whose GX result lists the failing values.
    edited = _set(0, chosen=" mail jane.doe@example.com, SSN 078-05-1120 " + "x" * 9000)(
        copy.deepcopy(rows["preferences"][:20])
    )
    report = validate_file(write_jsonl(tmp_path / "p.jsonl", edited), "preference", ValidationConfig())
    assert {f.check for f in report.failures} >= {"pii", "chars"}
    artifacts = report.result_json() + report.data_docs()
    assert "[EMAIL]" in artifacts  # GX saw the redacted text
    assert "jane.doe" not in artifacts and "078-05-1120" not in artifacts


def test_ssn_iban_and_ip_addresses():
    texts = pd.Series(
        [
            "my SSN is 078-05-1120",
            "IBAN DE89 3704 0044 0532 0130 00 please",
            "pay to GB82WEST12345698765432",
            "server at 192.168.100.200 is down",
            "ticket 000-12-3456 and GB00 WEST ABCD EFGH IJ",  # no SSN starts 000; the IBAN fails mod 97
        ]
    )
    redacted, flags, counts = security.scan_pii(texts, security.PII_KINDS)
    assert redacted.tolist()[:4] == [
        "my SSN is [SSN]",
        "IBAN [IBAN] please",
        "pay to [IBAN]",
        "server at 192.168.100.200 is down",
    ]
    assert flags.tolist()[:3] == ["ssn", "iban", "iban"] and flags.iloc[3:].isna().all()
    assert security.redact_text("call +1 (555) 010-9999 from 10.20.30.40") == "call [PHONE] from 10.20.30.40"


def test_secret_names_in_any_case_style_and_bearer_tokens_are_masked():
    params = {
        "passphrase": "correct horse",
        "db_pass": "hunter2",
        "openaiApiKey": "abc123",
        "aws_access_key": "AKIAxxxx",
        "awsSecretAccessKey": "zzz",
        "headers": "Authorization: Bearer abcdef123456.ghijk",
        "compass": "north",
        "max_new_tokens": 16,
    }
    masked = security.mask_secrets(params)
    assert masked["passphrase"] == masked["db_pass"] == masked["openaiApiKey"] == security.MASK
    assert masked["aws_access_key"] == masked["awsSecretAccessKey"] == security.MASK
    assert masked["headers"] == "Authorization: Bearer ***"
    assert masked["compass"] == "north" and masked["max_new_tokens"] == 16


def test_leakage_ignores_case_and_whitespace():
    index = checks.heldout_index({"heldout_prompts": (pd.Series(["Hi  there", ""]), lambda r: f"line {r}")})
    assert index == {"hi there": "heldout_prompts line 1"}
    assert (
        checks.leaked_prompts(pd.Series(["HI there ", "bye", None]), index).tolist()[0]
        == "also in heldout_prompts line 1"
    )
    assert checks.leaked_prompts(pd.Series(["bye"]), index).isna().all()


def test_epoch_timestamps_are_times():
    assert checks.bad_timestamps(pd.Series([1.7e9, float("nan")])).isna().all()
    assert checks.bad_timestamps(pd.Series([-5])).tolist() == ["not a time: '-5'"]


def test_validation_thresholds_are_checked_in_config():
    assert load_config(overrides=["validation.max_duplicate_fraction=0.05"]).validation.max_duplicate_fraction == 0.05
    with pytest.raises(ConfigError, match="validation.min_rows"):
        load_config(overrides=["validation.min_rows=10", "validation.max_rows=5"])
    with pytest.raises(ConfigError, match="unknown option 'validation.allow_typos'"):
        load_config(overrides=["validation.allow_typos=true"])


def test_prefect_table_artifact_lists_failures_inside_a_flow_run(monkeypatch, builtin, rows, experiment, tmp_path):
    import prefect.artifacts
    import prefect.context

    created: list[dict] = []
    monkeypatch.setattr(prefect.context.FlowRunContext, "get", classmethod(lambda cls: object()))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: created.append(kw))
    paths = dict(
        builtin, preferences=write_jsonl(tmp_path / "p.jsonl", [dict(r, chosen=" ") for r in rows["preferences"][:20]])
    )
    with mlflow.start_run(experiment_id=experiment) as parent:
        with pytest.raises(ValidationFailed):
            run_validation(PipelineConfig(), paths, str(tmp_path), parent.info.run_id)
        run_validation(PipelineConfig(), builtin, str(tmp_path), parent.info.run_id)
    failed, passed = created
    assert failed["key"] == "validation-failures"
    assert failed["table"] == [
        {
            "split": "preferences",
            "check": "blank",
            "column": "chosen",
            "rows": 20,
            "examples": "line 1: ' '; line 2: ' '; line 3: ' '",
            "problem": "'chosen' is empty, whitespace-only or only invisible (zero-width) characters in 20 of 20 rows",
            "fix": "drop those rows or fill in the text",
        }
    ]
    assert passed["key"] == "validation-summary" and [r["split"] for r in passed["table"]] == list(builtin)


def test_a_check_that_raised_says_so():
    from types import SimpleNamespace

    from rlhf.validation.suite import failures

    raised = SimpleNamespace(
        success=False,
        result={},
        exception_info={"metric-id": {"raised_exception": True, "exception_message": "boom"}},
        expectation_config=SimpleNamespace(meta={"check": "blank", "column": "prompt"}, kwargs={}),
    )
    [failure] = failures(SimpleNamespace(results=[raised]), "prompt", ValidationConfig(), lambda r: f"row {r}", {})
    assert (
        failure.message("p.jsonl")
        == "p.jsonl: blank: the check could not run (boom). Fix: drop those rows or fill in the text"
    )
