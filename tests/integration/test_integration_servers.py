"""Integration against real servers: scripts/serve.sh, `prefect deploy`, a worker, MLflow over HTTP.

The servers start once per session (tests/integration/servers.py): a Prefect server, an MLflow
tracking server with a SQLite backend and proxied artifacts, the process work pool,
every deployment of prefect.yaml and a worker. The worker runs the ``smoke``
deployment; the tests then read what it left through the two servers' HTTP APIs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import (
    CHAMPION,
    REGISTERED_MODEL,
    REPO,
    WORK_POOL,
    LiveServers,
    SmokeOutcome,
)

from rlhf.config import PipelineConfig, PromotionConfig
from rlhf.infra.progress import StageProgress
from tasks.monitor import ALERT_EVENT, MonitorResult, alert_event

PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text())
STAGES = {"validate", "sft", "reward", "ppo", "evaluate", "register"}
TRIGGER_TIMEOUT_S = 120  # an event to a flow run takes seconds; the bound only keeps a broken trigger from hanging


def deployment_specs() -> dict[str, dict]:
    """prefect.yaml's deployments by name."""
    return {d["name"]: d for d in PREFECT_YAML["deployments"]}


def deployed_specs() -> dict[str, dict]:
    """The deployments `make serve` deploys: those whose flow file exists (serve.sh skips the others)."""
    return {
        name: spec for name, spec in deployment_specs().items() if (REPO / spec["entrypoint"].split(":")[0]).is_file()
    }


def server_deployments(servers: LiveServers) -> dict[str, dict]:
    """The deployments on the Prefect server, by deployment name."""
    return {d["name"]: d for d in servers.post("/deployments/filter")}


