"""Sampling a policy with its sequence KL to a reference: how every checkpoint's KL is measured.

KL is the sequence-level k1 estimate of KL(pi || pi_ref), the sum over response tokens of
``log pi - log pi_ref``, on the policy's own samples at the sampling temperature: the same
quantity as PPO's ``objective/kl``, whichever algorithm trained the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.generation import decode_responses, sample
from models.policy import position_ids_from_mask
from rlhf.rl.losses import logprobs_from_logits

BATCH = 64


@dataclass
class Samples:
    responses: list[str]
    lengths: list[int]
    ended: list[bool]
    kl: list[float]


@torch.no_grad()
def sample_with_kl(policy, ref, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float) -> Samples:
    """Sample responses in batches; per-response sequence KL(policy || ref) by k1 (0 when ref is None)."""
    out = Samples([], [], [], [])
    for i in range(0, len(prompts), BATCH):
        rollout = sample(policy, tokenizer, prompts[i : i + BATCH], max_new_tokens, temperature)
        if ref is None:
            kl = torch.zeros(len(rollout.lengths))
        else:
            query_len = rollout.query_ids.shape[1]
            mask = rollout.attention_mask
            kwargs = dict(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
            logprobs = [
                logprobs_from_logits(m(**kwargs).logits[:, query_len - 1 : -1] / temperature, rollout.response_ids)
                for m in (policy, ref)
            ]
            kl = ((logprobs[0] - logprobs[1]) * rollout.response_mask).sum(1)
        out.responses += decode_responses(tokenizer, rollout)
        out.lengths += rollout.lengths.tolist()
        out.ended += rollout.ended.tolist()
        out.kl += kl.tolist()
    return out
