"""Process defaults for offline, quiet runs (each only set when the user has not set it)."""

from __future__ import annotations

import logging
import os

OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def quiet_defaults() -> None:
    """Set offline/telemetry defaults and silence per-file progress bars of HF libraries."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # MLflow announces every start and stop of a stage run's system metrics (and the GPU it skips) at INFO
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
