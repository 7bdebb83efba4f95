"""PPO run ownership and resume: which interrupted run to continue, from which checkpoint.

Every PPO stage run is tagged with a resume key (a hash of its inputs), its owner's
host and pid, and a heartbeat a background thread rewrites (rlhf.infra.tracking.heartbeat).
A new run with the same key continues the latest interrupted one (failed, killed, or
RUNNING under a process that no longer exists) from its latest good checkpoint. Checkpoints are written to a local folder, logged
(manifest first) and only then deleted locally, so one the tracking store never
received is resumed from disk. A corrupted checkpoint is refused and the previous
good one used. The stage (tasks/ppo.py) drives this; docs/reliability.md has the faults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlhf.infra.integrity import MANIFEST, CheckpointCorrupted, read_manifest, verify_manifest
from rlhf.infra.tracking import OWNER_HOST, OWNER_PID, download, log_checkpoint, owner_gone
from rlhf.ppo.trainer import CHECKPOINT_FILES, PPOTrainer

RUN_FILE = "mlflow_run.json"
"""Written into each logged checkpoint: the run that logged it (resume copies that run's metrics)."""
CHECKPOINT_DIR = "checkpoints"
LOCAL_CHECKPOINT_DIR = "ppo-checkpoints"
"""Under output_dir: checkpoints written but not yet logged, in ``<resume key>/<run id>/step_XXXXX``: each run
writes only into its own folder, so two live runs with the same inputs never delete or resume from each other's."""
_LIVE_RUNS: set[str] = set()
"""PPO runs this process is executing right now (never resumed from by this process)."""
logger = logging.getLogger(__name__)
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: the source run, the checkpoint's step and URI, earlier checkpoints."""

    run_id: str
    step: int
    uri: str
    checkpoints: dict[int, str]
    skipped: tuple[str, ...] = ()
    """Later checkpoints refused as corrupted before this one was found good."""
    local: Path | None = None
    """The local folder resumed from when the checkpoint was never logged (it is logged into the new run)."""


@contextmanager
def live_run(run_id: str) -> Iterator[None]:
    """Mark a run as executing in this process (so this process never resumes from it while it runs)."""
    _LIVE_RUNS.add(run_id)
    try:
        yield
    finally:
        _LIVE_RUNS.discard(run_id)


@contextmanager
def checkpoint_folder(root: Path) -> Iterator[Path]:
    """The local folder checkpoints are written to until logged; removed at the end if nothing is left in it."""
    root.mkdir(parents=True, exist_ok=True)
    yield root
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def save_checkpoint(trainer: PPOTrainer, root: Path, run_id: str) -> str:
    """Write the trainer's state under root, log it to the active run, return its artifact URI.

    The local copy is deleted only after the upload succeeded: a checkpoint the tracking
    store did not take stays on disk (with its manifest) for the next run to resume from.
    """
    folder = root / f"step_{trainer.step_count:05d}"
    if folder.exists():
        shutil.rmtree(folder)  # a leftover from an earlier attempt at the same step
    trainer.save_checkpoint(folder)
    return save_logged(folder, run_id, trainer.step_count)


def save_logged(folder: Path, run_id: str, step: int) -> str:
    """Stamp a local checkpoint with the run that logs it, log it (manifest first), delete the local copy."""
    (folder / RUN_FILE).write_text(json.dumps({"run_id": run_id, "step": step}))
    uri = log_checkpoint(folder, f"{CHECKPOINT_DIR}/step_{step:05d}")
    shutil.rmtree(folder)
    return uri


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def owner_alive(run: mlflow.entities.Run) -> bool:
    """Whether a PPO run is still being executed by some process (then it must not be resumed from).

    Same host: its pid exists and is not younger than the run; another host: its heartbeat is fresh
    (rlhf.infra.tracking.owner_gone, STALE_AFTER_BEATS heartbeat intervals).
    """
    if run.info.status != "RUNNING":
        return False
    if run.info.run_id in _LIVE_RUNS:
        return True
    tags = run.data.tags
    host = tags.get(OWNER_HOST) or tags.get("ppo.owner_host")
    pid = tags.get(OWNER_PID) or tags.get("ppo.owner_pid")
    if host == socket.gethostname() and pid == str(os.getpid()):
        return False  # this process, and not in _LIVE_RUNS: an earlier attempt that died (a Prefect retry)
    return not owner_gone(run)


def run_folder(local_root: Path, run_id: str) -> Path:
    """The local folder of one run's unlogged checkpoints (under the resume key's folder)."""
    return local_root / run_id


def interrupted_run_folders(local_root: Path) -> list[Path]:
    """Local folders of runs under local_root that are no longer executing (failed, killed, or dead owner)."""
    if not local_root.is_dir():
        return []
    client = MlflowClient()
    out = []
    for folder in sorted(local_root.iterdir()):
        if not (folder.is_dir() and _RUN_ID.fullmatch(folder.name)):
            continue
        try:
            run = client.get_run(folder.name)
        except MlflowException:  # the run was deleted: its checkpoints cannot be resumed (no params to check)
            continue
        if run.info.status != "FINISHED" and not owner_alive(run):
            out.append(folder)
    return out


def interrupted_checkpoints(key: str, local_root: Path, experiment_id: str) -> list[str]:
    """Checkpoints left by interrupted runs with this resume key, latest step first (logged before local).

    Logged ones come from runs that failed, were killed, or are RUNNING under a dead
    process; local ones are those runs' folders under local_root that never reached the
    store. A live run's folder is never read: it may be mid-upload.
    """
    client = MlflowClient()
    found: list[tuple[int, int, str]] = []
    for run in client.search_runs([experiment_id], f"tags.`ppo.resume_key` = '{key}'"):
        if run.info.status == "FINISHED" or owner_alive(run):
            continue
        found += [(step, 1, uri) for step, uri in logged_checkpoints(run.info.run_id).items()]
    for run_dir in interrupted_run_folders(local_root):
        for folder in run_dir.glob("step_*"):
            step = step_of(folder)
            if step is not None and (folder / RUN_FILE).exists() and (folder / MANIFEST).exists():
                found.append((step, 0, str(folder)))
    return [where for _, _, where in sorted(found, reverse=True)]


def prune_interrupted(local_root: Path, up_to_step: int) -> None:
    """Delete the unlogged checkpoints at steps <= up_to_step of interrupted runs (superseded by a resume),
    and their folders once empty; live runs' folders are left alone."""
    for run_dir in interrupted_run_folders(local_root):
        for stale in run_dir.glob("step_*"):
            step = step_of(stale)
            if step is not None and step <= up_to_step:
                shutil.rmtree(stale, ignore_errors=True)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()


def mark_superseded(source_run_id: str, new_run_id: str) -> None:
    """Tag the run resumed from; a RUNNING one whose process died becomes KILLED (and its dead pipeline run too)."""
    client = MlflowClient()
    run = client.get_run(source_run_id)
    client.set_tag(source_run_id, "ppo.resumed_by", new_run_id)
    if run.info.status != "RUNNING":
        return
    client.set_terminated(source_run_id, "KILLED")
    parent_id = run.data.tags.get("mlflow.parentRunId")
    same_process = run.data.tags.get("ppo.owner_pid") == str(os.getpid())
    if parent_id and not same_process and client.get_run(parent_id).info.status == "RUNNING":
        client.set_terminated(parent_id, "KILLED")


def logged_checkpoints(run_id: str) -> dict[int, str]:
    """step -> URI of each complete checkpoint a PPO run logged under checkpoints/."""
    client = MlflowClient()
    artifact_uri = client.get_run(run_id).info.artifact_uri
    out: dict[int, str] = {}
    for entry in client.list_artifacts(run_id, CHECKPOINT_DIR):
        match = _STEP_DIR.fullmatch(Path(entry.path).name)
        if not entry.is_dir or match is None:
            continue
        files = {Path(f.path).name for f in client.list_artifacts(run_id, entry.path)}
        if set(CHECKPOINT_FILES) | {RUN_FILE, MANIFEST} <= files:  # an upload cut short leaves files out
            out[int(match.group(1))] = f"{artifact_uri}/{entry.path}"
    return out


def resume_candidates(resume_from: str) -> list[str]:
    """Checkpoints to try, in order: a run id's complete checkpoints latest first, else `resume_from` itself."""
    if not _RUN_ID.fullmatch(resume_from):
        return [resume_from]
    found = logged_checkpoints(resume_from)
    if not found:
        raise ValueError(
            f"MLflow run {resume_from} has no complete PPO checkpoint under {CHECKPOINT_DIR}/: "
            "pass another PPO run id or a checkpoint URI to ppo.resume_from, or set it to null to start fresh"
        )
    return [found[step] for step in sorted(found, reverse=True)]


def resolve_resume_uri(resume_from: str) -> str:
    """The checkpoint URI to resume from first: a run id's latest complete checkpoint, else `resume_from` itself."""
    return resume_candidates(resume_from)[0]


def resume(trainer: PPOTrainer, resume_from: str, inputs: dict[str, str]) -> ResumePoint:
    """Resume from a run id (its latest good checkpoint) or one checkpoint URI; see resume_first_good."""
    return resume_first_good(trainer, resume_candidates(resume_from), inputs)


def open_checkpoint(where: str, into: str | Path) -> Path:
    """A local, verified copy (under ``into``) of a checkpoint URI, or the local folder itself;
    CheckpointCorrupted if it fails."""
    if Path(where).is_dir():
        verify_manifest(where)
        return Path(where)
    local = download(where, into)  # verifies the manifest when there is one
    if read_manifest(local) is None:
        verify_manifest(local)  # raises: a PPO checkpoint without a manifest cannot be checked
    return local


def resume_first_good(trainer: PPOTrainer, candidates: list[str], inputs: dict[str, str]) -> ResumePoint:
    """Load the first uncorrupted checkpoint of `candidates` and copy its run's metrics up to its step.

    A corrupted candidate is refused with a warning and the next (earlier) one tried; a
    single explicit checkpoint that is corrupted raises CheckpointCorrupted.
    `inputs` are this stage's sft_run_id and reward_run_id: a resumed run must use the
    reference and reward model the source run used, else it is a different run.
    """
    with tempfile.TemporaryDirectory(prefix="rlhf-resume-") as scratch:  # downloads, removed once loaded
        return _resume_first_good(trainer, candidates, inputs, scratch)


def _resume_first_good(trainer: PPOTrainer, candidates: list[str], inputs: dict[str, str], scratch: str) -> ResumePoint:
    skipped: list[str] = []
    for where in candidates:
        try:
            local = open_checkpoint(where, scratch)
        except CheckpointCorrupted as e:
            if len(candidates) == 1:
                raise
            logger.warning("refusing PPO checkpoint %s: %s; trying the previous one", where, e)
            skipped.append(where)
            continue
        if not (local / RUN_FILE).exists():
            raise ValueError(
                f"{where} is not a checkpoint logged by a PPO run (no {RUN_FILE}): pass checkpoints/step_XXXXX"
            )
        source = json.loads((local / RUN_FILE).read_text())["run_id"]
        source_params = MlflowClient().get_run(source).data.params
        for key, value in inputs.items():
            if source_params.get(key) != value:
                raise ValueError(
                    f"PPO run {source} was trained with {key}={source_params.get(key)}, this stage has {value}: "
                    f"resume with the same SFT and reward checkpoints (the source run's params sft_uri, reward_uri)"
                )
        trainer.load_checkpoint(local)
        copy_metric_history(source, trainer.step_count)
        earlier = checkpoint_chain(source, trainer.step_count)
        is_local = Path(where).is_dir()
        return ResumePoint(source, trainer.step_count, where, earlier, tuple(skipped), local if is_local else None)
    raise CheckpointCorrupted(
        f"every checkpoint tried is corrupted ({', '.join(skipped)}): set ppo.resume_from=null "
        "and ppo.auto_resume=false to start PPO afresh from the SFT checkpoint"
    )


def checkpoint_chain(run_id: str, up_to_step: int) -> dict[int, str]:
    """step -> URI of the checkpoints at steps <= up_to_step of a run and of the runs it resumed from."""
    client = MlflowClient()
    out: dict[int, str] = {}
    while run_id:
        for step, uri in logged_checkpoints(run_id).items():
            if step <= up_to_step:
                out.setdefault(step, uri)
        tags = client.get_run(run_id).data.tags
        run_id, up_to_step = tags.get("ppo.resumed_from_run", ""), int(tags.get("ppo.resumed_at_step", -1))
    return out


def copy_metric_history(source_run_id: str, up_to_step: int) -> None:
    """Log the source run's metrics at steps <= up_to_step into the active run (later ones are redone)."""
    client = MlflowClient()
    keys = client.get_run(source_run_id).data.metrics
    history: list[Metric] = []
    for key in keys:
        history += [m for m in client.get_metric_history(source_run_id, key) if m.step <= up_to_step]
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(history), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=history[i : i + 1000])
