"""PPO stage: optimise the SFT policy against the reward model under a KL penalty.

The loop lives in rlhf/ppo/trainer.py; this stage loads the models, logs every
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
written under ``<output_dir>/ppo-checkpoints/<key>/<run id>/`` (each run its own
folder: two live runs with the same inputs never touch each other's) and deleted there only once
logged, so one the tracking store never received is resumed from the local disk.
Each checkpoint carries a sha256 manifest; a corrupted one is refused with a warning
and the previous good one used. Sample tables are PII-redacted before logging.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.lora import add_adapters, lora_config
from models.policy import PolicyWithValueHead
from rlhf.builtin.task import task_knowledge
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.infra.distributed import device as distributed_device
from rlhf.infra.distributed import is_distributed, is_main_process
from rlhf.infra.integrity import fingerprint, fingerprint_path
from rlhf.infra.progress import StageProgress, in_prefect_run
from rlhf.infra.security import redact_rows
from rlhf.infra.tracking import download, flatten, log_params, stage_run
from rlhf.ppo.resume import (
    LOCAL_CHECKPOINT_DIR,
    ResumePoint,
    checkpoint_folder,
    interrupted_checkpoints,
    live_run,
    mark_superseded,
    prune_interrupted,
    resume,
    resume_first_good,
    run_folder,
    save_checkpoint,
    save_logged,
)
from rlhf.ppo.trainer import ALERT_KINDS, Alert, PPOTrainer, StepResult
from tasks.caching import cached_stage
from tasks.common import PPO, Checkpoint, PPOResult
from tasks.launch import launch_stage

SAMPLE_ROWS = 8
"""Sample responses logged per sample table."""
LORA_FIELDS = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}


def resume_key(cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str) -> str:
    """Hash of what a PPO run's trajectory depends on: runs with the same key may continue each other."""
    return fingerprint(
        {
            "ppo": cfg.ppo.model_dump(exclude={"resume_from", "auto_resume"}),
            # LoRA changes the trajectory too; left out when off, so keys of runs without it stay as they were
            **({"lora": cfg.model.model_dump(include=LORA_FIELDS)} if cfg.model.lora_r else {}),
            "seed": cfg.seed,
            "sft": sft.uri,
            "reward": reward.uri,
            "prompts": fingerprint_path(prompts_path),
            "data": cfg.data.source,
        }
    )


