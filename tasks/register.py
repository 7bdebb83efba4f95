"""Register the chosen PPO checkpoint in the MLflow Model Registry with its lineage and evaluation.

Each pipeline run adds a version of ``registered_model`` (a pyfunc that serves
generation) holding the checkpoint the evaluate stage chose, not simply the last.
Tags on the version trace it to the pipeline run (``lineage.*``: parent run id,
PPO run and checkpoint, and what it was trained from: data fingerprints, code
fingerprint, config hash; tasks/caching.py ``training_lineage``) and carry the evidence
promotion gates read: ``eval.*`` metrics, ``hacking.*`` flags and
``validation.success``. Promotion (gates, then aliases, then ``gate.*`` tags) is
flows/promote.py's job.

Registration is idempotent: a checkpoint already registered under the model (same
``lineage.checkpoint_uri`` and config hash: a re-run whose stages all came from the
cache, or a Prefect retry after a lost connection) returns the existing version
instead of adding a duplicate. The tags are written with the version in one call,
so a version is never visible without its lineage.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger

import models
from models.policy import ADAPTER_DIR
from rlhf.config import PipelineConfig
from rlhf.drift.lineage import BASELINE_TAG, TRUST_REMOTE_CODE_TAG
from rlhf.infra.integrity import MANIFEST
from rlhf.infra.tracking import download, stage_run
from rlhf.ppo.trainer import OPTIMIZER_FILE, RNG_FILE
from rlhf.registry.promotion import lock_path, registry_lock
from tasks.caching import training_lineage
from tasks.common import REGISTER, RETRY_ON_TRACKING_ERROR, Checkpoint, Evaluation, PPOResult, config_hash

TRAINING_ONLY_FILES = (OPTIMIZER_FILE, RNG_FILE, ADAPTER_DIR, "training_args.bin", MANIFEST)
"""Files that resume or describe training but play no part in serving (not shipped with the model): a LoRA
run's adapters are merged into the weights already.
The checkpoint's manifest lists the training-only files too; the logged model has MLflow's own layout."""
REGISTER_LOCK_TIMEOUT_S = 900.0
"""How long a registration waits for another one of the same model (logging a large model takes minutes)."""
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.0,<6", "safetensors", "pandas"]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str
    reused: bool = False
    """True when the checkpoint was already registered and that version is returned."""
    baseline_uri: str | None = None
    """The version's drift baseline, when it has one already (a reused version)."""


def validation_status(parent_run_id: str) -> str:
    """'true'/'false' from the pipeline run's validate stage (or the parent's tag when it came from the cache)."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`rlhf.stage` = 'validate'"
    )
    if runs:
        return runs[0].data.tags.get("validation.success", "missing")
    return parent.data.tags.get("validation.success", "missing")


def registered_version(name: str, checkpoint_uri: str, cfg_hash: str) -> RegisteredVersion | None:
    """The version of `name` that already holds this checkpoint (same config hash), if any."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for v in sorted(versions, key=lambda v: int(v.version)):
        tags = v.tags or {}
        if tags.get("lineage.checkpoint_uri") == checkpoint_uri and tags.get("lineage.config_hash") == cfg_hash:
            return RegisteredVersion(name, str(v.version), f"models:/{name}/{v.version}", True, tags.get(BASELINE_TAG))
    return None


