"""The two UIs in headless Chromium, against the servers and the smoke run of tests/integration/servers.py.

MLflow UI: the experiment with the smoke pipeline's runs, the PPO run's metrics, and the
registered policy with its ``champion`` alias. Prefect UI: the deployments and the
completed smoke flow run. Each page is saved as a screenshot (tests/artifacts or
$RLHF_TEST_ARTIFACTS) after its assertions passed, so the picture shows what was checked.

Needs Debian's chromium and Playwright for Python (scripts/install-chromium.sh). Without
them the tests skip locally and fail where CI=1/true or RLHF_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import (
    CHAMPION,
    REGISTERED_MODEL,
    LiveServers,
    SmokeOutcome,
    artifacts_dir,
)

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000
PPO_METRICS = ("objective/kl", "objective/kl_coef", "objective/scores", "objective/rlhf_reward")
STAGES = ("validate", "sft", "reward", "ppo", "evaluate", "register")


def browser_required() -> bool:
    """CI (CI=1/true) or RLHF_REQUIRE_BROWSER=1: a missing browser is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or os.environ.get("RLHF_REQUIRE_BROWSER") == "1"


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run 'sudo scripts/install-chromium.sh' (Debian's chromium package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is missing: run 'scripts/install-chromium.sh' (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def browser_page() -> Iterator:
    """A headless Chromium page (1440x900); skips, or fails in CI, when the browser is missing.

    Module-scoped on purpose: while Playwright's sync API is open, its event loop counts as
    running in the main thread, and Prefect's sync-or-async calls (``to_deployment``,
    ``resume_flow_run``) in later tests would return coroutines instead of running.
    """
    reason = missing_browser()
    if reason:
        if browser_required():
            pytest.fail(f"browser tests are required here (CI or RLHF_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def visible(page, text: str):
    """Wait until an element whose whole text is ``text`` is visible; its locator."""
    locator = page.get_by_text(text, exact=True).first
    locator.wait_for(state="visible")
    return locator


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot with the test artifacts."""
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def close_mlflow_assistant(page) -> None:
    """Close MLflow's assistant side panel if it is open, so screenshots show the page itself."""
    close = page.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()


def ppo_run_id(servers: LiveServers, outcome: SmokeOutcome) -> str:
    """The smoke pipeline's PPO stage run."""
    (ppo,) = MlflowClient(servers.mlflow_url).search_runs(
        [outcome.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}' and tags.`rlhf.stage` = 'ppo'",
    )
    return ppo.info.run_id


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_ui_shows_experiment_and_stage_runs(
    browser_page, live_servers: LiveServers, smoke_outcome: SmokeOutcome
):
    """The experiment's runs table shows the smoke pipeline run and, expanded, one child run per stage."""
    page = browser_page
    page.goto(
        f"{live_servers.mlflow_url}/#/experiments/{smoke_outcome.experiment_id}/runs?workflowType=machine_learning"
    )
    parent = visible(page, f"pipeline-{smoke_outcome.flow_run['name']}")
    close_mlflow_assistant(page)
    row = page.get_by_role("row").filter(has=parent)
    row.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # expand the child runs
    for stage in STAGES:
        page.get_by_role("gridcell").get_by_text(stage, exact=True).first.wait_for(state="visible")
    assert screenshot(page, "mlflow-experiment-runs").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_ui_shows_ppo_metrics(browser_page, live_servers: LiveServers, smoke_outcome: SmokeOutcome):
    """The PPO run's overview lists its objective/* metrics; its charts plot the KL and its coefficient per step."""
    page = browser_page
    run_url = f"{live_servers.mlflow_url}/#/experiments/{smoke_outcome.experiment_id}/runs/{ppo_run_id(live_servers, smoke_outcome)}"
    page.goto(run_url)
    visible(page, "ppo")
    close_mlflow_assistant(page)
    # The metrics table scrolls inside the page: filter it so every asserted row is in the screenshot.
    page.get_by_placeholder("Search metrics").fill("objective/")
    for name in PPO_METRICS:
        visible(page, name)
    assert screenshot(page, "mlflow-ppo-metrics").stat().st_size > 0
    page.goto(f"{run_url}/model-metrics")
    page.get_by_placeholder("Search metric charts").fill("objective/kl")  # charts render only when in view
    for name in ("objective/kl", "objective/kl_coef"):
        visible(page, f"ppo ({name})")  # a chart's legend: run name (metric)
    assert screenshot(page, "mlflow-ppo-charts").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_ui_shows_registered_model_with_champion(
    browser_page, live_servers: LiveServers, smoke_outcome: SmokeOutcome
):
    """The registry page of the policy shows the smoke run's version carrying the champion alias."""
    page = browser_page
    page.goto(f"{live_servers.mlflow_url}/#/models/{REGISTERED_MODEL}")
    visible(page, REGISTERED_MODEL)
    close_mlflow_assistant(page)
    row = page.get_by_role("row").filter(has=page.get_by_text(f"Version {smoke_outcome.version}", exact=True))
    row.get_by_text(re.compile(rf"^@\s*{CHAMPION}$")).wait_for(state="visible")  # the alias tag: "@ champion"
    assert screenshot(page, "mlflow-registered-model").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.integration
def test_prefect_ui_shows_deployments(browser_page, live_servers: LiveServers, smoke_outcome: SmokeOutcome):
    """The deployments page lists the weekly pipeline and the smoke deployment."""
    page = browser_page
    page.goto(f"{live_servers.prefect_url}/deployments")
    for name in ("rlhf-pipeline", "smoke"):
        visible(page, name)
    assert screenshot(page, "prefect-deployments").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.integration
def test_prefect_ui_shows_completed_smoke_run(browser_page, live_servers: LiveServers, smoke_outcome: SmokeOutcome):
    """The smoke flow run's page shows it Completed and lists the task run of every stage."""
    page = browser_page
    page.goto(f"{live_servers.prefect_url}/runs/flow-run/{smoke_outcome.flow_run_id}")
    visible(page, smoke_outcome.flow_run["name"])
    visible(page, "Completed")
    for task_name in ("validate", "sft", "reward", "ppo", "evaluate", "register"):
        page.get_by_text(re.compile(rf"^{task_name}-[0-9a-z]+$")).first.wait_for(state="visible")
    assert screenshot(page, "prefect-smoke-run").stat().st_size > 0
