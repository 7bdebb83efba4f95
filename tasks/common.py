"""What the stages share: their names, the references they hand each other, retry settings, the
pipeline's parent run, and the training arguments and save protocol of the two TRL-trained
stages (SFT, reward model).

Stages hand each other references (MLflow run ids, artifact URIs), never live objects,
so any stage can be re-run or resumed alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import torch
import yaml
from prefect.artifacts import create_link_artifact

from models.lora import save_merged
from rlhf.config import PipelineConfig, RewardConfig, SFTConfig
from rlhf.infra.distributed import device, is_main_process, world_size
from rlhf.infra.progress import in_prefect_run
from rlhf.infra.security import mask_secrets
from rlhf.infra.tracking import (
    check_tracking_store,
    end_dead_runs,
    flatten,
    heartbeat,
    is_transient_tracking_error,
    log_params,
    owner_tags,
    run_url,
    setup_experiment,
)
from rlhf.ppo.trainer import Alert

# -- stage names: one per stage, used for the Prefect task, the MLflow run and the cache key --
VALIDATE = "validate"
SFT = "sft"
REWARD = "reward"
PPO = "ppo"
DPO = "dpo"
RLOO = "rloo"
GRPO = "grpo"
EVALUATE = "evaluate"
REGISTER = "register"
BASELINE = "baseline"
TrainingStage = Literal["sft", "reward", "ppo"]
TRAINING_STAGES: tuple[TrainingStage, ...] = (SFT, REWARD, PPO)
"""Stages that may run in several processes (tasks/launch.py)."""

MLFLOW_RUN_ARTIFACT = "mlflow-run"
"""Key of the link artifact from a pipeline flow run to its MLflow parent run."""

RETRY_DELAYS_S = [10, 60]
"""Prefect retries of a stage whose tracking-store connection failed (after MLflow's own HTTP retries)."""


def retry_on_tracking_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only when the tracking store's connection failed.

    A stage stopped at its time limit (or cancelled) is never retried, wherever the limit sits in
    the exception chain: the limit is a TimeoutError, which alone would read as a lost connection.
    """
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if not isinstance(exc, BaseException):
        return False
    return not stopped_by_limit_or_cancel(exc) and is_transient_tracking_error(exc)


def stopped_by_limit_or_cancel(exc: BaseException) -> bool:
    """Whether ``exc`` or anything under it is a time limit (Prefect's or ours) or a cancellation."""
    from asyncio import CancelledError  # Prefect raises its subclass in a task at the time limit

    from prefect.task_engine import TaskRunTimeoutError

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (TaskRunTimeoutError, StageTimedOut, CancelledError)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


class StageTimedOut(TimeoutError):
    """A stage ran past its time limit, ``timeouts.<stage>_s`` of the config (the message names it)."""


RETRY_ON_TRACKING_ERROR: dict[str, Any] = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": retry_on_tracking_error,
}
"""The @task options of a stage that talks to the tracking store: retried only when its connection failed."""


# -- handover types ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A stage's logged model: the child run that made it and its artifact URI."""

    run_id: str
    uri: str


@dataclass(frozen=True)
class PPOResult:
    """The final policy and every logged checkpoint (step -> artifact URI): the handover of every policy-training
    stage (PPO, DPO, RLOO, GRPO), so evaluation, registration and monitoring never ask which algorithm trained it.
    Step 0 is the SFT policy the stage started from."""

    final: Checkpoint
    checkpoints: dict[int, str]
    alerts: tuple[Alert, ...] = ()
    """Every alert the monitor raised in this stage run."""
    stopped_at: int | None = None
    """The step at which the KL budget stopped the run; None when it ran to ``ppo.steps``."""
    rolled_back_to: int | None = None
    """The checkpoint step the policy was rolled back to (``kl_budget_action='rollback'``)."""

    @classmethod
    def from_json(cls, data: dict) -> PPOResult:
        """The result rank 0 of a launched PPO stage wrote (dataclasses.asdict, through JSON)."""
        return cls(
            final=Checkpoint(**data["final"]),
            checkpoints={int(k): v for k, v in data["checkpoints"].items()},
            alerts=tuple(Alert(**a) for a in data["alerts"]),
            stopped_at=data["stopped_at"],
            rolled_back_to=data["rolled_back_to"],
        )


JudgeKind = Literal["gold", "heldout_reward_model", "reward_model"]
JUDGE_METRIC: dict[str, str | None] = {
    "gold": "gold_reward_mean",
    "heldout_reward_model": "heldout_rm_score_mean",
    "reward_model": None,
}
"""Test-split metric of each judge's mean score (the reward model's is eval/rm_score_mean already)."""


@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage's result: its run, test-split metrics, the chosen checkpoint and its tags."""

    run_id: str
    metrics: dict[str, float]
    checkpoint: Checkpoint
    """The chosen PPO checkpoint (run id of the PPO stage, artifact URI)."""
    step: int
    tags: dict[str, str]
    """eval.* and hacking.* tags, copied onto the registered version."""

    @property
    def judge_score(self) -> float:
        """Mean test-split score of the judge (gold, held-out reward model, or the reward model itself)."""
        return self.metrics[f"eval/{JUDGE_METRIC[self.tags['eval.judge']] or 'rm_score_mean'}"]


# -- the pipeline's parent run ------------------------------------------------------------------
FLOW_RUN_TAG = "prefect.flow_run_id"
"""Tag of a pipeline's MLflow parent run: the id of the Prefect flow run that executes it."""


def crash_flow_runs(flow_run_ids: list[str]) -> list[str]:
    """Set the Prefect flow runs still Running among ``flow_run_ids`` to Crashed; returns those changed.

    The flow runs of pipelines whose process was killed (their MLflow parent run's owner is gone, see
    rlhf.infra.tracking.end_dead_runs): on a server with the zombie automation (flows/automations.py,
    `make serve`) Prefect ends them itself once their heartbeats stop; on a temporary local server,
    which dies with the killed process, this is what ends them. Flow runs the API does not know are skipped.
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    changed = []
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                flow_run = client.read_flow_run(UUID(flow_run_id))
            except (ObjectNotFound, ValueError):
                continue
            if flow_run.state is not None and flow_run.state.is_running():
                message = (
                    "its process is gone (kill -9, out of memory, a lost machine): found at the next pipeline start"
                )
                client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                changed.append(flow_run_id)
    return changed


def config_hash(cfg: PipelineConfig) -> str:
    """Short stable hash of the resolved config, time limits left out (they change no result)."""
    return hashlib.sha256(json.dumps(cfg.model_dump(exclude={"timeouts"}), sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def pipeline_run(cfg: PipelineConfig, flow_run_name: str, flow_run_id: str, kind: str = "pipeline") -> Iterator[str]:
    """The MLflow parent run of one pipeline (or comparison, ``kind``) run, named ``<kind>-<flow run name>``
    (yields its id): checks the store, logs every
    config value as a param, the resolved config (secrets masked) as config.yaml, and the tags
    that tie it to its Prefect flow run; the flow run gets a link artifact to it (``MLFLOW_RUN_ARTIFACT``)."""
    check_tracking_store()  # fail before any training when the store is unreachable
    experiment_id = setup_experiment(cfg.experiment)
    dead = end_dead_runs(experiment_id)  # runs a kill -9 left RUNNING (their process is gone) end KILLED
    if in_prefect_run():  # and the Prefect flow runs of those pipelines end Crashed
        crash_flow_runs([run.data.tags[FLOW_RUN_TAG] for run in dead if run.data.tags.get(FLOW_RUN_TAG)])
    with (
        mlflow.start_run(experiment_id=experiment_id, run_name=f"{kind}-{flow_run_name}", tags=owner_tags()) as parent,
        heartbeat(parent.info.run_id),
    ):
        log_params(flatten(cfg.model_dump()))
        mlflow.log_text(yaml.safe_dump(mask_secrets(cfg.model_dump()), sort_keys=False), "config.yaml")
        mlflow.set_tags({FLOW_RUN_TAG: flow_run_id, "config_hash": config_hash(cfg)})
        if in_prefect_run():  # the way back: the flow run's Artifacts tab links its MLflow run
            create_link_artifact(
                run_url(experiment_id, parent.info.run_id),
                link_text=f"MLflow run {kind}-{flow_run_name}",
                key=MLFLOW_RUN_ARTIFACT,
                description="The MLflow parent run of this flow run: params, config.yaml, the stage runs and their metrics",
            )
        yield parent.info.run_id


# -- the TRL-trained stages (SFT, reward model) ----------------------------------------------
def trl_training_args(section: SFTConfig | RewardConfig, seed: int, output_dir: str) -> dict[str, Any]:
    """The arguments SFTConfig and RewardConfig share, mapped from our section of the config.

    Batch sizes are global: each process takes an equal share. bf16 on a GPU that has it,
    fp32 on the CPU.
    """
    on_gpu = device().type == "cuda"
    return {
        "output_dir": output_dir,
        "max_steps": section.max_steps,
        "per_device_train_batch_size": section.batch_size // world_size(),
        "learning_rate": section.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": max(1, section.max_steps // 20),
        "max_length": section.max_length,
        "logging_steps": max(1, section.max_steps // 30),
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": False,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        # TRL turns gradient checkpointing on by default; a model that fits needs no recomputation
        "activation_checkpointing": section.activation_checkpointing,
        "train_sampling_strategy": "group_by_length" if section.group_by_length else "random",
        "use_cpu": not on_gpu,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
    }


def save_trained(trainer: Any, tokenizer: Any, lora_r: int, out: Path) -> bool:
    """Write the trained model (adapters merged) and tokenizer to ``out``; True on rank 0, which logs it.

    Every process calls ``save_model`` (under FSDP it gathers the full weights); with LoRA
    only rank 0 merges and saves.
    """
    if lora_r and is_main_process():
        save_merged(trainer.model, out)
    elif not lora_r:
        trainer.save_model(str(out))
    if not is_main_process():
        return False
    tokenizer.save_pretrained(out)
    return True
