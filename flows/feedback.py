"""The feedback flow: learn from new human feedback, continuing from the champion (iterated, on-policy RLHF).

feedback data (champion's batches + new ones, deduplicated) -> validate (the pipeline's gate, on the merged data)
-> reward model (retrained on the merged pairs, the feedback pairs replayed ``feedback.replay`` times)
-> policy (``algorithm``, from the champion and its value head, KL-held to it, entropy bonus ``feedback.ent_coef``)
-> evaluate (against the champion) -> register (tag ``lineage.feedback_batches``) -> baseline -> promote.

Wiring only: the stages are tasks in tasks/ (tasks/feedback.py for what is new here). One MLflow parent run
(``feedback-<flow run>``) spans the flow run. With no new validated batch the run ends Completed in the state
``Skipped``, saying how to get feedback.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed, State

from flows.pipeline import PipelineResult, ensure_baseline, train_policy
from flows.promote import promote
from rlhf.builtin.model import resolve_base_model
from rlhf.builtin.task import resolve_data_paths
from rlhf.config import PipelineConfig, resolve_config
from rlhf.infra.env import quiet_defaults
from tasks.caching import call_stage
from tasks.common import REWARD, SFT, pipeline_run
from tasks.evaluate import evaluate_task, format_table
from tasks.feedback import (
    NoNewFeedback,
    champion_start_task,
    continued_config,
    feedback_data_task,
    feedback_lineage_task,
    replay_task,
    start_task,
)
from tasks.register import pipeline_lock_dir, register_task
from tasks.reward import reward_task
from tasks.validate import validate_task


@flow(name="rlhf-feedback")
def rlhf_feedback(
    config: PipelineConfig = PipelineConfig(),
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> PipelineResult | State:
    """Retrain the reward model with the new feedback batches and continue the champion's training on it.

    Args:
        config: The whole configuration (feedback.dir and feedback.batches choose the batches).
        config_file: A preset such as configs/smoke.yaml; it replaces config.
        overrides: section.field=value strings (as `rlhf run --set`), applied on top.

    Returns:
        What the run produced; the Skipped state when there was no new feedback.
    """
    config = resolve_config(config, config_file, overrides)
    quiet_defaults()
    logger = get_run_logger()
    start = champion_start_task(config)  # no champion: fails here, naming the fix
    flow_run = FlowRunContext.get().flow_run
    with pipeline_run(config, flow_run.name, str(flow_run.id), kind="feedback") as parent_id:
        run_dir = Path(config.output_dir).resolve() / parent_id
        mlflow.set_tag("rlhf.continued_from", start.model_uri)
        paths = resolve_data_paths(config.data, run_dir, config.seed)
        base_model = resolve_base_model(config.model.base_model, Path(config.output_dir) / "base-models", config.seed)
        try:
            feedback = feedback_data_task(
                config,
                start,
                paths["preferences"],
                [paths["heldout_prompts"], paths["preferences_heldout"]],
                str(run_dir / "feedback"),
                parent_id,
            )
        except NoNewFeedback as e:
            logger.warning(str(e))
            return Completed(name="Skipped", message=str(e))
        logger.info(
            "learning from %d feedback batches (%d new): %d pairs",
            len(feedback.batches),
            len(feedback.new_batches),
            int(feedback.metrics["feedback/pairs"]),
        )
        paths = {**paths, "preferences": feedback.preferences_path}
        data, _ = call_stage(
            validate_task, config, paths, str(run_dir / "validated"), parent_id, tokenizer_path=base_model
        )
        mlflow.set_tags({f"data.fingerprint.{split}": fp for split, fp in data.fingerprints.items()})
        mlflow.set_tag("validation.success", "true")
        policy_start = start_task(start, parent_id)
        reward_pairs = replay_task(
            config, data.paths["preferences"], feedback.feedback_path, str(run_dir / "replayed"), parent_id
        )
        reward, _ = call_stage(
            reward_task,
            config,
            start.reference,
            reward_pairs,
            data.paths["preferences_heldout"],
            parent_id,
        )
        ppo, _ = train_policy(continued_config(config), policy_start, reward, data, parent_id)
        mlflow.set_tags(
            {
                "rlhf.algorithm": config.algorithm,
                "rlhf.stage_runs": f"{SFT}={policy_start.run_id},{REWARD}={reward.run_id},{config.algorithm}={ppo.final.run_id}",
                "feedback.batches": ",".join(feedback.batches),
            }
        )
        # Without a gold judge, an independently trained reward model (another seed) judges, as in the pipeline.
        judge = None
        if not config.data.is_builtin:
            judge_config = config.model_copy(update={"seed": config.seed + 1})
            judge, _ = call_stage(
                reward_task,
                judge_config,
                start.reference,
                data.paths["preferences"],
                data.paths["preferences_heldout"],
                parent_id,
            )
            mlflow.set_tag("rlhf.judge_reward_run", judge.run_id)
        evaluation, _ = call_stage(
            evaluate_task,
            config,
            policy_start,
            reward,
            ppo,
            data.paths["heldout_prompts"],
            parent_id,
            heldout_reward=judge,
        )
        mlflow.log_metrics(evaluation.metrics)
        version, _ = call_stage(register_task, config, ppo, evaluation, data.fingerprints, parent_id, reward)
        feedback_lineage_task(version.name, version.version, feedback.batches)
        mlflow.set_tags({"registry.version": version.version, "registry.reused": str(version.reused).lower()})
        ensure_baseline(config, version, data)
        logger.info(
            "Evaluation against the champion it continued:\n%s", format_table(evaluation.metrics, config.ppo.kl_target)
        )
        promotion = config.promotion.model_copy(update={"lock_dir": pipeline_lock_dir(config)})
        outcome = promote(version.name, version.version, promotion)
        return PipelineResult(parent_id, version.model_uri, evaluation.metrics, outcome)


if __name__ == "__main__":
    rlhf_feedback()
