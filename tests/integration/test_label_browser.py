"""The ranking page (`rlhf label`) in headless Chromium: a rater ranks the tiny model's samples on the page, and
the pairs are found in the new feedback batch, which passes the validation gate. Screenshots under tests/artifacts
(or $RLHF_TEST_ARTIFACTS) after the assertions they illustrate.

The responses come from the built-in tiny base model (sample_items, as `rlhf label` uses after resolving a registered
version); resolving a version through the registry is covered by the feedback flow test. Needs Debian's chromium and
Playwright (scripts/install-chromium.sh); skips without them, fails where CI=1/true or RLHF_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import pytest
from servers import artifacts_dir, free_port
from test_browser_ui import CHROMIUM, LAUNCH_ARGS, browser_required, missing_browser

from rlhf.builtin.model import resolve_base_model
from rlhf.builtin.task import resolve_data_paths
from rlhf.config import PipelineConfig
from rlhf.feedback.batches import PAIRS_FILE, read_manifest
from tasks.label import LabelItem, create_app, label_prompts, open_session, sample_items

TOKEN = "rater-token-for-the-browser-test"
INJECTED = "<img src=x onerror=alert(1)> refund sent"
VALIDATION_TIMEOUT_MS = 600_000  # GX builds a context per validation: a minute or more on a loaded 2-core machine


@pytest.mark.slow
def test_a_rater_ranks_on_the_page_and_the_pairs_land_in_a_validated_batch(tmp_path):
    reason = missing_browser()
    if reason:
        if browser_required():
            pytest.fail(f"browser tests are required here (CI or RLHF_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(reason)
    import uvicorn
    from playwright.sync_api import sync_playwright

    # 1. a session: k=4 samples of the tiny model on two training prompts, and one item with markup in a response
    cfg = PipelineConfig(feedback={"dir": str(tmp_path / "feedback")})
    model_dir = resolve_base_model(cfg.model.base_model, tmp_path / "base-models", 0)
    prompts = label_prompts(resolve_data_paths(cfg.data, tmp_path, 0)["prompts"], 1, 0)
    items = sample_items(model_dir, prompts, 4, 12, 1.0, 0)
    items.append(LabelItem("injected", "Customer: refund?\nAgent:", (INJECTED, " refund", " no", " sorry")))
    session = open_session(cfg, items, "models:/rlhf-policy/1", "test", now=datetime(2026, 12, 4, tzinfo=UTC))
    # 2. the page, served by uvicorn on 127.0.0.1 in a thread
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(session, TOKEN), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "uvicorn did not start within 60 s"
    shots = artifacts_dir()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(60_000)
            # 3. without the token: refused
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_text("Rater token required").first.wait_for()
            # 4. the rater's link: rank response 1 > 0 > 3 > 2 and save
            page.goto(f"http://127.0.0.1:{port}/?token={TOKEN}")
            page.get_by_role("heading", name="Rank the responses").wait_for()
            assert "token=" not in page.url
            page.fill("#rater", "ann")
            for i, place in enumerate(("2", "1", "4", "3")):
                page.select_option(f"#rank-{i}", place)
            page.screenshot(path=str(shots / "label-ranking-page.png"), full_page=True)
            page.click("#save")
            saved = page.locator("#saved")
            saved.wait_for()
            saved_text = saved.inner_text()
            # 5. the next prompt: markup in a response is shown as text, never as an element
            page.get_by_text(INJECTED).first.wait_for()
            assert page.locator("img").count() == 0
            page.screenshot(path=str(shots / "label-escaped-output.png"), full_page=True)
            # 6. validate and save the data set
            page.click("#validate")
            page.locator("#verdict").wait_for(timeout=VALIDATION_TIMEOUT_MS)
            assert page.locator("#verdict").inner_text() == "passes the validation gate"
            page.screenshot(path=str(shots / "label-validated-batch.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    # 7. the pairs are in the batch, with provenance, and the batch passed the gate
    manifest = read_manifest(session.folder)
    assert manifest.validated, manifest.failures
    rows = [json.loads(line) for line in (session.folder / PAIRS_FILE).read_text().splitlines()]
    r = items[0].responses
    expected = {(r[1], r[0]), (r[1], r[3]), (r[1], r[2]), (r[0], r[3]), (r[0], r[2]), (r[3], r[2])}
    distinct = len(set(r)) == 4  # the tiny model may sample the same text twice: that pair is no preference
    assert {(row["chosen"], row["rejected"]) for row in rows} <= expected
    assert saved_text == f"Saved: {len(rows)} pairs."
    assert len(rows) == 6 if distinct else len(rows) >= 3
    assert {(row["rater"], row["model_version"], row["source"]) for row in rows} == {
        ("ann", "models:/rlhf-policy/1", "ranking")
    }
    assert manifest.pairs == len(rows) and manifest.rankings == 1
