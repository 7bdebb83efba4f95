"""MLflow conventions: one parent run per pipeline run, one child run per stage.

Stages hand each other references (run ids and artifact URIs), never live
objects, so any stage can be re-run alone against a finished parent run.

Faults: ``check_tracking_store`` fails fast, naming the URI and the fix, when the
store cannot be reached at the start of a run (MLflow's own client would retry for
minutes first). Mid-run, MLflow's HTTP client retries with exponential backoff
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``: 7
retries, factor 2, about 4 minutes by default); what still fails is recognised by
``is_transient_tracking_error`` for the stage tasks' Prefect retries. Logged
checkpoints carry a sha256 manifest (rlhf/infra/integrity.py) that ``download`` verifies,
and params pass through ``rlhf.infra.security.mask_secrets``.

Every pipeline and stage run is tagged with its owner process (``rlhf.owner_host``,
``rlhf.owner_pid``) and carries a heartbeat (``rlhf.heartbeat``, epoch seconds) that a
background thread rewrites every ``heartbeat_interval_s()`` seconds, however long a
training step takes. ``end_dead_runs`` marks ``KILLED`` the runs still ``RUNNING`` whose
owner is gone (``kill -9``, an OOM kill, a lost machine), as MLflow cannot know itself:
on this host, the pid no longer exists (or was reused); on another host, the heartbeat
is older than ``STALE_AFTER_BEATS`` of that run's intervals.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import psutil
from mlflow.tracking import MlflowClient

from rlhf.infra.integrity import fingerprint_path, verify_manifest, write_manifest
from rlhf.infra.security import mask_secrets, mask_value

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_ARTIFACT_DIR = "mlartifacts"
PREFLIGHT_TIMEOUT_S = 10.0
"""Seconds the start-of-run check waits for a tracking server's /health."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
"""The experiment kind MLflow's UI opens in its Model training view (without the tag, MLflow 3 may infer
GenAI and file the stage runs under "Evaluation runs")."""
CHECKPOINT_URI_TAG = "rlhf.checkpoint_uri"
"""Tag of a checkpoint's LoggedModel: the artifact URI of the checkpoint folder in its run."""
DIGEST_CHARS = 36
"""The longest dataset digest MLflow's store holds (the full fingerprint is the input's ``fingerprint`` tag)."""


LOCAL_UI_URL = "http://127.0.0.1:5000"
"""Where `make mlflow-ui` serves a local store (sqlite, file or a database URI): the UI links point there."""


def run_url(experiment_id: str, run_id: str, uri: str | None = None) -> str:
    """The MLflow UI page of a run: ``<server>/#/experiments/<id>/runs/<run id>``.

    A tracking server (http/https) serves its own UI; credentials in its URI are left out of
    the link. Any other store is shown by `make mlflow-ui` at ``LOCAL_UI_URL``.
    """
    parts = urlsplit(uri or tracking_uri())
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    else:
        base = LOCAL_UI_URL
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or written; the message names the URI and the fix."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite store in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_store(uri: str | None = None, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Fail fast, before any training, when the tracking store is unreachable; returns the URI checked.

    http(s): GET <uri>/health within ``timeout_s`` (no retries). sqlite: the database
    opens (its folder exists and is writable). Other schemes (databricks, ...) are left
    to MLflow.
    """
    uri = uri or tracking_uri()
    shown = mask_value(uri)
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
        except requests.RequestException as e:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} is unreachable ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
                "Fix: start it (`make serve`, or `mlflow server --host 127.0.0.1 --port 5000`), point "
                "MLFLOW_TRACKING_URI at a running server, or unset MLFLOW_TRACKING_URI to use the local store "
                f"{DEFAULT_TRACKING_URI}"
            ) from None
        if response.status_code != 200:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} answered /health with HTTP {response.status_code}, not 200: it is "
                "up but not healthy (or the URL is not an MLflow server). Fix: check the server's log, or point "
                "MLFLOW_TRACKING_URI at the right address"
            )
        check_credentials(uri, timeout_s)
    elif scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        folder = Path(path).resolve().parent
        problem = None
        if not folder.is_dir():
            problem = f"its folder {folder} does not exist"
        elif not os.access(folder, os.W_OK):
            problem = f"its folder {folder} is not writable"
        else:
            try:
                sqlite3.connect(path, timeout=timeout_s).close()
            except sqlite3.Error as e:
                problem = f"sqlite cannot open it ({e})"
        if problem:
            raise TrackingUnavailable(
                f"MLflow tracking store {shown}: {problem}. Fix: create the folder or make it writable, or set "
                f"MLFLOW_TRACKING_URI to another store (unset it for {DEFAULT_TRACKING_URI} in the working folder)"
            )
    return uri


def check_credentials(uri: str, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Fail fast when a tracking server with authentication (MLflow's basic-auth app) refuses this process:
    one authenticated request with the credentials MLflow's client sends (MLFLOW_TRACKING_USERNAME/PASSWORD,
    or MLFLOW_TRACKING_TOKEN). A server without authentication answers it like any other."""
    import requests

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        response = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=(user, password) if user and password else None,
            headers={"Authorization": f"Bearer {token}"} if token and not (user and password) else None,
            timeout=timeout_s,
        )
    except requests.RequestException:
        return  # /health answered a moment ago; a failure here is left to MLflow's retries
    if response.status_code in (401, 403):
        sent = f"user {user!r} and MLFLOW_TRACKING_PASSWORD" if user and password else "no credentials"
        raise TrackingUnavailable(
            f"MLflow tracking server {mask_value(uri)} requires a login and refused {sent} (HTTP "
            f"{response.status_code}). Fix: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD with an "
            "account of that server (for `make serve`: the ones it was started with; docs/deployments.md, "
            '"A shared server")'
        )


