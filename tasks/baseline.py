"""Baseline profile of a registered policy version, for drift monitoring (flows/monitor.py).

At registration the champion-to-be answers a sample of the prompts production is
expected to resemble (held-out evaluation prompts plus PPO training prompts). The
profile records prompt tokens, intents, lengths and embeddings, and of the
champion's own samples the reward-model scores, lengths, NLL, KL to the
reference, refusal and violation rates and (built-in task) gold rewards. It is
logged as the artifact folder ``baseline/`` of the version's run, and the version
gets the tag ``baseline.uri``.
"""

from __future__ import annotations

import random
import tempfile

import torch
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.builtin.task import task_knowledge
from rlhf.config import BaselineConfig, PipelineConfig
from rlhf.data.loading import load_split
from rlhf.drift.features import embed_prompts, prompt_features, response_features, sample_kl
from rlhf.drift.lineage import BASELINE_TAG, resolve_lineage
from rlhf.drift.profile import Baseline, build_profile
from rlhf.evaluation.task import TaskKnowledge
from rlhf.infra.distributed import device as distributed_device
from rlhf.infra.tracking import download
from tasks.common import BASELINE

BASELINE_ARTIFACT = "baseline"


def compute_baseline(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    reward_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    cfg: BaselineConfig = BaselineConfig(),
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    task: TaskKnowledge | None = None,
    seed: int = 0,
    models: dict[str, str] | None = None,
) -> Baseline:
    """Profile the policy on a seeded sample of prompts (see the module docstring)."""
    if len(prompts) < 2:
        raise ValueError(f"a baseline needs at least 2 prompts, got {len(prompts)}: pass the evaluation prompts")
    rng = random.Random(seed)
    prompts = rng.sample(prompts, min(len(prompts), cfg.max_prompts))
    torch.manual_seed(seed)
    # 1. prompt side: tokens, intents, lengths of every sampled prompt; embeddings of a subset
    features = prompt_features(tokenizer, prompts, task)
    embeddings = embed_prompts(reference, tokenizer, prompts[: cfg.embedding_rows], cfg.batch_size)
    # 2. the policy's own answers and their KL to the reference
    answered = prompts[: cfg.responses]
    responses, kl = sample_kl(policy, reference, tokenizer, answered, max_new_tokens, temperature, cfg.batch_size)
    # 3. what the monitor compares windows with: scores, lengths, NLL, rates, gold
    scored = response_features(policy, reward_model, tokenizer, answered, responses, task, cfg.batch_size)
    return build_profile(
        features,
        embeddings,
        scored,
        kl,
        models or {},
        {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed},
        task.feedback_probability if task else None,
    )


def log_baseline(baseline: Baseline, model_name: str, version: str) -> str:
    """Log the baseline to the version's run (``baseline/``) and tag the version ``baseline.uri``; returns it."""
    client = MlflowClient()
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:
        raise ValueError(f"{model_name} version {version} has no run to hold its baseline: register it from a run")
    with tempfile.TemporaryDirectory(prefix="rlhf-baseline-") as tmp:
        baseline.save(tmp)
        client.log_artifacts(run_id, tmp, BASELINE_ARTIFACT)
    uri = f"runs:/{run_id}/{BASELINE_ARTIFACT}"
    client.set_model_version_tag(model_name, version, BASELINE_TAG, uri)
    return uri


def read_prompts(paths: list[str]) -> list[str]:
    """The prompts of the given files, repeats kept (they are part of the distribution production will show)."""
    return [prompt for path in paths for prompt in load_split(path)["prompt"]]


def run_baseline(
    cfg: PipelineConfig,
    model_name: str,
    version: str,
    prompt_paths: list[str],
    baseline_cfg: BaselineConfig = BaselineConfig(),
) -> str:
    """Compute the baseline of a registered version from its lineage's checkpoints and log it; returns baseline.uri."""
    lineage = resolve_lineage(MlflowClient(), model_name, version)
    trust = cfg.model.trust_remote_code or lineage.trust_remote_code
    device = distributed_device()
    with tempfile.TemporaryDirectory(prefix="rlhf-baseline-") as scratch:  # the models are read into memory
        policy_dir, ref_dir, rm_dir = (
            str(download(u, scratch)) for u in (lineage.policy_uri, lineage.reference_uri, lineage.reward_model_uri)
        )
        tokenizer = load_tokenizer(ref_dir, trust)
        policy = load_causal_lm(policy_dir, trust_remote_code=trust).to(device).eval()
        reference = load_causal_lm(ref_dir, trust_remote_code=trust).to(device).eval()
        reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id, trust_remote_code=trust).to(device).eval()
    baseline = compute_baseline(
        policy,
        reference,
        reward_model,
        tokenizer,
        read_prompts(prompt_paths),
        baseline_cfg,
        max_new_tokens=cfg.ppo.max_new_tokens,
        temperature=cfg.ppo.temperature,
        task=task_knowledge(cfg.data),
        seed=cfg.seed,
        models={
            "policy": lineage.policy_uri,
            "reference": lineage.reference_uri,
            "reward_model": lineage.reward_model_uri,
        },
    )
    return log_baseline(baseline, model_name, version)


@task(name=BASELINE, cache_policy=NO_CACHE)
def baseline_task(
    cfg: PipelineConfig,
    model_name: str,
    version: str,
    prompt_paths: list[str],
    baseline_cfg: BaselineConfig = BaselineConfig(),
) -> str:
    """Drift-monitoring baseline of a newly registered version."""
    return run_baseline(cfg, model_name, version, prompt_paths, baseline_cfg)
