"""The Prefect server's zombie-run automation: a flow run whose heartbeats stop ends Crashed.

A flow run emits ``prefect.flow-run.heartbeat`` every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
seconds (`make serve` sets 30 for its worker). When its process is killed (``kill -9``, out of
memory, a lost machine) nothing reports a final state; this automation, the one Prefect's docs
give ("How to detect and respond to zombie flows"), sets it to Crashed once no heartbeat or final
state arrived for ``MISSED_BEATS`` intervals. scripts/serve.sh runs ``python -m flows.automations``.
A temporary local server (`rlhf run` without PREFECT_API_URL) lives only as long as the process that
started it, so nothing watches a killed run there: the next pipeline start ends its flow run
(tasks.common.crash_flow_runs), as it ends the MLflow runs.
"""

from __future__ import annotations

import os
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "rlhf-crash-zombie-flow-runs"
MISSED_BEATS = 3
"""A flow run is a zombie once this many heartbeat intervals passed with no heartbeat and no final state."""
DEFAULT_HEARTBEAT_S = 30
"""Prefect's flow-run heartbeat interval `make serve` uses (Prefect's own default is 180 s; 30 is its minimum)."""


def heartbeat_frequency_s() -> int:
    """``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` as the flow runs see it, else ``DEFAULT_HEARTBEAT_S``."""
    raw = os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or str(DEFAULT_HEARTBEAT_S)
    if not raw.isdigit() or int(raw) < 30:
        raise ValueError(
            f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={raw!r} is not a whole number of seconds >= 30 (Prefect's minimum). "
            f"Fix: unset it (default {DEFAULT_HEARTBEAT_S}) or set e.g. 30"
        )
    return int(raw)


def zombie_automation(heartbeat_s: int) -> Automation:
    """The automation: after a heartbeat, expect another heartbeat or a final state within MISSED_BEATS beats."""
    return Automation(
        name=NAME,
        description=f"Flow runs with no heartbeat for {MISSED_BEATS} x {heartbeat_s} s end Crashed (docs/reliability.md)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=MISSED_BEATS * heartbeat_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {MISSED_BEATS} x {heartbeat_s} s: the flow run's process is gone "
                "(kill -9, out of memory, a lost machine)",
            )
        ],
    )


def ensure_zombie_automation(heartbeat_s: int | None = None) -> Automation:
    """Create the automation on the current Prefect API, or bring an existing one up to date; returns it."""
    wanted = zombie_automation(heartbeat_s or heartbeat_frequency_s())
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # not there yet
        return wanted.create()
    wanted.id = existing.id
    wanted.update()
    return wanted


if __name__ == "__main__":
    automation = ensure_zombie_automation()
    print(f"serve: automation {automation.name} ({automation.description})")