def test_deployment_specs_schedules_and_limits():
    """Weekly pipeline, hourly monitor, on-demand promotion; one run at a time for trainings."""
    specs = deployment_specs()
    assert {"rlhf-pipeline", "smoke", "drift-monitor", "promote"} <= set(specs)
    assert specs["rlhf-pipeline"]["schedules"][0]["cron"] == "0 2 * * 1"
    assert specs["drift-monitor"]["schedules"][0]["cron"] == "0 * * * *"
    assert all("schedules" not in specs[name] for name in ("promote", "smoke", "retrain-on-drift"))
    assert specs["drift-monitor"]["entrypoint"] == "flows/monitor.py:drift_monitor"
    assert specs["promote"]["entrypoint"] == "flows/promote.py:promote"
    assert PromotionConfig.model_validate(specs["promote"]["parameters"]["config"]).require_approval  # the gate
    for name in ("rlhf-pipeline", "smoke", "retrain-on-drift"):  # every training: one at a time, on one queue
        assert specs[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        assert specs[name]["work_pool"]["work_queue_name"] == "training"
    assert {spec["work_pool"]["name"] for spec in specs.values()} == {WORK_POOL}


@pytest.mark.slow
@pytest.mark.integration
def test_deploy_all_creates_every_deployment_with_a_form(live_servers: LiveServers):
    """Every deployable entry is on the server, with its limit, queue and a parameter form from the pydantic models."""
    on_server = server_deployments(live_servers)
    assert set(on_server) == set(deployed_specs())
    for name in ("rlhf-pipeline", "smoke"):
        deployment = on_server[name]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert (deployment["work_pool_name"], deployment["work_queue_name"]) == (WORK_POOL, "training")
        schema = deployment["parameter_openapi_schema"]
        definitions = schema.get("definitions") or schema.get("$defs")
        # The UI renders this schema as a form: nested sections with each field's description.
        assert definitions["PPOConfig"]["properties"]["kl_coef"]["description"] == (
            PipelineConfig.model_fields["ppo"].annotation.model_fields["kl_coef"].description
        )
    queues = {q["name"]: q for q in live_servers.post(f"/work_pools/{WORK_POOL}/queues/filter")}
    assert queues["training"]["concurrency_limit"] == 1
    assert queues["registry"]["concurrency_limit"] == 1


@pytest.mark.slow
@pytest.mark.integration
def test_schedules_created_future_runs(live_servers: LiveServers):
    """The weekly pipeline (and the hourly monitor, once deployed) have scheduled runs in the future."""
    on_server = server_deployments(live_servers)
    now = datetime.now(UTC)
    scheduled = [name for name, spec in deployed_specs().items() if spec.get("schedules")]
    assert "rlhf-pipeline" in scheduled
    for name in scheduled:
        runs = live_servers.post(
            "/flow_runs/filter",
            {
                "deployments": {"id": {"any_": [on_server[name]["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC",
            },
        )
        # A run that came due while the servers were up stays Scheduled (late) when no worker
        # polls its queue, so only the future ones are counted.
        starts = [s for r in runs if (s := datetime.fromisoformat(r["expected_start_time"])) > now]
        assert len(starts) >= 3, f"{name}: {len(starts)} scheduled runs in the future of {len(runs)}"
        if name == "rlhf-pipeline":  # Mondays 02:00 UTC, one week apart
            assert all(s.weekday() == 0 and (s.hour, s.minute) == (2, 0) for s in starts)
            assert starts[1] - starts[0] == timedelta(days=7)


@pytest.mark.slow
@pytest.mark.integration
def test_worker_runs_smoke_deployment_to_completed(live_servers: LiveServers, smoke_outcome: SmokeOutcome):
    """`prefect deployment run rlhf-pipeline/smoke` is picked up by the worker and completes."""
    flow_run = smoke_outcome.flow_run
    assert flow_run["state_type"] == "COMPLETED"
    assert flow_run["deployment_id"] == server_deployments(live_servers)["smoke"]["id"]
    assert (flow_run["work_pool_name"], flow_run["work_queue_name"]) == (WORK_POOL, "training")
    assert flow_run["parameters"] == deployment_specs()["smoke"]["parameters"]


@pytest.mark.slow
@pytest.mark.integration
def test_registry_over_http_has_the_version_with_its_alias(live_servers: LiveServers, smoke_outcome: SmokeOutcome):
    """Over HTTP: the alias resolves to the smoke run's version, with stage runs, PPO metrics and served artifacts."""
    client = MlflowClient(live_servers.mlflow_url)
    version = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert version.version == smoke_outcome.version
    assert version.tags["lineage.pipeline_run_id"] == smoke_outcome.parent_run_id
    children = client.search_runs(
        [smoke_outcome.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{smoke_outcome.parent_run_id}'"
    )
    by_stage = {run.data.tags["rlhf.stage"]: run for run in children}
    assert set(by_stage) == STAGES
    kl_history = client.get_metric_history(by_stage["ppo"].info.run_id, "objective/kl")
    assert [m.step for m in kl_history] == [1, 2, 3, 4]
    # Artifacts travel through the server (mlflow-artifacts:/) into its --artifacts-destination.
    parent = client.get_run(smoke_outcome.parent_run_id)
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    config_text = Path(client.download_artifacts(smoke_outcome.parent_run_id, "config.yaml")).read_text()
    assert yaml.safe_load(config_text)["ppo"]["steps"] == 4
    stored = list((live_servers.mlflow_dir / "artifacts").rglob("config.yaml"))
    assert any(smoke_outcome.parent_run_id in str(path) for path in stored)


@pytest.mark.slow
@pytest.mark.integration
def test_stage_progress_is_a_progress_artifact_on_the_server(live_servers: LiveServers):
    """Inside a flow run, StageProgress keeps a progress artifact at the bar's percentage."""

    @flow(name="progress-check")
    def progress_check() -> str:
        with StageProgress("progress check", total=4, unit="step", min_interval_s=0) as progress:
            for step in range(4):
                progress.update(1, loss=f"{1.0 / (step + 1):.2f}")
                if step == 1:
                    half = live_servers.get(f"/artifacts/{progress.artifact_id}")["data"]
        return f"{progress.artifact_id} {half}"

    with temporary_settings({PREFECT_API_URL: live_servers.prefect_api}):
        artifact_id, half = progress_check().split()
    artifact = live_servers.get(f"/artifacts/{artifact_id}")
    assert (artifact["type"], artifact["key"]) == ("progress", "progress-check-progress")
    assert float(half) == 50.0
    assert artifact["data"] == 100.0
    assert artifact["description"] == "progress check: 4/4 steps (loss=0.25)"


def retraining_runs(servers: LiveServers, deployment_id: str) -> Counter:
    """How many runs of the retraining deployment exist, by the version they retrain (retrain_of)."""
    runs = servers.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    return Counter(run["parameters"].get("retrain_of") for run in runs)


def wait_for_retraining_runs(servers: LiveServers, deployment_id: str, expected: dict[str, int]) -> Counter:
    """Poll until the deployment has at least the expected runs per version; the counts then."""
    deadline = time.monotonic() + TRIGGER_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = retraining_runs(servers, deployment_id)
        if all(runs[uri] >= n for uri, n in expected.items()):
            return runs
        time.sleep(1)
    raise AssertionError(
        f"expected runs {expected} of the retraining deployment, found {dict(runs)} after {TRIGGER_TIMEOUT_S} s;"
        f" Prefect server log:\n{servers.log_tail('prefect-server')}"
    )


def send_events(servers: LiveServers, events: list[Event]) -> None:
    """Emit events to the live server in this order (each one acknowledged before the next is sent)."""

    async def send() -> None:
        async with PrefectEventsClient(api_url=servers.prefect_api, checkpoint_every=1) as client:
            for event in events:
                await client.emit(event)

    asyncio.run(send())


@pytest.mark.slow
@pytest.mark.integration
def test_drift_alert_starts_retraining_once_per_version_and_cooldown(live_servers: LiveServers):
    """`prefect deploy --all` registered the retrain-on-drift trigger: the monitor's alert event starts one run
    of the deployment for the alerting version, a second alert of that version inside the cooldown starts none,
    another version's alert starts its own, and the first version's next alert after the cooldown starts one.

    Evidence is the flow runs the trigger creates (with retrain_of from the event's payload); the worker also
    picks them up, and each fails fast at the first step, since the registry has no such version.
    """
    spec = deployment_specs()["retrain-on-drift"]
    cooldown = timedelta(seconds=spec["triggers"][0]["within"])
    deployment = server_deployments(live_servers)["retrain-on-drift"]
    automations = live_servers.post("/automations/filter")
    (automation,) = [a for a in automations if a["name"] == spec["triggers"][0]["name"]]
    assert automation["enabled"] and automation["trigger"]["expect"] == [ALERT_EVENT]
    assert automation["trigger"]["within"] == cooldown.total_seconds()
    (action,) = automation["actions"]
    assert (action["type"], action["deployment_id"]) == ("run-deployment", deployment["id"])
    assert (deployment["work_pool_name"], deployment["work_queue_name"]) == (WORK_POOL, "training")

    def alert(version: str, window: int, **fields) -> Event:
        result = MonitorResult(REGISTERED_MODEL, version, f"traffic/window_{window:04d}.jsonl", window, False, True)
        return Event(**alert_event(result), **fields)  # what the monitor's drift-alert task emits

    a, b = "9001", "9002"  # versions the registry does not have: the runs the worker picks up end quickly
    uri_a, uri_b = f"models:/{REGISTERED_MODEL}/{a}", f"models:/{REGISTERED_MODEL}/{b}"
    first = alert(a, 1)
    send_events(live_servers, [first])
    assert wait_for_retraining_runs(live_servers, deployment["id"], {uri_a: 1})[uri_a] == 1

    # An hour later, the same version alerts again (inside the cooldown); then another version alerts. The
    # second version's event follows the first's, so the server evaluates the repeat alert before it.
    again = alert(a, 2, occurred=first.occurred + timedelta(hours=1))
    send_events(live_servers, [again, alert(b, 2, occurred=again.occurred, follows=again.id)])
    runs = wait_for_retraining_runs(live_servers, deployment["id"], {uri_b: 1})
    assert (runs[uri_a], runs[uri_b]) == (1, 1), runs

    # The trigger's window counts the events' own time: an alert of the first version after the cooldown
    # starts a retraining again.
    send_events(live_servers, [alert(a, 3, occurred=first.occurred + cooldown + timedelta(hours=1))])
    runs = wait_for_retraining_runs(live_servers, deployment["id"], {uri_a: 2})
    assert (runs[uri_a], runs[uri_b]) == (2, 1), runs
    assert set(runs) == {uri_a, uri_b}  # every run names the version that alerted, from the event's payload
