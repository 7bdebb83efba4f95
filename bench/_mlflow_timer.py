"""Time spent inside MLflow calls, by wrapping MLflow's public entry points (benchmarks only).

``install()`` wraps every public function of the ``mlflow`` fluent API, every
public method of ``MlflowClient``, ``mlflow.artifacts.download_artifacts``,
``mlflow.pyfunc.log_model`` and the end of a ``with mlflow.start_run()`` block.
A depth counter makes nested calls (a fluent call that goes through the client)
count once. ``TIMER.seconds`` is the wall time spent inside them, ``TIMER.calls``
the number of outermost calls.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time


class _Timer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.by_name: dict[str, float] = {}
        self._local = threading.local()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth:
                self._local.depth = depth + 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._local.depth = depth
            self._local.depth = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._local.depth = 0
                self.seconds += dt
                self.calls += 1
                self.by_name[name] = self.by_name.get(name, 0.0) + dt

        wrapper.__bench_wrapped__ = True
        return wrapper


TIMER = _Timer()
_SKIP = {"get_tracking_uri", "get_registry_uri", "active_run", "is_tracking_uri_set"}


def install() -> _Timer:
    """Wrap MLflow's entry points once; returns the timer."""
    import mlflow
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.client import MlflowClient
    from mlflow.tracking.fluent import ActiveRun

    if getattr(mlflow.log_metrics, "__bench_wrapped__", False):
        return TIMER
    for name in dir(mlflow):
        obj = getattr(mlflow, name)
        if name.startswith("_") or name in _SKIP or not inspect.isfunction(obj):
            continue
        setattr(mlflow, name, TIMER.wrap(f"mlflow.{name}", obj))
    mlflow.artifacts.download_artifacts = TIMER.wrap(
        "artifacts.download_artifacts", mlflow.artifacts.download_artifacts
    )
    mlflow.pyfunc.log_model = TIMER.wrap("pyfunc.log_model", mlflow.pyfunc.log_model)
    for name, obj in list(vars(MlflowClient).items()):
        if not name.startswith("_") and inspect.isfunction(obj):
            setattr(MlflowClient, name, TIMER.wrap(f"client.{name}", obj))
    ActiveRun.__exit__ = TIMER.wrap("end_run", ActiveRun.__exit__)
    return TIMER
