"""Register the PPO policy in the MLflow Model Registry with its lineage and evaluation.

Each pipeline run adds a version of ``registered_model`` (a pyfunc that serves
generation). Tags on the version trace it to the pipeline run, the data
fingerprints and the config hash. Promotion (moving aliases) is flows/promote.py's
job, after its gates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

import models
from rlhf.config import PipelineConfig
from rlhf.tracking import download, stage_run
from tasks.evaluate import Evaluation
from tasks.ppo import PPOResult

SERVING_PARAMS = {"max_new_tokens": 48, "temperature": 1.0}
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.0,<6", "safetensors", "pandas"]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str


def config_hash(cfg: PipelineConfig) -> str:
    """Short stable hash of the resolved config."""
    return hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def run_register(
    cfg: PipelineConfig, ppo: PPOResult, evaluation: Evaluation, fingerprints: dict[str, str], parent_run_id: str
) -> RegisteredVersion:
    """Log the final policy as a pyfunc model and register a new version of it."""
    with stage_run(parent_run_id, "register") as run:
        policy_dir = download(ppo.final.uri)
        example = pd.DataFrame({"prompt": ["Customer: Where is my lamp?\nAgent:"]})
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(Path(models.__file__).parent / "serving.py"),
            artifacts={"policy": str(policy_dir)},
            code_paths=[str(Path(models.__file__).parent)],
            pip_requirements=PIP_REQUIREMENTS,
            signature=infer_signature(example, pd.DataFrame({"response": ["..."]}), params=SERVING_PARAMS),
            input_example=(example, SERVING_PARAMS),
            registered_model_name=cfg.registered_model,
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        tags = {
            "lineage.pipeline_run_id": parent_run_id,
            "lineage.ppo_run_id": ppo.final.run_id,
            "lineage.checkpoint_uri": ppo.final.uri,
            "lineage.config_hash": config_hash(cfg),
            **{f"lineage.data.{split}": fp for split, fp in fingerprints.items()},
            **{k.replace("/", "."): f"{v:.4f}" for k, v in evaluation.metrics.items()},
        }
        for key, value in tags.items():
            client.set_model_version_tag(cfg.registered_model, version, key, value)
        mlflow.set_tags({"registry.model": cfg.registered_model, "registry.version": version})
        return RegisteredVersion(cfg.registered_model, version, f"models:/{cfg.registered_model}/{version}")


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    cfg: PipelineConfig, ppo: PPOResult, evaluation: Evaluation, fingerprints: dict[str, str], parent_run_id: str
) -> RegisteredVersion:
    """Register the policy as a new model version."""
    return run_register(cfg, ppo, evaluation, fingerprints, parent_run_id)
