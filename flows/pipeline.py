"""The training pipeline: validate -> SFT -> reward model -> policy (PPO, DPO, RLOO or GRPO) -> evaluate ->
register -> baseline.

Wiring only: each stage is a task in tasks/, and stages hand each other MLflow
references. One MLflow parent run spans the flow run; each stage opens a child run. The
registered version gets its drift-monitoring baseline (tasks/baseline.py) last. A run
started by a drift alert (``retrain_of``) trains only if the data, code or config changed
since the drifted version was trained (tasks/retrain.py); otherwise it ends after
validation, Completed in the state ``Skipped`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed, State

from flows.promote import promote
from rlhf.builtin.model import resolve_base_model
from rlhf.builtin.task import resolve_data_paths
from rlhf.config import PipelineConfig, resolve_config
from rlhf.infra.env import quiet_defaults
from rlhf.registry.promotion import PromotionOutcome
from tasks.baseline import baseline_task
from tasks.caching import call_stage
from tasks.common import REWARD, SFT, VALIDATE, Checkpoint, PPOResult, pipeline_run
from tasks.dpo import dpo_task
from tasks.evaluate import evaluate_task, format_table
from tasks.grpo import grpo_task
from tasks.ppo import ppo_task
from tasks.register import RegisteredVersion, pipeline_lock_dir, register_task
from tasks.retrain import drifted_version, retrain_check_task
from tasks.reward import reward_task
from tasks.rloo import rloo_task
from tasks.sft import sft_task
from tasks.validate import ValidatedData, validate_task


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run produced, by reference."""

    parent_run_id: str
    model_uri: str
    metrics: dict[str, float]
    promotion: PromotionOutcome
    """The promote flow's verdict on the new version: each gate, and whether it became champion."""


def ensure_baseline(config: PipelineConfig, version: RegisteredVersion, data: ValidatedData) -> None:
    """The drift-monitoring baseline of a newly registered version (one reused from an earlier run keeps its own)."""
    if version.baseline_uri is None:
        call_stage(
            baseline_task,
            config,
            version.name,
            version.version,
            [data.paths["heldout_prompts"], data.paths["prompts"]],
            config.baseline,
        )


