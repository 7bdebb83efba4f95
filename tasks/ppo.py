"""PPO stage: optimise the SFT policy against the reward model under a KL penalty.

The loop lives in rlhf/ppo_trainer.py; this stage loads the models, logs every
iteration's metrics to the stage's MLflow run, turns the trainer's alerts into
MLflow metrics (``alerts/<kind>``), tags (``ppo.alert.<kind>``) and Prefect
artifacts, logs sample tables, and logs full checkpoints at step 0, every
``ppo.checkpoint_every`` iterations and at the end.

Resume (``ppo.resume_from``: an MLflow run id or a checkpoint URI) restores the
full trainer state, copies the source run's metrics up to the checkpoint's step
into the new stage run, and continues at the next step, so the new run reads
like the uninterrupted one. On a KL budget with action ``rollback``, the policy
goes back to the best checkpoint within the budget and the run stops.

Faults (docs/reliability.md): every stage run is tagged with ``ppo.resume_key``, a
hash of its inputs (PPO config, seed, SFT and reward checkpoints, prompt file
content). With ``ppo.auto_resume``, a new run with the same key continues the latest
interrupted one (failed, killed, or running under a process that no longer exists)
from its latest good checkpoint: a re-run after ``kill -9`` or a Prefect retry after a
lost tracking connection loses at most ``checkpoint_every`` steps. Checkpoints are
written under ``<output_dir>/ppo-checkpoints/<key>/`` and deleted there only once
logged, so one the tracking store never received is resumed from the local disk.
Each checkpoint carries a sha256 manifest; a corrupted one is refused with a warning
and the previous good one used. Sample tables are PII-redacted before logging.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import psutil
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.policy import PolicyWithValueHead
from rlhf.config import PipelineConfig
from rlhf.data.judge import GoldJudge
from rlhf.data.loading import load_split
from rlhf.distributed import device as distributed_device
from rlhf.distributed import is_distributed, is_main_process
from rlhf.launch import launch_stage
from rlhf.integrity import MANIFEST, CheckpointCorrupted, fingerprint, fingerprint_path, read_manifest, verify_manifest
from rlhf.ppo_trainer import ALERT_KINDS, CHECKPOINT_FILES, Alert, PPOTrainer, StepResult
from rlhf.security import redact_rows
from rlhf.tracking import download, flatten, log_checkpoint, log_params, stage_run
from tasks.caching import RETRY_DELAYS_S, retry_on_tracking_error, stage_cache
from rlhf.progress import StageProgress, in_prefect_run
from tasks.common import Checkpoint

RUN_FILE = "mlflow_run.json"
"""Written into each logged checkpoint: the run that logged it (resume copies that run's metrics)."""
CHECKPOINT_DIR = "checkpoints"
LOCAL_CHECKPOINT_DIR = "ppo-checkpoints"
"""Under output_dir: checkpoints written but not yet logged (one folder per resume key)."""
STALE_AFTER_S = 900
"""A RUNNING PPO run on another host whose heartbeat is this old is taken as interrupted."""
SAMPLE_ROWS = 8
_LIVE_RUNS: set[str] = set()
"""PPO runs this process is executing right now (never resumed from by this process)."""
logger = logging.getLogger(__name__)
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class PPOResult:
    """The final policy and every logged checkpoint (step -> artifact URI)."""

    final: Checkpoint
    checkpoints: dict[int, str]
    alerts: tuple[Alert, ...] = ()
    """Every alert the monitor raised in this stage run."""
    stopped_at: int | None = None
    """The step at which the KL budget stopped the run; None when it ran to ``ppo.steps``."""
    rolled_back_to: int | None = None
    """The checkpoint step the policy was rolled back to (``kl_budget_action='rollback'``)."""


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


def resume_key(cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, gold_judge: bool) -> str:
    """Hash of what a PPO run's trajectory depends on: runs with the same key may continue each other."""
    return fingerprint({
        "ppo": cfg.ppo.model_dump(exclude={"resume_from", "auto_resume"}), "seed": cfg.seed,
        "sft": sft.uri, "reward": reward.uri, "prompts": fingerprint_path(prompts_path), "gold_judge": gold_judge,
    })


@contextmanager
def live_run(run_id: str) -> Iterator[None]:
    """Mark a run as executing in this process (so this process never resumes from it while it runs)."""
    _LIVE_RUNS.add(run_id)
    try:
        yield
    finally:
        _LIVE_RUNS.discard(run_id)


def run_ppo(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str,
    gold_judge: bool = True, resume_from: str | None = None,
) -> PPOResult:
    """Run PPO up to cfg.ppo.steps from SFT (or from `resume_from`, default cfg.ppo.resume_from); log everything.

    Without `resume_from` and with cfg.ppo.auto_resume, an interrupted run with the same
    inputs is continued (see the module docstring).
    """
    resume_from = resume_from or cfg.ppo.resume_from
    if cfg.distributed.num_processes > 1 and not is_distributed():  # start the processes; rank 0 comes back here
        args = {"sft": asdict(sft), "reward": asdict(reward), "prompts_path": prompts_path,
                "parent_run_id": parent_run_id, "gold_judge": gold_judge, "resume_from": resume_from}
        return ppo_result_from_json(launch_stage("ppo", cfg, None, args))
    key = resume_key(cfg, sft, reward, prompts_path, gold_judge)
    local_root = Path(cfg.output_dir).resolve() / LOCAL_CHECKPOINT_DIR / key[:16]
    with stage_run(parent_run_id, "ppo", flatten({"ppo": cfg.ppo.model_dump()})) as run, live_run(run.info.run_id):
        inputs = {"sft_run_id": sft.run_id, "reward_run_id": reward.run_id}
        log_params({**inputs, "sft_uri": sft.uri, "reward_uri": reward.uri})
        mlflow.set_tags({
            "ppo.resume_key": key, "ppo.owner_host": socket.gethostname(), "ppo.owner_pid": str(os.getpid()),
            "ppo.heartbeat": str(int(time.time())),
        })
        trainer = build_trainer(cfg, sft, reward, prompts_path, gold_judge)
        checkpoints: dict[int, str] = {}
        point = None
        if resume_from:
            point = resume(trainer, resume_from, inputs)
        elif cfg.ppo.auto_resume:
            candidates = interrupted_checkpoints(key, local_root, run.info.experiment_id)
            if candidates:
                point = resume_first_good(trainer, candidates, inputs)
        if point is not None:
            if point.local is not None:  # never logged: log it into this run now
                uri = save_logged(point.local, run.info.run_id, point.step)
                point = ResumePoint(point.run_id, point.step, uri, point.checkpoints, point.skipped)
            checkpoints.update(point.checkpoints)
            checkpoints[point.step] = point.uri
            mlflow.set_tags({
                "ppo.resumed_from_run": point.run_id, "ppo.resumed_from_checkpoint": point.uri,
                "ppo.resumed_at_step": str(point.step),
            })
            if point.skipped:
                mlflow.set_tag("ppo.corrupt_checkpoints_skipped", ",".join(point.skipped)[:5000])
            mark_superseded(point.run_id, run.info.run_id)
            for stale in local_root.glob("step_*"):  # older unlogged checkpoints: superseded by the one resumed
                if _step_of(stale) is not None and _step_of(stale) <= point.step:
                    shutil.rmtree(stale, ignore_errors=True)
        trainer.sync_from_main()  # several processes: rank 0's (resumed) state everywhere
        alerts: list[Alert] = []
        result: StepResult | None = None
        with checkpoint_folder(local_root) as tmp:

            def save() -> None:
                """Log the trainer's full state as checkpoints/step_XXXXX."""
                checkpoints[trainer.step_count] = save_checkpoint(trainer, tmp, run.info.run_id)

            if trainer.step_count == 0:
                save()  # step 0: the SFT policy with a fresh value head, the fallback of a rollback
            progress = StageProgress("ppo", total=cfg.ppo.steps, initial=trainer.step_count)
            for _ in range(trainer.step_count, cfg.ppo.steps):
                # 1. One iteration; its metrics and alerts go to MLflow at the iteration's step.
                result = trainer.step()
                step = trainer.step_count
                mlflow.log_metrics({**result.metrics, **alert_metrics(result.alerts)}, step=step)
                mlflow.set_tag("ppo.heartbeat", str(int(time.time())))
                publish_alerts(result.alerts)
                alerts += result.alerts
                progress.update(
                    kl=f"{result.metrics['objective/kl']:.2f}", score=f"{result.metrics['objective/scores']:.2f}",
                    beta=f"{result.metrics['objective/kl_coef']:.3f}",
                )
                # 2. Sample table and checkpoint on schedule, and on the last step.
                last = result.stop or step == cfg.ppo.steps
                rolling_back = result.stop and cfg.ppo.kl_budget_action == "rollback"
                if step % cfg.ppo.sample_every == 0 or last:
                    log_samples(result.samples[:SAMPLE_ROWS], step)
                if step % cfg.ppo.checkpoint_every == 0 or (last and not rolling_back):
                    save()
                if result.stop:
                    break
            progress.close()

        # 3. A stop by the KL budget: the final policy is the current one, or the best within budget.
        stopped_at = trainer.step_count if result is not None and result.stop else None
        rolled_back_to = None
        if stopped_at is not None and cfg.ppo.kl_budget_action == "rollback":
            rolled_back_to = trainer.best_checkpoint_step(sorted(checkpoints))
            mlflow.set_tag("ppo.rolled_back_to_step", str(rolled_back_to))
        final_step = rolled_back_to if rolled_back_to is not None else max(checkpoints)
        mlflow.set_tags({"ppo.final_checkpoint": checkpoints[final_step], "ppo.alert_count": str(len(alerts))})
        if stopped_at is not None:
            mlflow.set_tag("ppo.stopped_at_step", str(stopped_at))
        publish_summary(alerts, checkpoints[final_step], stopped_at, rolled_back_to)
        return PPOResult(
            Checkpoint(run.info.run_id, checkpoints[final_step]), checkpoints, tuple(alerts), stopped_at, rolled_back_to
        )


def build_trainer(cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, gold_judge: bool) -> PPOTrainer:
    """The trainer on the SFT policy (fresh value head, seeded), the frozen reference and the reward model."""
    sft_dir, rm_dir = str(download(sft.uri)), str(download(reward.uri))
    tokenizer = load_tokenizer(sft_dir)
    device = distributed_device()
    torch.manual_seed(cfg.seed)  # the value head's initialisation belongs to the seeded run
    policy = PolicyWithValueHead(load_causal_lm(sft_dir)).to(device)
    ref_model = load_causal_lm(sft_dir).to(device)
    reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id).to(device)
    prompts = list(load_split(prompts_path)["prompt"])
    return PPOTrainer(
        cfg.ppo, policy, ref_model, reward_model, tokenizer, prompts, cfg.seed,
        gold_scorer=GoldJudge().score if gold_judge else None,
    )


