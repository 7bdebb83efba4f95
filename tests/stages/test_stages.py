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
    # The rater agrees with the gold order on ~85% of training pairs; chance is 50%. The fixture trains only
    # 160 steps: at the default learning rate 3e-4 (issue 15) it reached 0.744 in CI, the full 250-step demo
    # 0.84-0.92 (docs/evaluation.md); a reward model that learnt nothing sits near 0.5.
    assert metrics["reward/accuracy"] >= 0.7, metrics["reward/accuracy"]


def test_reward_model_does_not_depend_on_what_ran_before_it(tiny_stack, mlflow_store, tmp_path):
    """The new score head is initialised from the seed: a run whose SFT stage came from the cache (nothing trained
    before it in the process) gets the same reward model as one that trained SFT first."""
    import torch
    from safetensors.torch import load_file

    from rlhf.infra.tracking import download
    from tasks.reward import train_reward

    reward = tiny_stack.cfg.reward.model_copy(update={"max_steps": 2, "max_heldout_pairs": 8})
    cfg = tiny_stack.cfg.model_copy(update={"reward": reward})
    heads = []
    for earlier_draws in (0, 1000):
        torch.rand(earlier_draws)  # what an earlier stage in the same process would have drawn
        with mlflow.start_run():
            uri = train_reward(
                cfg, tiny_stack.sft.uri, tiny_stack.paths["preferences"], tiny_stack.paths["preferences_heldout"]
            )
        folder = download(uri, tmp_path / str(earlier_draws))
        heads.append(load_file(folder / "model.safetensors")["score.weight"])
    assert torch.equal(heads[0], heads[1])


def test_checkpoints_are_logged_in_hf_layout(tiny_stack):
    mlflow.set_tracking_uri(tiny_stack.tracking_uri)
    for ckpt in (tiny_stack.sft, tiny_stack.reward):
        files = {f.path for f in MlflowClient().list_artifacts(ckpt.run_id, "checkpoint")}
        assert {"checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/tokenizer.json"} <= files


def test_training_runs_log_their_data_as_inputs_and_system_metrics(tiny_stack):
    from rlhf.infra.integrity import fingerprint_path
    from rlhf.infra.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    client = MlflowClient(tiny_stack.tracking_uri)
    for ckpt, splits in ((tiny_stack.sft, {"sft"}), (tiny_stack.reward, {"preferences", "preferences_heldout"})):
        run = client.get_run(ckpt.run_id)
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == splits
        for split, item in inputs.items():
            # run alone, without the validate stage's fingerprints on the parent: the file's own hash
            fingerprint = fingerprint_path(tiny_stack.paths[split])
            assert item.dataset.digest == fingerprint[:36]
            assert {t.key: t.value for t in item.tags} == {"mlflow.data.context": split, "fingerprint": fingerprint}
        # sampled every second in the tiny stack (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, tests/conftest.py)
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    experiment = client.get_experiment(client.get_run(tiny_stack.sft.run_id).info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING  # the UI's Model training view, not GenAI


def test_checkpoints_are_logged_models_with_their_metrics(tiny_stack):
    from rlhf.infra.tracking import CHECKPOINT_URI_TAG, checkpoint_model_id

    mlflow.set_tracking_uri(tiny_stack.tracking_uri)
    try:
        for ckpt, stage, metric in (
            (tiny_stack.sft, "sft", "sft/final_loss"),
            (tiny_stack.reward, "reward", "reward/accuracy"),
        ):
            model = mlflow.get_logged_model(checkpoint_model_id(ckpt.uri, ckpt.run_id))
            assert (model.name, model.model_type, model.source_run_id) == (f"{stage}-checkpoint", stage, ckpt.run_id)
            assert model.tags[CHECKPOINT_URI_TAG] == ckpt.uri
            (linked,) = [m for m in model.metrics if m.key == metric]
            assert linked.value == MlflowClient().get_run(ckpt.run_id).data.metrics[metric]
        assert checkpoint_model_id(str(tiny_stack.base_model), tiny_stack.sft.run_id) is None
    finally:
        mlflow.set_tracking_uri(None)
