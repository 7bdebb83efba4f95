"""Process defaults for offline, quiet runs (each only set when the user has not set it)."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import platform
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


MALLOC_MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from malloc's heap, larger ones (a real model's weights) from and back to the OS."""
MALLOC_TRIM_THRESHOLD = 256 << 20
"""Free memory at the top of the heap kept for the next step instead of handed back to the OS."""
MALLOC_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step; True if it was set.

    Every step allocates and frees the same activation-sized blocks (0.1-30 MB). glibc serves blocks over its mmap
    threshold with fresh pages and hands the heap's free top back to the OS past its trim threshold, so each step
    page-faults its memory in again: 7,000-10,000 minor faults a reward-model step of the tiny model, 1.2-1.8 s of
    system time per 100 steps. With blocks up to ``MALLOC_MMAP_THRESHOLD`` from the heap and up to
    ``MALLOC_TRIM_THRESHOLD`` of free heap kept, the same 100 steps take ~75,000 faults and 0.2-0.3 s, ~6% less wall
    time, and train the same weights to the last bit. That is a stage training in a fresh process (a reward model
    after a cached SFT stage, a launched process, the tests); in a whole ``rlhf run`` glibc has raised its own
    thresholds during SFT by the time the reward model trains, and the run's wall time did not change measurably
    (docs/benchmarks.md). glibc reads the same settings from ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
    at process start, but the ``rlhf`` command and a Prefect worker's flow run are already running Python when they
    could set them. Does nothing off glibc (macOS, musl, Windows) or where the user set malloc's own variables
    (``MALLOC_USER_SETTINGS``).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(name) for name in MALLOC_USER_SETTINGS):
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # setting either also turns off glibc's own adjustment (mmap threshold raised to the largest block freed, up to
    # 32 MiB; trim threshold to twice that)
    return bool(
        libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
    )


def quiet_defaults() -> None:
    """Set offline/telemetry defaults, keep freed memory for the next training step (``keep_freed_memory``) and
    silence per-file progress bars of HF libraries."""
    set_offline_defaults()
    keep_freed_memory()
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

    ``prewarm`` names modules the flow will import later anyway (great_expectations, ~1.4 s after the flows, at the
    validate stage): if the boot is still under way when the flow starts, the wait is spent importing them.

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
