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
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.policy import PolicyWithValueHead
from rlhf.config import PipelineConfig
from rlhf.data.judge import GoldJudge
from rlhf.data.loading import load_split
from rlhf.distributed import device as distributed_device
from rlhf.distributed import is_distributed, is_main_process
from rlhf.launch import launch_stage
from rlhf.ppo_trainer import ALERT_KINDS, CHECKPOINT_FILES, Alert, PPOTrainer, StepResult
from rlhf.tracking import download, flatten, log_checkpoint, stage_run
from tasks.common import Checkpoint, in_flow_run

RUN_FILE = "mlflow_run.json"
"""Written into each logged checkpoint: the run that logged it (resume copies that run's metrics)."""
CHECKPOINT_DIR = "checkpoints"
SAMPLE_ROWS = 8
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


def run_ppo(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str,
    gold_judge: bool = True, resume_from: str | None = None,
) -> PPOResult:
    """Run PPO up to cfg.ppo.steps from SFT (or from `resume_from`, default cfg.ppo.resume_from); log everything."""
    resume_from = resume_from or cfg.ppo.resume_from
    if cfg.distributed.num_processes > 1 and not is_distributed():  # start the processes; rank 0 comes back here
        args = {"sft": asdict(sft), "reward": asdict(reward), "prompts_path": prompts_path,
                "parent_run_id": parent_run_id, "gold_judge": gold_judge, "resume_from": resume_from}
        return ppo_result_from_json(launch_stage("ppo", cfg, None, args))
    with stage_run(parent_run_id, "ppo", flatten({"ppo": cfg.ppo.model_dump()})) as run:
        inputs = {"sft_run_id": sft.run_id, "reward_run_id": reward.run_id}
        mlflow.log_params({**inputs, "sft_uri": sft.uri, "reward_uri": reward.uri})
        trainer = build_trainer(cfg, sft, reward, prompts_path, gold_judge)
        checkpoints: dict[int, str] = {}
        if resume_from:
            point = resume(trainer, resume_from, inputs)
            checkpoints.update(point.checkpoints)
            mlflow.set_tags({
                "ppo.resumed_from_run": point.run_id, "ppo.resumed_from_checkpoint": point.uri,
                "ppo.resumed_at_step": str(point.step),
            })
        trainer.sync_from_main()  # several processes: rank 0's (resumed) state everywhere
        alerts: list[Alert] = []
        result: StepResult | None = None
        with tempfile.TemporaryDirectory(prefix="rlhf-ppo-") as tmp:

            def save() -> None:
                """Log the trainer's full state as checkpoints/step_XXXXX."""
                checkpoints[trainer.step_count] = save_checkpoint(trainer, Path(tmp), run.info.run_id)

            if trainer.step_count == 0:
                save()  # step 0: the SFT policy with a fresh value head, the fallback of a rollback
            progress = tqdm(range(trainer.step_count, cfg.ppo.steps), desc="ppo", unit="step")
            for _ in progress:
                # 1. One iteration; its metrics and alerts go to MLflow at the iteration's step.
                result = trainer.step()
                step = trainer.step_count
                mlflow.log_metrics({**result.metrics, **alert_metrics(result.alerts)}, step=step)
                publish_alerts(result.alerts)
                alerts += result.alerts
                progress.set_postfix(
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

        # 3. A stop by the KL budget: the final policy is the current one, or the best within budget.
        stopped_at = trainer.step_count if result is not None and result.stop else None
        rolled_back_to = None
        if stopped_at is not None and cfg.ppo.kl_budget_action == "rollback":
            rolled_back_to = trainer.best_checkpoint_step(sorted(checkpoints))
            trainer.load_checkpoint(download(checkpoints[rolled_back_to]))
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
def save_checkpoint(trainer: PPOTrainer, tmp: Path, run_id: str) -> str:
    """Write the trainer's state, log it to the active run and return its artifact URI."""
    name = f"step_{trainer.step_count:05d}"
    local = trainer.save_checkpoint(tmp / name)
    (local / RUN_FILE).write_text(json.dumps({"run_id": run_id, "step": trainer.step_count}))
    return log_checkpoint(local, f"{CHECKPOINT_DIR}/{name}")


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
        if set(CHECKPOINT_FILES) | {RUN_FILE} <= files:  # an upload cut short leaves files out
            out[int(match.group(1))] = f"{artifact_uri}/{entry.path}"
    return out


def resolve_resume_uri(resume_from: str) -> str:
    """The checkpoint URI to resume from: a run id's latest complete checkpoint, else `resume_from` itself."""
    if not _RUN_ID.fullmatch(resume_from):
        return resume_from
    found = logged_checkpoints(resume_from)
    if not found:
        raise ValueError(
            f"MLflow run {resume_from} has no complete PPO checkpoint under {CHECKPOINT_DIR}/: "
            "pass another PPO run id or a checkpoint URI to ppo.resume_from, or set it to null to start fresh"
        )
    return found[max(found)]


def resume(trainer: PPOTrainer, resume_from: str, inputs: dict[str, str]) -> ResumePoint:
    """Load the checkpoint into the trainer and copy the source run's metrics up to its step.

    `inputs` are this stage's sft_run_id and reward_run_id: a resumed run must use the
    reference and reward model the source run used, else it is a different run.
    """
    uri = resolve_resume_uri(resume_from)
    local = download(uri)
    if not (local / RUN_FILE).exists():
        raise ValueError(f"{uri} is not a checkpoint logged by a PPO run (no {RUN_FILE}): pass checkpoints/step_XXXXX")
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
    earlier = {s: u for s, u in logged_checkpoints(source).items() if s <= trainer.step_count}
    return ResumePoint(source, trainer.step_count, uri, earlier)


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
        if in_flow_run():
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
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    mlflow.log_table(columns, artifact_file=f"samples/step_{step:05d}.json")
    if in_flow_run():
        create_table_artifact(rows, key="ppo-samples", description=f"PPO sample responses at step {step}")


def publish_summary(alerts: list[Alert], final_uri: str, stopped_at: int | None, rolled_back_to: int | None) -> None:
    """In a flow run: the alert table and a markdown summary of how the stage ended."""
    if not in_flow_run():
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


@task(name="ppo", cache_policy=NO_CACHE)
def ppo_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """PPO with a KL penalty to the SFT reference."""
    return run_ppo(cfg, sft, reward, prompts_path, parent_run_id)
