"""Process defaults for offline, quiet runs (each only set when the user has not set it)."""

from __future__ import annotations

import importlib
import logging
import os
import threading

OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def set_offline_defaults() -> None:
    """Set the offline/telemetry defaults (``OFFLINE_DEFAULTS``) the user has not set."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_defaults() -> None:
    """Set offline/telemetry defaults and silence per-file progress bars of HF libraries."""
    set_offline_defaults()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # MLflow announces every start and stop of a stage run's system metrics (and the GPU it skips) at INFO
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def start_prefect_server_early(prewarm: tuple[str, ...] = ()) -> None:
    """Start Prefect's temporary server now, in the background, so that it boots while the caller imports torch and
    the flows; the first flow then waits only for what is left of the boot.

    ``prewarm`` names modules the flow will import later anyway (great_expectations, ~1.4 s after the flows, at the validate stage):
    if the boot is still under way when the flow starts, the wait is spent importing them.

    Without PREFECT_API_URL, a flow starts a temporary local server at its first call and waits for it: about 9 s
    on 2 cores, after the ~6 s of importing the pipeline. Prefect keeps one such server per process
    (``SubprocessASGIServer()`` returns the same instance, and the flow calls its ``start()``); this starts it in a
    thread and makes that instance's ``start()`` wait for the thread, then run Prefect's own ``start()``, which
    returns at once if the server came up and otherwise starts it again and raises Prefect's own error. With
    PREFECT_API_URL set it does nothing.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return
    prefect_start = server.start
    thread = threading.Thread(target=_start_quietly, args=(prefect_start,), name="prefect-server", daemon=True)

    def start(timeout: int | None = None) -> None:
        if thread.is_alive():
            for module in prewarm:
                importlib.import_module(module)
        thread.join()
        prefect_start(timeout)

    server.start = start  # the instance's, for the flow's call; Prefect's class is untouched
    thread.start()


def _start_quietly(start) -> None:
    """Prefect's ``start()``; an error is left for the flow's own call to raise."""
    try:
        start()
    except Exception:  # noqa: BLE001 - reported by the flow's call, which starts the server again
        pass
