"""DPO, RLOO and GRPO stages on the tiny stack: each trains at smoke size, logs its metrics under our names and
its checkpoints by step, passes through the evaluate stage unchanged, and registers a version tagged with its
algorithm."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from models.loading import load_causal_lm
from rlhf.config import load_config
from rlhf.drift.lineage import resolve_lineage
from rlhf.infra.tracking import download
from tasks.dpo import run_dpo
from tasks.evaluate import run_evaluate
from tasks.grpo import run_grpo
from tasks.register import run_register
from tasks.rloo import run_rloo

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_METRICS = {
    "dpo": {"dpo/loss", "dpo/rewards_margin", "dpo/rewards_accuracy", "objective/scores", "objective/gold_scores"},
    "rloo": {
        "objective/scores",
        "objective/gold_scores",
        "objective/kl_token_k1",
        "loss/policy_avg",
        "response/eos_rate",
    },
    "grpo": {
        "objective/scores",
        "objective/gold_scores",
        "objective/kl_token_k3",
        "loss/policy_avg",
        "response/eos_rate",
    },
}
"""Our names for TRL's metrics (tasks/policy.py METRIC_NAMES) that each stage must log, beside objective/kl."""


def train(algorithm: str, stack, cfg, parent_run_id: str):
    paths = stack.paths
    if algorithm == "dpo":
        return run_dpo(cfg, stack.sft, stack.reward, paths["preferences"], paths["prompts"], parent_run_id)
    run = run_rloo if algorithm == "rloo" else run_grpo
    return run(cfg, stack.sft, stack.reward, paths["prompts"], parent_run_id)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "rloo", "grpo"])
def test_algorithm_trains_evaluates_and_registers_with_its_tag(tiny_stack, algorithm, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_stack.tracking_uri)
    mlflow.set_tracking_uri(tiny_stack.tracking_uri)
    # smoke sizes (4 steps, checkpoints at 2 and 4); DPO's learning rate raised so 4 steps of 8 pairs move it
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"algorithm={algorithm}", "dpo.learning_rate=1e-3", "data.max_heldout_prompts=8", "eval.max_new_tokens=16"],
    )
    client = MlflowClient()
    experiment_id = client.get_run(tiny_stack.parent_run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline-{algorithm}") as parent:
        result = train(algorithm, tiny_stack, cfg, parent.info.run_id)

        # checkpoints by step, step 0 the SFT policy itself, the final one the last step's
        assert sorted(result.checkpoints) == [0, 2, 4]
        assert result.checkpoints[0] == tiny_stack.sft.uri
        assert result.final.uri == result.checkpoints[4]
        stage = client.get_run(result.final.run_id)
        assert stage.data.tags["rlhf.stage"] == algorithm
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
        logged = set(stage.data.metrics)
        assert EXPECTED_METRICS[algorithm] <= logged, EXPECTED_METRICS[algorithm] - logged
        assert not any(name.startswith(f"{algorithm}/{algorithm}/") for name in logged)
        # objective/kl is probed at each logged checkpoint, as PPO measures it (finite, on the policy's samples)
        kl = client.get_metric_history(result.final.run_id, "objective/kl")
        assert sorted(m.step for m in kl) == [2, 4] and all(torch.isfinite(torch.tensor(m.value)) for m in kl)

        # the policy moved away from SFT
        with torch.no_grad():
            scratch = tmp_path / "ckpt"
            sft = load_causal_lm(str(download(tiny_stack.sft.uri, scratch)))
            final = load_causal_lm(str(download(result.final.uri, scratch)))
            moved = max((a - b).abs().max().item() for a, b in zip(sft.parameters(), final.parameters()))
        assert moved > 1e-4
        if algorithm == "dpo":  # the first step's loss is log 2 (policy = reference); training lowers it
            losses = [m.value for m in client.get_metric_history(result.final.run_id, "dpo/loss")]
            assert losses[0] == pytest.approx(0.6931, abs=1e-3)
            assert min(losses[1:]) < losses[0]

        # the same evaluate and register stages as PPO's, unchanged
        evaluation = run_evaluate(
            cfg, tiny_stack.sft, tiny_stack.reward, result, tiny_stack.paths["heldout_prompts"], parent.info.run_id
        )
        assert evaluation.step in result.checkpoints
        assert evaluation.checkpoint.uri == result.checkpoints[evaluation.step]
        assert evaluation.checkpoint.run_id == result.final.run_id
        assert evaluation.tags["eval.judge"] == "gold"
        selection = client.get_metric_history(evaluation.run_id, "eval/selection/kl_mean")
        assert sorted(m.step for m in selection) == [0, 2, 4]
        version = run_register(cfg, result, evaluation, {}, parent.info.run_id, tiny_stack.reward)
        # SFT and the reward model ran under the tiny stack's parent: named as the pipeline names cached stages
        mlflow.set_tag("rlhf.stage_runs", f"sft={tiny_stack.sft.run_id},reward={tiny_stack.reward.run_id}")
    tags = client.get_model_version(version.name, version.version).tags
    assert tags["lineage.algorithm"] == algorithm
    assert tags["lineage.checkpoint_uri"] == evaluation.checkpoint.uri
    assert tags["lineage.reward_model"].startswith("models:/rlhf-reward/")
    # monitoring's lineage finds this algorithm's stage run and checkpoints (what a drift report points to)
    lineage = resolve_lineage(client, version.name, version.version)
    assert lineage.algorithm == algorithm and lineage.stage_runs[algorithm] == result.final.run_id
    assert sorted(lineage.policy_checkpoints) == [2, 4]  # step 0 is the SFT checkpoint, in the SFT run
