"""From a registered policy version to the runs and checkpoints that made it (MLflow registry and tracking).

tasks/register.py tags each version with ``lineage.pipeline_run_id`` and
``lineage.checkpoint_uri``; the pipeline's parent run has one child run per stage
tagged ``rlhf.stage`` (sft, reward, ppo, evaluate, register, ...), each with a
``checkpoint`` artifact folder (the policy stage, ppo/dpo/rloo/grpo as the version's
``lineage.algorithm`` tag says: ``checkpoints/step_XXXXX``). The reference policy is
the SFT checkpoint; the reward model is the reward stage's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

BASELINE_TAG = "baseline.uri"


TRUST_REMOTE_CODE_TAG = "lineage.trust_remote_code"


class LineageError(LookupError):
    """A model version whose lineage cannot be followed; the message says what to fix."""


@dataclass(frozen=True)
class Lineage:
    """A registered policy version and the runs and checkpoints behind it."""

    model_name: str
    version: str
    run_id: str
    """The version's own run (the register stage), where the baseline is stored."""
    pipeline_run_id: str
    stage_runs: dict[str, str]
    """rlhf.stage -> run id (the latest run of each stage)."""
    policy_uri: str
    reference_uri: str
    reward_model_uri: str
    algorithm: str
    """The policy stage that trained the version (tag lineage.algorithm; versions from before it: ppo)."""
    policy_checkpoints: dict[int, str]
    """Step -> URI of each checkpoint the policy stage logged."""
    baseline_uri: str | None
    trust_remote_code: bool = False
    """Whether the version's checkpoints need their shipped model code (tag lineage.trust_remote_code)."""


def model_version(
    client: MlflowClient, name: str, version: str | None = None, alias: str | None = None
) -> ModelVersion:
    """A version by number, else by alias; raises naming the fix when neither exists."""
    try:
        if version is not None:
            return client.get_model_version(name, version)
        if alias is None:
            raise LineageError("pass a version or an alias of the registered model")
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        what = f"version {version}" if version is not None else f"alias {alias!r}"
        raise LineageError(
            f"registered model {name!r} has no {what} in {client.tracking_uri}: register a policy with "
            "`rlhf run` (make demo) and promote it to the alias (`rlhf promote`), or pick another version "
            "(--alias, or --set monitor.version=N; MonitorConfig.version / alias)"
        ) from e


def resolve_lineage(client: MlflowClient, name: str, version: str | None = None, alias: str | None = None) -> Lineage:
    """Follow a version's lineage tags to its pipeline's stage runs and checkpoints."""
    mv = model_version(client, name, version, alias)
    tags = mv.tags or {}
    missing = [k for k in ("lineage.pipeline_run_id", "lineage.checkpoint_uri") if k not in tags]
    if missing:
        raise LineageError(
            f"{name} version {mv.version} lacks the tags {missing}: register it with tasks/register.py, "
            "which records the pipeline run and checkpoint it came from"
        )
    pipeline_id = tags["lineage.pipeline_run_id"]
    pipeline = client.get_run(pipeline_id)
    children = client.search_runs(
        [pipeline.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline_id}'",
        order_by=["attributes.start_time ASC"],
    )
    stage_runs, artifact_uris = {}, {}
    for run in children:  # later runs of a stage (re-runs) win
        stage = run.data.tags.get("rlhf.stage")
        if stage:
            stage_runs[stage] = run.info.run_id
            artifact_uris[stage] = run.info.artifact_uri
    # Stages the pipeline reused from Prefect's cache ran under an earlier pipeline run; flows/pipeline.py
    # names the runs it used in the tag rlhf.stage_runs ("sft=<id>,reward=<id>,<algorithm>=<id>").
    for item in pipeline.data.tags.get("rlhf.stage_runs", "").split(","):
        stage, _, run_id = item.partition("=")
        if run_id and stage not in stage_runs:
            stage_runs[stage] = run_id
            artifact_uris[stage] = client.get_run(run_id).info.artifact_uri
    for stage in ("sft", "reward"):
        if stage not in stage_runs:
            raise LineageError(
                f"pipeline run {pipeline_id} of {name} version {mv.version} has no child run tagged rlhf.stage={stage}: "
                "the reference and reward model are found there; re-run the pipeline or log the stage"
            )
    algorithm = tags.get("lineage.algorithm", "ppo")
    checkpoints: dict[int, str] = {}
    if algorithm in stage_runs:
        for item in client.list_artifacts(stage_runs[algorithm], "checkpoints"):
            match = re.search(r"step_(\d+)$", item.path)
            if item.is_dir and match:
                checkpoints[int(match.group(1))] = f"{artifact_uris[algorithm]}/{item.path}"
    return Lineage(
        model_name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        pipeline_run_id=pipeline_id,
        stage_runs=stage_runs,
        policy_uri=tags["lineage.checkpoint_uri"],
        reference_uri=f"{artifact_uris['sft']}/checkpoint",
        reward_model_uri=f"{artifact_uris['reward']}/checkpoint",
        algorithm=algorithm,
        policy_checkpoints=checkpoints,
        baseline_uri=tags.get(BASELINE_TAG),
        trust_remote_code=tags.get(TRUST_REMOTE_CODE_TAG) == "true",
    )