def run_ppo(
    cfg: PipelineConfig,
    sft: Checkpoint,
    reward: Checkpoint,
    prompts_path: str,
    parent_run_id: str,
    resume_from: str | None = None,
) -> PPOResult:
    """Run PPO up to cfg.ppo.steps from SFT (or from `resume_from`, default cfg.ppo.resume_from); log everything.

    Without `resume_from` and with cfg.ppo.auto_resume, an interrupted run with the same
    inputs is continued (see the module docstring).
    """
    resume_from = resume_from or cfg.ppo.resume_from
    if cfg.distributed.num_processes > 1 and not is_distributed():  # start the processes; rank 0 comes back here
        args = {
            "sft": asdict(sft),
            "reward": asdict(reward),
            "prompts_path": prompts_path,
            "parent_run_id": parent_run_id,
            "resume_from": resume_from,
        }
        return PPOResult.from_json(launch_stage(PPO, cfg, None, args))
    key = resume_key(cfg, sft, reward, prompts_path)
    local_root = Path(cfg.output_dir).resolve() / LOCAL_CHECKPOINT_DIR / key[:16]
    params = flatten({"ppo": cfg.ppo.model_dump()})
    with (
        stage_run(parent_run_id, PPO, params, {"prompts": prompts_path}, system_metrics=True) as run,
        live_run(run.info.run_id),
    ):
        inputs = {"sft_run_id": sft.run_id, "reward_run_id": reward.run_id}
        log_params({**inputs, "sft_uri": sft.uri, "reward_uri": reward.uri})
        mlflow.set_tags(
            {
                "ppo.resume_key": key,
                "ppo.owner_host": socket.gethostname(),
                "ppo.owner_pid": str(os.getpid()),
            }
        )
        trainer = build_trainer(cfg, sft, reward, prompts_path)
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
            mlflow.set_tags(
                {
                    "ppo.resumed_from_run": point.run_id,
                    "ppo.resumed_from_checkpoint": point.uri,
                    "ppo.resumed_at_step": str(point.step),
                }
            )
            if point.skipped:
                mlflow.set_tag("ppo.corrupt_checkpoints_skipped", ",".join(point.skipped)[:5000])
            mark_superseded(point.run_id, run.info.run_id)
            prune_interrupted(local_root, point.step)  # older unlogged checkpoints: superseded by the one resumed
        trainer.sync_from_main()  # several processes: rank 0's (resumed) state everywhere
        alerts: list[Alert] = []
        result: StepResult | None = None
        with checkpoint_folder(run_folder(local_root, run.info.run_id)) as tmp:

            def save() -> None:
                """Log the trainer's full state as checkpoints/step_XXXXX."""
                checkpoints[trainer.step_count] = save_checkpoint(trainer, tmp, run.info.run_id)

            if trainer.step_count == 0:
                save()  # step 0: the SFT policy with a fresh value head, the fallback of a rollback
            progress = StageProgress(PPO, total=cfg.ppo.steps, initial=trainer.step_count)
            for _ in range(trainer.step_count, cfg.ppo.steps):
                # 1. One iteration; its metrics and alerts go to MLflow at the iteration's step.
                result = trainer.step()
                step = trainer.step_count
                mlflow.log_metrics({**result.metrics, **alert_metrics(result.alerts)}, step=step)
                publish_alerts(result.alerts)
                alerts += result.alerts
                progress.update(
                    kl=f"{result.metrics['objective/kl']:.2f}",
                    score=f"{result.metrics['objective/scores']:.2f}",
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


def build_trainer(cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str) -> PPOTrainer:
    """The trainer on the SFT policy (LoRA adapters with model.lora_r), the frozen reference (none with LoRA: the
    policy with its adapters disabled) and the reward model. The value head is the start checkpoint's where it has
    one (a PPO policy continued by the feedback flow), else fresh: a copy of the reward model's score head
    (``ppo.value_head_init``) or zeros; the tag ``ppo.value_head`` says which."""
    trust, m = cfg.model.trust_remote_code, cfg.model
    device = distributed_device()
    adapters = lora_config(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules, "causal_lm")
    with tempfile.TemporaryDirectory(prefix="rlhf-ppo-") as scratch:  # the models are read into memory
        sft_dir, rm_dir = str(download(sft.uri, scratch)), str(download(reward.uri, scratch))
        tokenizer = load_tokenizer(sft_dir, trust)
        torch.manual_seed(cfg.seed)  # the value head's and the adapters' initialisation belong to the seeded run
        lm = add_adapters(load_causal_lm(sft_dir, trust_remote_code=trust), adapters)
        reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id, trust_remote_code=trust)
        policy = PolicyWithValueHead(lm)
        if policy.load_value_head(sft_dir):
            start = f"from the start checkpoint {sft.uri}"
        elif cfg.ppo.value_head_init == "reward_model" and policy.init_value_head_from(reward_model):
            start = f"the reward model's score head ({reward.uri})"
        else:
            start = "zeros"
            if cfg.ppo.value_head_init == "reward_model":
                logging.getLogger(__name__).warning(
                    "ppo.value_head_init=reward_model: the reward model (%s) has no `score` head of the policy's "
                    "hidden size to copy; the value head starts at zero (set ppo.value_head_init=zero to say so)",
                    type(reward_model).__name__,
                )
        if mlflow.active_run():
            mlflow.set_tag("ppo.value_head", start)
        policy, reward_model = policy.to(device), reward_model.to(device)
        ref_model = None if adapters else load_causal_lm(sft_dir, trust_remote_code=trust).to(device)
    prompts = list(load_split(prompts_path)["prompt"])
    return PPOTrainer(
        cfg.ppo,
        policy,
        ref_model,
        reward_model,
        tokenizer,
        prompts,
        cfg.seed,
        gold_scorer=task.gold_score if (task := task_knowledge(cfg.data)) else None,
    )


# -- several processes (tasks/launch.py) -----------------------------------------------------
def train_ppo_worker(
    cfg: PipelineConfig,
    sft: dict,
    reward: dict,
    prompts_path: str,
    parent_run_id: str,
    resume_from: str | None,
) -> dict | None:
    """One of several PPO processes. Rank 0 runs the whole stage (MLflow, checkpoints, alerts);
    the others build the same trainer, take rank 0's state and step with it until it stops."""
    sft_ckpt, reward_ckpt = Checkpoint(**sft), Checkpoint(**reward)
    if is_main_process():
        return asdict(run_ppo(cfg, sft_ckpt, reward_ckpt, prompts_path, parent_run_id, resume_from))
    trainer = build_trainer(cfg, sft_ckpt, reward_ckpt, prompts_path)
    trainer.sync_from_main()
    for _ in range(trainer.step_count, cfg.ppo.steps):
        if trainer.step().stop:  # computed from the whole batch: every process stops at the same step
            break
    return None


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
            key="ppo-alerts",
            description="Every alert the PPO monitor raised",
        )
    ending = "ran to the last step"
    if stopped_at is not None:
        ending = f"stopped by the KL budget at step {stopped_at}"
    if rolled_back_to is not None:
        ending += f", rolled back to checkpoint step {rolled_back_to}"
    create_markdown_artifact(
        f"**PPO** {ending}; {len(alerts)} alert(s).\n\nFinal checkpoint: `{final_uri}`",
        key="ppo-summary",
        description="How the PPO stage ended",
    )


@task(**cached_stage(PPO))
def ppo_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """PPO with a KL penalty to the SFT reference."""
    return run_ppo(cfg, sft, reward, prompts_path, parent_run_id)
