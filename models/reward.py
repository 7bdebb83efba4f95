"""Scoring with a reward model (a sequence classifier with one output).

The reward model reads prompt + response + EOS and scores the last non-pad token,
which is how TRL's RewardTrainer trains it, so training and use agree.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.policy import position_ids_from_mask


@torch.no_grad()
def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """(N,) reward-model scores of each prompt + response (EOS appended as in training)."""
    model.eval()
    scores = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            p + r + tokenizer.eos_token for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])
        ]
        # right-padded, as the reward trainer saw them (the tokenizer's own default side is never consulted)
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        enc = enc.to(model.device)
        scores.append(model(**enc).logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def score_token_ids(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int
) -> torch.Tensor:
    """(B,) scores of already tokenized sequences (B, L), padded on either side.

    The classifier finds the last non-pad token from ``pad_token_id``, so padding
    is rewritten to it; positions count real tokens only, so a left-padded prompt
    scores as it did unpadded in training.
    """
    model.eval()
    ids = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, pad_token_id))
    position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, 0].float()
