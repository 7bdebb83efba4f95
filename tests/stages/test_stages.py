"""Tier 2: each training stage, tiny, learns something."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_sft_lowers_loss(tiny_stack):
    client = MlflowClient(tiny_stack.tracking_uri)
    history = [m.value for m in client.get_metric_history(tiny_stack.sft.run_id, "sft/loss")]
    assert len(history) >= 5
    assert history[-1] < 0.25 * history[0], history


def test_reward_model_ranks_heldout_pairs_like_the_gold_judge(tiny_stack):
    client = MlflowClient(tiny_stack.tracking_uri)
    metrics = client.get_run(tiny_stack.reward.run_id).data.metrics
    # The rater agrees with the gold order on ~85% of training pairs; chance is 50%.
    assert metrics["reward/accuracy"] >= 0.75, metrics


def test_checkpoints_are_logged_in_hf_layout(tiny_stack):
    mlflow.set_tracking_uri(tiny_stack.tracking_uri)
    for ckpt in (tiny_stack.sft, tiny_stack.reward):
        files = {f.path for f in MlflowClient().list_artifacts(ckpt.run_id, "checkpoint")}
        assert {"checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/tokenizer.json"} <= files