# -- several processes (rlhf/launch.py) -----------------------------------------------------
def train_ppo_worker(
    cfg: PipelineConfig, sft: dict, reward: dict, prompts_path: str, parent_run_id: str, gold_judge: bool,
    resume_from: str | None,
) -> dict | None:
    """One of several PPO processes. Rank 0 runs the whole stage (MLflow, checkpoints, alerts);
    the others build the same trainer, take rank 0's state and step with it until it stops."""
    sft_ckpt, reward_ckpt = Checkpoint(**sft), Checkpoint(**reward)
    if is_main_process():
        return asdict(run_ppo(cfg, sft_ckpt, reward_ckpt, prompts_path, parent_run_id, gold_judge, resume_from))
    trainer = build_trainer(cfg, sft_ckpt, reward_ckpt, prompts_path, gold_judge)
    trainer.sync_from_main()
    for _ in range(trainer.step_count, cfg.ppo.steps):
        if trainer.step().stop:  # computed from the whole batch: every process stops at the same step
            break
    return None


def ppo_result_from_json(data: dict) -> PPOResult:
    """The PPOResult rank 0 wrote (dataclasses.asdict, through JSON)."""
    return PPOResult(
        final=Checkpoint(**data["final"]), checkpoints={int(k): v for k, v in data["checkpoints"].items()},
        alerts=tuple(Alert(**a) for a in data["alerts"]), stopped_at=data["stopped_at"],
        rolled_back_to=data["rolled_back_to"],
    )


