"""The comparison flow: several training algorithms (and seeds) from one SFT policy and reward model.

Wiring only. One MLflow parent run (``compare-<flow run>``); validation, SFT and the reward model
run once and are shared; each algorithm and seed gets a child run (``<algorithm>-seed<k>``) holding
its training stage and the same evaluate stage as the pipeline's; then the comparison run logs the
frontier plot, the table and the winner within the KL budget (tasks/compare.py). The winner's best
seed is registered (tag ``lineage.algorithm``) with its drift baseline, ready for `rlhf promote`;
nothing is promoted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows.pipeline import ensure_baseline, train_policy
from rlhf.builtin.model import resolve_base_model
from rlhf.builtin.task import resolve_data_paths
from rlhf.config import ALGORITHMS, Algorithm, ConfigError, PipelineConfig, resolve_config
from rlhf.infra.env import quiet_defaults
from tasks.caching import call_stage
from tasks.common import pipeline_run
from tasks.compare import Candidate, Comparison, algorithm_run, compare_task
from tasks.evaluate import evaluate_task
from tasks.register import register_task
from tasks.reward import reward_task
from tasks.sft import sft_task
from tasks.validate import validate_task


@dataclass(frozen=True)
class CompareResult:
    """What a comparison produced, by reference."""

    parent_run_id: str
    comparison: Comparison
    model_uri: str | None
    """The registered version of the winner's best seed; None when no algorithm won within the KL budget."""


@flow(name="rlhf-compare")
def rlhf_compare(
    algorithms: tuple[Algorithm, ...] = ALGORITHMS,
    seeds: tuple[int, ...] = (0,),
    config: PipelineConfig = PipelineConfig(),
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> CompareResult:
    """Train each algorithm with each seed from one SFT policy and reward model; compare them on one frontier.

    Args:
        algorithms: Which of ppo, dpo, rloo, grpo to compare (each with its config section's options).
        seeds: The seeds each algorithm trains with (SFT and the reward model use config.seed).
        config: The whole configuration (used when config_file is not given).
        config_file: A preset such as configs/gpu.yaml; it replaces config.
        overrides: section.field=value strings (as `rlhf compare --set`), applied on top.
    """
    config = resolve_config(config, config_file, overrides)
    if not algorithms or len(set(algorithms)) != len(algorithms) or not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"compare needs distinct algorithms and distinct seeds (got {algorithms}, {seeds}): "
            "e.g. --algorithms ppo,dpo,rloo,grpo --seeds 0,1"
        )
    # each algorithm's and seed's config, validated before anything trains
    trained = {
        (a, s): resolve_config(config, overrides=[f"algorithm={a}", f"seed={s}"]) for s in seeds for a in algorithms
    }
    quiet_defaults()
    logger = get_run_logger()
    flow_run = FlowRunContext.get().flow_run
    with pipeline_run(config, flow_run.name, str(flow_run.id), kind="compare") as parent_id:
        run_dir = Path(config.output_dir).resolve() / parent_id
        logger.info("MLflow parent run %s, outputs in %s", parent_id, run_dir)

        # 1. Shared: data, SFT policy, reward model (and a judge reward model without a gold judge).
        paths = resolve_data_paths(config.data, run_dir, config.seed)
        base_model = resolve_base_model(config.model.base_model, Path(config.output_dir) / "base-models", config.seed)
        data, _ = call_stage(
            validate_task, config, paths, str(run_dir / "validated"), parent_id, tokenizer_path=base_model
        )
        mlflow.set_tags({f"data.fingerprint.{split}": fp for split, fp in data.fingerprints.items()})
        mlflow.set_tag("validation.success", "true")
        sft, _ = call_stage(sft_task, config, base_model, data.paths["sft"], parent_id)
        reward, _ = call_stage(
            reward_task, config, sft, data.paths["preferences"], data.paths["preferences_heldout"], parent_id
        )
        judge = None
        if not config.data.is_builtin:
            judge_config = config.model_copy(update={"seed": config.seed + 1})
            judge, _ = call_stage(
                reward_task, judge_config, sft, data.paths["preferences"], data.paths["preferences_heldout"], parent_id
            )

        # 2. Each algorithm and seed: train, then the pipeline's evaluate stage (on the flow's seed: one
        #    selection/test split and one set of random numbers for every candidate).
        candidates = []
        for seed in seeds:
            for algorithm in algorithms:
                cfg = trained[(algorithm, seed)]
                with algorithm_run(parent_id, algorithm, seed) as child_id:
                    policy, _ = train_policy(cfg, sft, reward, data, child_id)
                    evaluation, _ = call_stage(
                        evaluate_task,
                        config.model_copy(update={"algorithm": algorithm}),
                        sft,
                        reward,
                        policy,
                        data.paths["heldout_prompts"],
                        child_id,
                        heldout_reward=judge,
                    )
                candidates.append(Candidate(algorithm, seed, cfg, child_id, policy, evaluation))

        # 3. The comparison run; the winner's best seed registered, ready for promotion.
        comparison = compare_task(config, candidates, parent_id)
        logger.info("Comparison of %s:\n%s", ", ".join(algorithms), comparison.markdown)
        if comparison.winner is None:
            return CompareResult(parent_id, comparison, None)
        best = max((c for c in candidates if c.algorithm == comparison.winner), key=lambda c: c.evaluation.judge_score)
        version, _ = call_stage(
            register_task, best.config, best.policy, best.evaluation, data.fingerprints, parent_id, reward
        )
        # The runs the registered version came from, by stage: SFT and the reward model may come from Prefect's cache
        # (earlier parent runs) and the policy's runs sit under its candidate run; monitoring's lineage reads this tag.
        stage_runs = {
            "sft": sft.run_id,
            "reward": reward.run_id,
            best.algorithm: best.policy.final.run_id,
            "evaluate": best.evaluation.run_id,
        }
        mlflow.set_tags(
            {
                "compare.winner": comparison.winner,
                "registry.version": version.version,
                "rlhf.stage_runs": ",".join(f"{stage}={run_id}" for stage, run_id in stage_runs.items()),
            }
        )
        ensure_baseline(best.config, version, data)
        return CompareResult(parent_id, comparison, version.model_uri)


if __name__ == "__main__":
    rlhf_compare()
