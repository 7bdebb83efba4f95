"""LoRA through peft (model.lora_r): adapters train, and each stage logs a plain merged checkpoint."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlhf.config import load_config

pytestmark = pytest.mark.slow


def test_lora_sft_and_reward_log_merged_checkpoints(mlflow_store, tmp_path):
    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.builtin.model import resolve_base_model
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.infra.tracking import download, setup_experiment
    from tasks.reward import heldout_accuracy, heldout_pairs, run_reward
    from tasks.sft import run_sft

    cfg = load_config(
        None,
        [
            "model.lora_r=4",
            "sft.max_steps=4",
            "sft.batch_size=8",
            "reward.max_steps=2",
            "reward.batch_size=8",
            "reward.max_heldout_pairs=100",
            "sft.learning_rate=0.01",
        ],
    )
    paths = resolve_data_paths(cfg.data, tmp_path, cfg.seed)
    base = resolve_base_model(cfg.model.base_model, tmp_path / "base-models", cfg.seed)
    with mlflow.start_run(experiment_id=setup_experiment("lora")) as parent:
        sft = run_sft(cfg, base, paths["sft"], parent.info.run_id)
        reward = run_reward(cfg, sft, paths["preferences"], paths["preferences_heldout"], parent.info.run_id)

    sft_dir, rm_dir = download(sft.uri, tmp_path), download(reward.uri, tmp_path)
    # Plain Hugging Face checkpoints: merged weights, no adapter files, loadable by the next stages.
    for folder in (sft_dir, rm_dir):
        assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    before, after = load_file(f"{base}/model.safetensors"), load_file(str(sft_dir / "model.safetensors"))
    assert not any("lora" in key for key in after)
    # LoRA on every linear layer (GPT-2's Conv1D): attention and MLP weights moved; embeddings and
    # layer norms, which get no adapter, are bit for bit the base model's.
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert torch.equal(before["transformer.h.0.ln_1.weight"], after["transformer.h.0.ln_1.weight"])
    load_causal_lm(str(sft_dir))
    tokenizer = load_tokenizer(str(rm_dir))
    logged_rm = load_reward_model(str(rm_dir), pad_token_id=tokenizer.pad_token_id)
    # The logged accuracy and margin are those of the merged checkpoint that was logged, not of the adapters
    # (on the same 100 held-out pairs: the draw follows the seed).
    metrics = MlflowClient().get_run(reward.run_id).data.metrics
    pairs = heldout_pairs(paths["preferences_heldout"], cfg.reward.max_heldout_pairs, cfg.seed)
    assert len(pairs) == 100
    accuracy, margin = heldout_accuracy(logged_rm, tokenizer, pairs)
    assert metrics["reward/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["reward/heldout_margin"] == pytest.approx(margin, abs=1e-4)
    assert len(MlflowClient().get_metric_history(sft.run_id, "sft/loss")) == 4


def test_lora_target_modules_must_name_something():
    from models.lora import lora_config

    assert lora_config(0, 16, 0.05, "all-linear", "causal_lm") is None  # lora_r 0: full fine-tuning
    with pytest.raises(ValueError, match="lora_target_modules is empty"):
        lora_config(4, 16, 0.05, " , ", "causal_lm")