# -- checkpoints and resume ---------------------------------------------------------------
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


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def owner_alive(run: mlflow.entities.Run) -> bool:
    """Whether a PPO run is still being executed by some process (then it must not be resumed from)."""
    if run.info.status != "RUNNING":
        return False
    if run.info.run_id in _LIVE_RUNS:
        return True
    tags = run.data.tags
    host, pid = tags.get("ppo.owner_host"), int(tags.get("ppo.owner_pid", "0") or 0)
    if host == socket.gethostname() and pid:
        if pid == os.getpid():
            return False  # this process, and not in _LIVE_RUNS: an earlier attempt that died (a Prefect retry)
        try:  # alive, and started before the run did (else the pid was reused)
            return psutil.Process(pid).create_time() <= run.info.start_time / 1000 + 1
        except psutil.Error:
            return False
    heartbeat = float(tags.get("ppo.heartbeat") or run.info.start_time / 1000)
    return time.time() - heartbeat < STALE_AFTER_S


def interrupted_checkpoints(key: str, local_root: Path, experiment_id: str) -> list[str]:
    """Checkpoints left by interrupted runs with this resume key, latest step first (logged before local).

    Logged ones come from runs that failed, were killed, or are RUNNING under a dead
    process; local ones are folders under local_root that never reached the store.
    """
    client = MlflowClient()
    found: list[tuple[int, int, str]] = []
    for run in client.search_runs([experiment_id], f"tags.`ppo.resume_key` = '{key}'"):
        if run.info.status == "FINISHED" or owner_alive(run):
            continue
        found += [(step, 1, uri) for step, uri in logged_checkpoints(run.info.run_id).items()]
    if local_root.is_dir():
        for folder in local_root.glob("step_*"):
            step = _step_of(folder)
            if step is not None and (folder / RUN_FILE).exists() and (folder / MANIFEST).exists():
                found.append((step, 0, str(folder)))
    return [where for _, _, where in sorted(found, reverse=True)]


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