def register_reward_model(name: str, reward: Checkpoint) -> str:
    """The reward stage's checkpoint as a version of `name` (once: a reward stage reused from the cache keeps
    its version); returns the version number."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = []
    for v in versions:
        if (v.tags or {}).get("lineage.checkpoint_uri") == reward.uri:
            return str(v.version)
    if not versions:
        try:
            client.create_registered_model(name, description="Bradley-Terry reward models of the RLHF pipeline")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another pipeline created it meanwhile
                raise
    tags = {"lineage.checkpoint_uri": reward.uri, "lineage.reward_run_id": reward.run_id}
    return str(client.create_model_version(name, source=reward.uri, run_id=reward.run_id, tags=tags).version)


def servable_copy(checkpoint_dir: Path, into: str | Path) -> Path:
    """A copy (``<into>/policy``) of a checkpoint folder without its training-only state (optimizer, RNG)."""
    out = Path(into) / "policy"
    shutil.copytree(checkpoint_dir, out, ignore=shutil.ignore_patterns(*TRAINING_ONLY_FILES))
    return out


def serving_signature_params(cfg: PipelineConfig, policy_dir: str | Path) -> dict[str, int | float]:
    """The served model's params and their defaults: generation settings, and the limits a request is checked
    against (models/serving.py), so clients read them from the signature."""
    from models.serving import serving_limits  # imported here: the module registers its model with MLflow on import

    limits = serving_limits(policy_dir, cfg.model.trust_remote_code)
    return {
        "max_new_tokens": min(cfg.eval.max_new_tokens, limits["max_new_tokens_limit"]),
        "temperature": cfg.eval.temperature,
        **limits,
    }


def version_tags(
    cfg: PipelineConfig,
    ppo: PPOResult,
    evaluation: Evaluation,
    fingerprints: dict[str, str],
    parent_run_id: str,
    validation: str,
) -> dict[str, str]:
    """Lineage, evaluation, hacking and validation tags of a new model version."""
    return {
        "lineage.pipeline_run_id": parent_run_id,
        "lineage.ppo_run_id": evaluation.checkpoint.run_id,
        "lineage.evaluate_run_id": evaluation.run_id,
        "lineage.checkpoint_uri": evaluation.checkpoint.uri,
        "lineage.checkpoint_step": str(evaluation.step),
        "lineage.final_checkpoint_uri": ppo.final.uri,
        "lineage.algorithm": cfg.algorithm,  # ppo, dpo, rloo or grpo: the stage that trained the checkpoint
        **training_lineage(cfg, fingerprints),  # data, code and config: what a retraining compares with
        TRUST_REMOTE_CODE_TAG: str(cfg.model.trust_remote_code).lower(),  # monitoring loads the models the same way
        **{
            k: f"{v:.6g}" for k, v in evaluation.metrics.items() if not k.startswith("eval/hacking/")
        },  # metric names as tag keys
        **evaluation.tags,
        "validation.success": validation,
        "promotion.status": "registered",
    }


def run_register(
    cfg: PipelineConfig,
    ppo: PPOResult,
    evaluation: Evaluation,
    fingerprints: dict[str, str],
    parent_run_id: str,
    reward: Checkpoint | None = None,
) -> RegisteredVersion:
    """Log the chosen checkpoint as a pyfunc model and register a new version of it (or return the one holding it).

    With ``reward``, the reward model is registered too (``cfg.registered_reward_model``) and the policy version's
    tag ``lineage.reward_model`` names its version (``models:/rlhf-reward/N``). The check for an existing version
    and the registration happen under one lock per registered model, so two pipelines that chose the same
    checkpoint register it once (the second returns the first's version).
    """
    with registry_lock(registration_lock_path(cfg), REGISTER_LOCK_TIMEOUT_S, "registration"):
        existing = registered_version(cfg.registered_model, evaluation.checkpoint.uri, config_hash(cfg))
        if existing is not None:
            get_logger(__name__).info(
                "%s version %s already holds checkpoint %s: not registering a duplicate",
                existing.name,
                existing.version,
                evaluation.checkpoint.uri,
            )
            return existing
        return _register(cfg, ppo, evaluation, fingerprints, parent_run_id, reward)


def pipeline_lock_dir(cfg: PipelineConfig) -> str | None:
    """Where the pipeline's registration and promotion locks live: promotion.lock_dir; for a remote registry
    without one, output_dir, which guards the pipelines of this machine; else None (beside the local store)."""
    if cfg.promotion.lock_dir is None and urlparse(mlflow.get_registry_uri()).scheme not in ("", "file", "sqlite"):
        return str(Path(cfg.output_dir).resolve())
    return cfg.promotion.lock_dir


def registration_lock_path(cfg: PipelineConfig) -> Path:
    """The registration lock of cfg.registered_model (see pipeline_lock_dir)."""
    return lock_path(mlflow.get_registry_uri(), cfg.registered_model, pipeline_lock_dir(cfg), purpose="register")


def _register(
    cfg: PipelineConfig,
    ppo: PPOResult,
    evaluation: Evaluation,
    fingerprints: dict[str, str],
    parent_run_id: str,
    reward: Checkpoint | None,
) -> RegisteredVersion:
    with stage_run(parent_run_id, REGISTER), tempfile.TemporaryDirectory(prefix="rlhf-register-") as scratch:
        policy_dir = servable_copy(download(evaluation.checkpoint.uri, scratch), scratch)
        example = pd.DataFrame({"prompt": ["Customer: Where is my lamp?\nAgent:"]})
        serving_params = serving_signature_params(cfg, policy_dir)
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(Path(models.__file__).parent / "serving.py"),
            artifacts={"policy": str(policy_dir)},
            code_paths=[str(Path(models.__file__).parent)],
            pip_requirements=PIP_REQUIREMENTS,
            signature=infer_signature(example, pd.DataFrame({"response": ["..."]}), params=serving_params),
            input_example=(example, serving_params),
            model_config={"trust_remote_code": cfg.model.trust_remote_code},
        )
        tags = version_tags(cfg, ppo, evaluation, fingerprints, parent_run_id, validation_status(parent_run_id))
        if reward is not None:
            reward_version = register_reward_model(cfg.registered_reward_model, reward)
            tags["lineage.reward_model"] = f"models:/{cfg.registered_reward_model}/{reward_version}"
            tags["lineage.reward_run_id"] = reward.run_id
        # The version number is taken in the registry's transaction: concurrent pipelines get distinct ones.
        version = str(mlflow.register_model(info.model_uri, cfg.registered_model, tags=tags).version)
        mlflow.set_tags({"registry.model": cfg.registered_model, "registry.version": version})
        return RegisteredVersion(cfg.registered_model, version, f"models:/{cfg.registered_model}/{version}")


@task(name=REGISTER, cache_policy=NO_CACHE, **RETRY_ON_TRACKING_ERROR)
def register_task(
    cfg: PipelineConfig,
    ppo: PPOResult,
    evaluation: Evaluation,
    fingerprints: dict[str, str],
    parent_run_id: str,
    reward: Checkpoint | None = None,
) -> RegisteredVersion:
    """Register the chosen checkpoint as a new model version (and the reward model it was trained against)."""
    return run_register(cfg, ppo, evaluation, fingerprints, parent_run_id, reward)