def is_transient_tracking_error(exc: BaseException | None) -> bool:
    """Whether an exception (or its cause) is a lost connection or timeout to the tracking store."""
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(
            exc,
            (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError),
        ):
            return True
        if isinstance(exc, MlflowException) and (
            exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
            or any(
                m in str(exc)
                for m in (
                    "Max retries exceeded",
                    "Connection refused",
                    "Connection aborted",
                    "Read timed out",
                    "database is locked",
                )
            )
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def log_params(params: dict[str, Any]) -> None:
    """mlflow.log_params with credential-like names and values masked (rlhf.infra.security)."""
    mlflow.log_params(mask_secrets(params))


def setup_experiment(name: str) -> str:
    """Point MLflow at the tracking store and return the experiment id (created if new)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind the user chose in the UI stays
            MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep artifacts beside the local store, not wherever the process happens to run.
        artifact_location = Path(LOCAL_ARTIFACT_DIR).resolve().as_uri()
    return mlflow.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    )


OWNER_HOST, OWNER_PID = "rlhf.owner_host", "rlhf.owner_pid"
HEARTBEAT_TAG, HEARTBEAT_INTERVAL_TAG = "rlhf.heartbeat", "rlhf.heartbeat_interval_s"
HEARTBEAT_INTERVAL_S = 30.0
"""Seconds between two heartbeats of a running pipeline or stage run (``RLHF_HEARTBEAT_S`` overrides it)."""
STALE_AFTER_BEATS = 5
"""A RUNNING run of another host whose heartbeat is older than this many of its own intervals (2.5 minutes by
default) is taken as dead: ended KILLED at the next pipeline start, and a PPO run with the same inputs resumes it.
Five beats ride out a tracking server that is briefly unreachable or slow, not a dead machine for long."""
logger = logging.getLogger(__name__)


def heartbeat_interval_s() -> float:
    """The heartbeat interval this process writes with: ``RLHF_HEARTBEAT_S`` or ``HEARTBEAT_INTERVAL_S``."""
    raw = os.environ.get("RLHF_HEARTBEAT_S") or str(HEARTBEAT_INTERVAL_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ValueError(
            f"RLHF_HEARTBEAT_S={raw!r} is not a number of seconds in (0, 3600]. Fix: unset it (default "
            f"{HEARTBEAT_INTERVAL_S:.0f}) or set it to e.g. 30"
        )
    return value


def owner_tags() -> dict[str, str]:
    """The tags that name the process executing a run, with its first heartbeat (end_dead_runs reads them)."""
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(os.getpid()),
        HEARTBEAT_TAG: f"{time.time():.0f}",
        HEARTBEAT_INTERVAL_TAG: f"{heartbeat_interval_s():g}",
    }


@contextmanager
def heartbeat(run_id: str) -> Iterator[None]:
    """Rewrite the run's ``rlhf.heartbeat`` tag from a background thread every ``heartbeat_interval_s()`` seconds
    while the block runs, so a slow step never looks like a dead process. A failed write is logged and retried at
    the next beat (MLflow's client already retries each request)."""
    interval, client, stop = heartbeat_interval_s(), MlflowClient(), threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as e:  # a lost connection must not end the run; the next beat tries again
                logger.warning("heartbeat of MLflow run %s not written: %s", run_id, e)

    thread = threading.Thread(target=beat, name=f"rlhf-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 1)


def heartbeat_stale(run: mlflow.entities.Run, now: float | None = None) -> bool:
    """Whether a run's last heartbeat (``rlhf.heartbeat``, else PPO's older ``ppo.heartbeat``, else its start) is
    older than ``STALE_AFTER_BEATS`` of the interval it was written with."""
    tags = run.data.tags
    last = float(tags.get(HEARTBEAT_TAG) or tags.get("ppo.heartbeat") or run.info.start_time / 1000)
    interval = float(tags.get(HEARTBEAT_INTERVAL_TAG) or HEARTBEAT_INTERVAL_S)
    return (now or time.time()) - last > STALE_AFTER_BEATS * interval


def owner_gone(run: mlflow.entities.Run) -> bool:
    """Whether a run's owner process no longer exists: on this host, its pid is gone (or now belongs to a younger
    process); on another host, its heartbeat is stale (``heartbeat_stale``). Runs of this process, or without
    owner tags, are never judged gone."""
    tags = run.data.tags
    host = tags.get(OWNER_HOST) or tags.get("ppo.owner_host")
    pid = int(tags.get(OWNER_PID) or tags.get("ppo.owner_pid") or 0)
    if not host or not pid:
        return False
    if host != socket.gethostname():
        return heartbeat_stale(run)
    if pid == os.getpid():
        return False
    try:
        return psutil.Process(pid).create_time() > run.info.start_time / 1000 + 1  # the pid was reused
    except psutil.Error:
        return True


def end_dead_runs(experiment_id: str) -> list[mlflow.entities.Run]:
    """Mark KILLED (tag rlhf.ended_by=dead-owner) the RUNNING runs of an experiment whose owner process is gone
    (``owner_gone``); returns them as they were. Called when a pipeline starts, so a kill -9 leaves no run RUNNING
    for good."""
    client = MlflowClient()
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        if owner_gone(run):
            client.set_tag(run.info.run_id, "rlhf.ended_by", "dead-owner")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run)
    return ended


@contextmanager
def stage_run(
    parent_run_id: str,
    stage: str,
    params: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """A child run named after the stage, nested under the pipeline's parent run, tagged with its owner process
    and kept fresh by a heartbeat thread (``heartbeat``) while it runs.

    ``inputs`` (split -> file) are logged as the run's dataset inputs, each with the fingerprint the validate
    stage put on the parent run (``data.fingerprint.<split>``; the file's own hash when the stage runs alone).
    ``system_metrics``: CPU, memory, disk, network and GPU as ``system/*``, sampled every 10 s
    (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``), for the training stages.
    """
    parent = MlflowClient().get_run(parent_run_id)
    with (
        mlflow.start_run(
            run_name=stage,
            experiment_id=parent.info.experiment_id,
            parent_run_id=parent_run_id,
            nested=True,
            tags={"rlhf.stage": stage, **owner_tags()},
            log_system_metrics=system_metrics,
        ) as run,
        heartbeat(run.info.run_id),
    ):
        if params:
            log_params(params)
        for split, path in (inputs or {}).items():
            log_dataset_input(path, split, parent.data.tags.get(f"data.fingerprint.{split}"))
        yield run


def log_dataset_input(path: str | Path, split: str, fingerprint: str | None = None) -> None:
    """A data file as a dataset input of the active run: named after the split, the data fingerprint as its
    digest (else the file's hash), the split as its context. Its source is the file's path."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    fingerprint = fingerprint or fingerprint_path(path)
    with warnings.catch_warnings():  # MLflow registers local files under two schemes ('' and file) and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source, name=split, digest=fingerprint[:DIGEST_CHARS])
    mlflow.log_input(dataset, context=split, tags={"fingerprint": fingerprint})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} for log_params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def download(artifact_uri: str, into: str | Path) -> Path:
    """Local copy of a logged artifact folder, verified against its SHA256SUMS when it has one.

    The copy goes into a new folder under ``into``, which the caller owns and removes (a
    ``tempfile.TemporaryDirectory``): the monitor downloads three models every hour, and
    nothing may pile up in /tmp. Raises rlhf.infra.integrity.CheckpointCorrupted when a
    file does not match the manifest.
    """
    Path(into).mkdir(parents=True, exist_ok=True)
    dst = tempfile.mkdtemp(prefix="artifact-", dir=into)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst))
    if local.is_dir():
        verify_manifest(local, required=False)
    return local


def log_checkpoint(
    local_dir: str | Path, artifact_path: str, metrics: dict[str, float] | None = None, step: int = 0
) -> str:
    """Write the folder's SHA256SUMS, log the folder to the active run; returns its artifact URI.

    The checkpoint is also an MLflow LoggedModel (external: its files stay in the run's artifacts, where
    stages and resumes read them), named ``<stage>-<folder>`` with the tag ``rlhf.checkpoint_uri``, so the
    UI's model view lists it; ``metrics`` are logged to the run linked to it by ``model_id``.
    """
    write_manifest(local_dir)
    mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)
    uri = f"{mlflow.get_artifact_uri()}/{artifact_path}"
    run_id = mlflow.active_run().info.run_id
    stage = MlflowClient().get_run(run_id).data.tags.get("rlhf.stage", "checkpoint")
    model = mlflow.create_external_model(
        name=f"{stage}-{Path(artifact_path).name}",
        source_run_id=run_id,
        model_type=stage,
        tags={CHECKPOINT_URI_TAG: uri},
    )
    if metrics:
        mlflow.log_metrics(metrics, step=step, model_id=model.model_id)
    return uri


def checkpoint_model_id(uri: str, run_id: str) -> str | None:
    """The LoggedModel of a checkpoint log_checkpoint logged from run `run_id`; None for a checkpoint
    logged without one (a local folder, a store the run is not in)."""
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = MlflowClient().get_run(run_id).info.experiment_id
        found = mlflow.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"tags.`{CHECKPOINT_URI_TAG}` = '{uri}'",
            max_results=1,
            output_format="list",
        )
    except MlflowException:
        return None
    return found[0].model_id if found else None