def open_checkpoint(where: str) -> Path:
    """A local, verified copy of a checkpoint URI (or the local folder itself); CheckpointCorrupted if it fails."""
    if Path(where).is_dir():
        verify_manifest(where)
        return Path(where)
    local = download(where)  # verifies the manifest when there is one
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
    skipped: list[str] = []
    for where in candidates:
        try:
            local = open_checkpoint(where)
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


# -- alerts and artifacts -------------------------------------------------------------------
def alert_metrics(alerts: list[Alert]) -> dict[str, float]:
    """`alerts/<kind>`: 1.0 at a step where that alert fired, else 0.0 (every kind, every step)."""
    fired = {a.kind for a in alerts}
    return {f"alerts/{kind}": float(kind in fired) for kind in ALERT_KINDS}


def publish_alerts(alerts: list[Alert]) -> None:
    """Each alert as the MLflow tag `ppo.alert.<kind>` (latest message) and, in a flow run, a Prefect artifact."""
    for alert in alerts:
        mlflow.set_tag(f"ppo.alert.{alert.kind}", f"step {alert.step}: {alert.message}")
        if in_prefect_run():
            create_markdown_artifact(
                f"**PPO alert `{alert.kind}`** at step {alert.step}, action `{alert.action}`\n\n{alert.message}\n\n"
                "What to do: docs/runbook.md",
                key=f"ppo-alert-{alert.kind.replace('_', '-')}",
                description=f"PPO alert {alert.kind}",
            )


def log_samples(rows: list[dict], step: int) -> None:
    """Sample responses as an MLflow table (and a Prefect table in a flow run)."""
    if not rows:
        return
    rows = redact_rows(rows)  # prompts and responses may carry e-mail, phone or card numbers
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    mlflow.log_table(columns, artifact_file=f"samples/step_{step:05d}.json")
    if in_prefect_run():
        create_table_artifact(rows, key="ppo-samples", description=f"PPO sample responses at step {step}")


def publish_summary(alerts: list[Alert], final_uri: str, stopped_at: int | None, rolled_back_to: int | None) -> None:
    """In a flow run: the alert table and a markdown summary of how the stage ended."""
    if not in_prefect_run():
        return
    if alerts:
        create_table_artifact(
            [{"step": a.step, "kind": a.kind, "action": a.action, "message": a.message} for a in alerts],
            key="ppo-alerts", description="Every alert the PPO monitor raised",
        )
    ending = "ran to the last step"
    if stopped_at is not None:
        ending = f"stopped by the KL budget at step {stopped_at}"
    if rolled_back_to is not None:
        ending += f", rolled back to checkpoint step {rolled_back_to}"
    create_markdown_artifact(
        f"**PPO** {ending}; {len(alerts)} alert(s).\n\nFinal checkpoint: `{final_uri}`",
        key="ppo-summary", description="How the PPO stage ended",
    )


@task(
    name="ppo", cache_policy=stage_cache("ppo"), persist_result=True,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_on_tracking_error,
)
def ppo_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """PPO with a KL penalty to the SFT reference."""
    return run_ppo(cfg, sft, reward, prompts_path, parent_run_id)