@flow(name="rlhf-pipeline")
def rlhf_pipeline(
    config: PipelineConfig = PipelineConfig(),
    config_file: str | None = None,
    overrides: list[str] | None = None,
    retrain_of: str | None = None,
) -> PipelineResult | State:
    """Align the base model with the preference data and register the policy.

    Args:
        config: The whole configuration (used when config_file is not given).
        config_file: A preset such as configs/gpu.yaml, relative to the flow run's working
            directory; it replaces config.
        overrides: section.field=value strings (as `rlhf run --set`), applied on top of config
            or config_file, e.g. distributed.num_processes=4.
        retrain_of: A model version (models:/rlhf-policy/3) that drifted: train only if the data, code
            or config changed since it was trained, else end after validation (state Skipped). The
            drift trigger of the retrain-on-drift deployment sets it.

    Returns:
        What the run produced; for a retraining that found nothing new, the Skipped state.
    """
    config = resolve_config(config, config_file, overrides)
    drifted = drifted_version(retrain_of) if retrain_of else None  # a version the registry lacks fails here
    quiet_defaults()
    logger = get_run_logger()
    flow_run = FlowRunContext.get().flow_run
    with pipeline_run(config, flow_run.name, str(flow_run.id)) as parent_id:
        run_dir = Path(config.output_dir).resolve() / parent_id
        logger.info("MLflow parent run %s, outputs in %s", parent_id, run_dir)

        # Every stage runs under its time limit (timeouts.<stage>_s); those whose inputs and code are
        # unchanged come from Prefect's cache (tasks/caching.py).
        paths = resolve_data_paths(config.data, run_dir, config.seed)
        base_model = resolve_base_model(config.model.base_model, Path(config.output_dir) / "base-models", config.seed)
        data, cached_validate = call_stage(
            validate_task, config, paths, str(run_dir / "validated"), parent_id, tokenizer_path=base_model
        )
        mlflow.set_tags({f"data.fingerprint.{split}": fp for split, fp in data.fingerprints.items()})
        mlflow.set_tag("validation.success", "true")  # validate_task returns only when every check passed
        if drifted is not None:
            decision = retrain_check_task(drifted, config, data.fingerprints)
            mlflow.set_tags({"rlhf.retrain_of": drifted.model_uri, "rlhf.retrain": str(decision.retrain).lower()})
            if not decision.retrain:
                logger.warning(decision.message)
                return Completed(name="Skipped", message=decision.message)
            logger.info(decision.message)

        sft, cached_sft = call_stage(sft_task, config, base_model, data.paths["sft"], parent_id)
        reward, cached_reward = call_stage(
            reward_task, config, sft, data.paths["preferences"], data.paths["preferences_heldout"], parent_id
        )
        ppo, cached_ppo = train_policy(config, sft, reward, data, parent_id)
        algorithm = config.algorithm
        hits = ((VALIDATE, cached_validate), (SFT, cached_sft), (REWARD, cached_reward), (algorithm, cached_ppo))
        cached = [name for name, hit in hits if hit]
        mlflow.set_tags(
            {
                "rlhf.algorithm": algorithm,
                "rlhf.cached_stages": ",".join(cached) or "none",
                "rlhf.stage_runs": f"{SFT}={sft.run_id},{REWARD}={reward.run_id},{algorithm}={ppo.final.run_id}",
            }
        )
        if cached:
            logger.info("Unchanged inputs and code: reused the results of %s", ", ".join(cached))
        # Without a gold judge, an independently trained reward model (another seed) judges, so the
        # proxy's own blind spots are not also the judge's (divergence and efficiency flags need one).
        judge = None
        if not config.data.is_builtin:
            judge_config = config.model_copy(update={"seed": config.seed + 1})
            judge, _ = call_stage(
                reward_task, judge_config, sft, data.paths["preferences"], data.paths["preferences_heldout"], parent_id
            )
            mlflow.set_tag("rlhf.judge_reward_run", judge.run_id)
        evaluation, _ = call_stage(
            evaluate_task, config, sft, reward, ppo, data.paths["heldout_prompts"], parent_id, heldout_reward=judge
        )
        mlflow.log_metrics(evaluation.metrics)
        version, _ = call_stage(register_task, config, ppo, evaluation, data.fingerprints, parent_id, reward)
        mlflow.set_tags({"registry.version": version.version, "registry.reused": str(version.reused).lower()})
        ensure_baseline(config, version, data)
        logger.info("Evaluation on held-out prompts:\n%s", format_table(evaluation.metrics, config.ppo.kl_target))
        # The day ends with the gates: a version that passes them all becomes champion.
        promotion = config.promotion.model_copy(update={"lock_dir": pipeline_lock_dir(config)})
        outcome = promote(version.name, version.version, promotion)
        return PipelineResult(parent_id, version.model_uri, evaluation.metrics, outcome)


def train_policy(
    config: PipelineConfig, sft: Checkpoint, reward: Checkpoint, data: ValidatedData, parent_id: str
) -> tuple[PPOResult, bool]:
    """The policy stage of ``config.algorithm`` on its data (DPO: the preference pairs; the others: the prompts);
    (its checkpoints, whether they came from the cache)."""
    prompts = data.paths["prompts"]
    if config.algorithm == "dpo":
        return call_stage(dpo_task, config, sft, reward, data.paths["preferences"], prompts, parent_id)
    stage = {"ppo": ppo_task, "rloo": rloo_task, "grpo": grpo_task}[config.algorithm]
    return call_stage(stage, config, sft, reward, prompts, parent_id)


if __name__ == "__main__":
    rlhf_pipeline()
