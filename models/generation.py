"""Batched sampling with the KV cache, returning token ids and masks for PPO and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    """Prompts (left-padded) and sampled responses (right-padded after the first EOS)."""

    query_ids: torch.Tensor  # (B, P)
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R), pad after EOS
    response_mask: torch.Tensor  # (B, R), 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, P+R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # (B, P+R)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)  # (B,)


def truncate_after_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, ended): keep tokens up to and including the first EOS, pad the rest."""
    is_eos = response_ids == eos_token_id  # (B, R)
    ended = is_eos.any(1)
    # Index of the first EOS, or R when there is none.
    first = torch.where(
        ended, is_eos.float().argmax(1), torch.full_like(ended, response_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = (positions[None, :] <= first[:, None]).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, ended


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
) -> Rollout:
    """Sample one response per prompt from the full distribution (no top-k/top-p, no EOS block), at temperature."""
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = enc.to(model.device)  # left-padded: every prompt ends where generation starts
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        # No min_new_tokens: blocking EOS at the first position would sample from a distribution
        # other than the one whose log-probs PPO and the KL use (off-policy). An empty response is
        # scored as one (the judge and the reward model see just the prompt).
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    raw = out[:, enc.input_ids.shape[1] :]  # (B, R), R <= max_new_tokens
    ids, mask, ended = truncate_after_eos(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return Rollout(enc.input_ids, enc.attention_mask, ids, mask, ended)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """Response texts without special tokens."""
    return tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
