"""The ranking page without a browser (FastAPI's TestClient): token, escaping, saving a ranking as validated pairs
with provenance, rater agreement on the batch, PII redaction of sampled text."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

import tasks.label as label
from rlhf.config import PipelineConfig
from rlhf.feedback.batches import PAIRS_FILE, agreement_metrics, read_manifest, read_rankings
from tasks.label import LabelItem, create_app, open_session

TOKEN = "t" * 24
ITEMS = [
    LabelItem(
        "p1",
        "Customer: where is my lamp?\nAgent:",
        ("<script>alert(1)</script> it ships", " on the way", " no", " sorry"),
    ),
    LabelItem("p2", "Customer: refund please\nAgent:", (" refund started", " go away", " hmm", " sorry, refund done")),
]


@pytest.fixture
def session(tmp_path):
    cfg = PipelineConfig(feedback={"dir": str(tmp_path / "feedback")})
    return open_session(cfg, ITEMS, "models:/rlhf-policy/7", "test", now=datetime(2026, 12, 4, tzinfo=UTC))


def test_every_route_needs_the_token(session):
    client = TestClient(create_app(session, TOKEN))
    assert client.get("/").status_code == 401
    assert client.post("/rank", data={"prompt_id": "p1"}).status_code == 401
    assert client.get("/batch", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    with pytest.raises(ValueError, match="at least 16"):
        create_app(session, "short")


def test_the_page_escapes_model_output_and_forbids_scripts(session):
    client = TestClient(create_app(session, TOKEN))
    first = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/"  # the token leaves the address bar
    assert (
        "httponly" in first.headers["set-cookie"].lower() and "samesite=strict" in first.headers["set-cookie"].lower()
    )
    page = client.get("/")  # the cookie carries the token now
    assert page.status_code == 200
    assert "<script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no script runs
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_a_ranking_becomes_validated_pairs_with_provenance_and_raters_agree(session):
    client = TestClient(create_app(session, TOKEN), cookies={label.TOKEN_COOKIE: TOKEN})
    # ann: response 1 best, then 0, then 3 and 2 tied last -> 6 - 1 tie = 5 pairs
    saved = client.post(
        "/rank",
        data={"prompt_id": "p1", "rater": "ann", "rank_0": 2, "rank_1": 1, "rank_2": 3, "rank_3": 3},
        follow_redirects=False,
    )
    assert saved.status_code == 303 and saved.headers["location"] == "/?saved=5"
    assert "Prompt 2 of 2" in client.get("/").text  # ann's next prompt
    client.post("/rank", data={"prompt_id": "p1", "rater": "bob", "rank_0": 1, "rank_1": 2, "rank_2": 3, "rank_3": 4})
    client.post(
        "/rank",
        data={"prompt_id": "p2", "rater": "bob", "rank_0": 1, "rank_1": 4, "rank_2": 3, "rank_3": 2, "all_bad": "1"},
    )
    assert not read_manifest(session.folder).validated  # not until the gate ran on this content
    assert client.post("/validate", follow_redirects=False).headers["location"] == "/?validated=1"
    manifest = read_manifest(session.folder)
    assert manifest.validated, manifest.failures
    # bob's p1 ranking repeats ann's 5 comparisons (one of them reversed: kept once, ann's first) and adds (2, 3)
    assert (manifest.rankings, manifest.all_bad, manifest.raters) == (3, 1, ["ann", "bob"])
    assert (manifest.pairs, manifest.duplicates_dropped) == (5 + 6 - 5, 5)
    rows = [json.loads(line) for line in (session.folder / PAIRS_FILE).read_text().splitlines()]
    assert rows[0] == {
        "prompt": ITEMS[0].prompt,
        "chosen": " on the way",
        "rejected": "<script>alert(1)</script> it ships",
        "rater": "ann",
        "time": rows[0]["time"],
        "model_version": "models:/rlhf-policy/7",
        "prompt_id": "p1",
        "source": "ranking",
        "batch": session.manifest.batch,
    }
    # p1 by ann [2,1,3,3] and bob [1,2,3,4]: verdicts on (0,1),(0,2),(0,3),(1,2),(1,3),(2,3): ann +,-,-,-,-,0; bob -,-,-,-,-,-
    metrics = agreement_metrics(read_rankings(session.folder))
    assert metrics["feedback/pairwise_agreement"] == pytest.approx(4 / 6, abs=1e-12)
    assert metrics["feedback/agreement_comparisons"] == 6
    assert -1.0 <= metrics["feedback/krippendorff_alpha"] <= 1.0
    assert client.get("/batch").json()["pairs"] == 6


def test_a_bad_form_is_refused_with_the_fix(session):
    client = TestClient(create_app(session, TOKEN), cookies={label.TOKEN_COOKIE: TOKEN})
    r = client.post("/rank", data={"prompt_id": "p1", "rater": "ann", "rank_0": 1})
    assert r.status_code == 400 and "give every response a place 1..4" in r.text
    assert client.post("/rank", data={"prompt_id": "nope", "rater": "ann"}).status_code == 400
    assert not (session.folder / PAIRS_FILE).exists()


def test_sampled_text_is_pii_redacted(monkeypatch, tmp_path):
    monkeypatch.setattr(label, "load_tokenizer", lambda *a, **k: None)

    class Model:
        def to(self, _):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(label, "load_causal_lm", lambda *a, **k: Model())
    draws = iter([["write to ann@example.com\x1f", ""], ["call 555-123-4567 now\u202e"]])
    monkeypatch.setattr(label, "sample_responses", lambda *a, **k: next(draws))
    items = label.sample_items("unused", ["Customer: I am bob@example.org\nAgent:"], 2, 8, 1.0, 0)
    assert items[0].prompt == "Customer: I am [EMAIL]\nAgent:"
    # the empty one drawn again; control and bidi-override characters removed
    assert items[0].responses == ("write to [EMAIL]", "call [PHONE] now")
