"""Drift monitoring of the champion on the latest production-traffic window (scheduled in prefect.yaml).

Wiring only: tasks/monitor.py measures the window against the version's baseline,
logs ``drift/*`` to the ``rlhf-monitoring`` experiment (step = window index) and
flags the run and the model version on a breach; the alert task then emits the
Prefect event ``rlhf.drift.alert`` and shows the diagnosis report as a markdown
artifact. Retraining is not started here: the ``retrain-on-drift`` deployment's
trigger (prefect.yaml) starts it on the event, with a cooldown per model version.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from rlhf.config import MonitorConfig
from tasks.monitor import MonitorResult, alert_task, monitor_task


@flow(name="rlhf-drift-monitor", log_prints=True)
def drift_monitor(config: MonitorConfig = MonitorConfig()) -> MonitorResult:
    """Test the latest traffic window against the champion's baseline; alert and diagnose on drift."""
    logger = get_run_logger()
    result = monitor_task(config)
    if result.skipped:
        logger.info(
            "window %d (%s) was already monitored; set force=True to redo it", result.window_index, result.window_path
        )
        return result
    logger.info(
        "%s v%s window %d: %s",
        result.model_name,
        result.version,
        result.window_index,
        f"ALERT, likely {result.cause} ({', '.join(result.breached)})" if result.alert else "no drift",
    )
    if result.alert:
        alert_task(result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    drift_monitor()
