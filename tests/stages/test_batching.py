"""SFT and reward-model batches: rows of similar length share a batch, so little of it is padding."""

from __future__ import annotations

import pytest

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.builtin.model import resolve_base_model
from rlhf.builtin.task import resolve_data_paths
from rlhf.config import load_config
from rlhf.data.loading import load_split
from tasks.reward import reward_trainer
from tasks.sft import sft_trainer


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    cfg = load_config(None, [])
    return root, resolve_data_paths(cfg.data, root, cfg.seed), resolve_base_model(cfg.model.base_model, root, cfg.seed)


def padding_share(trainer, batches: int = 20) -> float:
    """Share of token positions in the first training batches that are padding."""
    padded = total = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i == batches:
            break
        mask = batch["attention_mask"]
        padded += int((mask == 0).sum())
        total += mask.numel()
    return padded / total


@pytest.mark.parametrize("grouped", [True, False])
def test_sft_batches_group_rows_by_length(builtin, tmp_path, grouped):
    root, paths, base = builtin
    cfg = load_config(None, [f"sft.group_by_length={str(grouped).lower()}"])
    tokenizer = load_tokenizer(base)
    trainer = sft_trainer(cfg, load_causal_lm(base), tokenizer, load_split(paths["sft"]), str(tmp_path), [])
    share = padding_share(trainer)
    # Random batches of the built-in data are about a third padding (docs/benchmarks.md).
    assert share < 0.08 if grouped else share > 0.25, share


@pytest.mark.parametrize("grouped", [True, False])
def test_reward_batches_group_pairs_by_length(builtin, tmp_path, grouped):
    root, paths, base = builtin
    cfg = load_config(None, [f"reward.group_by_length={str(grouped).lower()}"])
    tokenizer = load_tokenizer(base)
    model = load_reward_model(base, tokenizer.pad_token_id)
    trainer = reward_trainer(cfg, model, tokenizer, paths["preferences"], str(tmp_path), [])
    share = padding_share(trainer)
    # chosen and rejected of one pair differ in length, so some padding stays
    assert share < 0.2 if grouped else share > 0.28, share
