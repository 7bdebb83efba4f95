"""Per-row features of prompts and responses, computed the same way for the baseline and every window.

Prompt embeddings are the reference (SFT) model's last hidden state, mean-pooled
over the prompt's tokens. No sentence-embedding model can be downloaded here, and
the reference model is loaded anyway for the KL signal, so the embedding costs one
forward pass; it also sees prompts through the same tokenizer and weights the
policy started from, which a hashed bag of words would not (word order, unseen
words split into known sub-words). With a real checkpoint the same code embeds
with that model.

Intents, refusals, task violations and gold scores come from the task's knowledge
(``TaskKnowledge``: the built-in task's key-phrase classifier and gold judge); without
one every prompt is ``"other"``, the intent signal stays at zero and there is no gold. Refusals and violations use rlhf/evaluation/violations.py, as
the evaluate stage does, so ``eval/`` and ``drift/`` rates mean the same thing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.generation import decode_responses, sample
from models.policy import position_ids_from_mask
from models.reward import score_texts
from rlhf.evaluation.task import TaskKnowledge
from rlhf.evaluation.violations import is_refusal, violations
from rlhf.rl.losses import logprobs_from_logits


@dataclass
class PromptFeatures:
    """Token counts, intents and lengths of a set of prompts."""

    token_counts: dict[str, int]
    """Token id (as a string, for JSON) -> occurrences over all prompts."""
    intents: list[str]
    lengths: np.ndarray  # (N,) tokens per prompt
    token_ids: list[list[int]] | None = None
    """Each prompt's token ids (the token-JS permutation test relabels prompts, not tokens)."""


@dataclass
class ResponseFeatures:
    """Per-response scores and flags of (prompt, response) pairs."""

    rm_scores: np.ndarray  # (N,) reward-model score
    lengths: np.ndarray  # (N,) tokens
    nll: np.ndarray  # (N,) mean per-token NLL under the policy; nan for an empty response
    refusal: np.ndarray  # (N,) bool
    violation: np.ndarray  # (N,) bool
    gold: np.ndarray | None  # (N,) gold-judge reward, None off the built-in task


def prompt_features(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], task: TaskKnowledge | None
) -> PromptFeatures:
    """Token histogram, intents and token lengths of prompts."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    counts = Counter(t for row in ids for t in row)
    return PromptFeatures(
        token_counts={str(k): int(v) for k, v in counts.items()},
        intents=[task.classify_intent(p) if task else "other" for p in prompts],
        lengths=np.array([len(row) for row in ids], dtype=np.float64),
        token_ids=[list(row) for row in ids],
    )


def max_sequence_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest sequence the model takes (position embeddings, else the tokenizer's limit)."""
    config = model.config.get_text_config()
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(min(limit or tokenizer.model_max_length, tokenizer.model_max_length))


@torch.no_grad()
def embed_prompts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], batch_size: int = 64
) -> np.ndarray:
    """(N, H) mean-pooled last hidden states of the prompts (right-padded, truncated on the left)."""
    model.eval()
    max_len = max_sequence_length(model, tokenizer)
    ids_all = [r[-max_len:] for r in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = np.argsort([len(r) for r in ids_all], kind="stable")  # similar lengths per batch: little padding
    out = np.zeros((len(prompts), model.config.get_text_config().hidden_size))
    trunk = model.base_model  # the transformer without the vocabulary projection
    for i in range(0, len(prompts), batch_size):
        rows = order[i : i + batch_size]
        ids, mask = _pad_right([ids_all[j] for j in rows], tokenizer.pad_token_id)
        hidden = trunk(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
        hidden = hidden.float().cpu()  # (B, L, H)
        out[rows] = ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).numpy()
    return out


@torch.no_grad()
def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 64,
) -> np.ndarray:
    """(N,) mean per-token negative log-likelihood of each response given its prompt; nan if empty."""
    model.eval()
    max_len = max_sequence_length(model, tokenizer)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out = np.full(len(prompts), np.nan)
    for i in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for p, r in zip(p_ids[i : i + batch_size], r_ids[i : i + batch_size]):
            r = r[: max_len - 1]
            p = p[-(max_len - len(r)) :] if p else p  # keep the prompt's end, where the response starts
            rows.append(p + r)
            starts.append(len(p))
        ids, mask = _pad_right(rows, tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logprobs = logprobs_from_logits(logits[:, :-1].float(), ids[:, 1:])  # (B, L-1): token t+1 given <= t
        positions = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :] + 1
        start = torch.tensor(starts, device=ids.device)[:, None]
        is_response = (positions >= start) & mask[:, 1:].bool()
        counts = is_response.sum(1)
        nll = -(logprobs * is_response).sum(1) / counts.clamp(min=1)
        nll = torch.where(counts > 0, nll, torch.full_like(nll, float("nan")))
        out[i : i + len(rows)] = nll.cpu().numpy()
    return out


def fit_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], limit: int
) -> tuple[list[str], list[str]]:
    """(prompts, responses) cut so prompt + response + EOS fit `limit` tokens: the prompt's start goes first,
    then the response's end."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out_p, out_r = list(prompts), list(responses)
    for j, (p, r) in enumerate(zip(p_ids, r_ids)):
        if len(p) + len(r) + 1 <= limit:
            continue
        r = r[: limit - 2]  # at least one prompt token stays
        out_r[j] = tokenizer.decode(r)
        out_p[j] = tokenizer.decode(p[-(limit - 1 - len(r)) :])
    return out_p, out_r


def response_features(
    policy: PreTrainedModel,
    reward_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    task: TaskKnowledge | None,
    batch_size: int = 64,
) -> ResponseFeatures:
    """Reward-model scores, lengths, NLL under the policy, refusal/violation flags and gold scores (if the task has a judge)."""
    # Batches of similar length waste little on padding; results go back to the input order.
    order = np.argsort([len(p) + len(r) for p, r in zip(prompts, responses)], kind="stable")
    inverse = np.argsort(order)
    sorted_p, sorted_r = [prompts[j] for j in order], [responses[j] for j in order]
    fit_p, fit_r = fit_texts(tokenizer, sorted_p, sorted_r, max_sequence_length(reward_model, tokenizer))
    scores = score_texts(reward_model, tokenizer, fit_p, fit_r, batch_size=batch_size).numpy()[inverse]
    nll = response_nll(policy, tokenizer, sorted_p, sorted_r, batch_size)[inverse]
    lengths = np.array([len(r) for r in tokenizer(responses, add_special_tokens=False)["input_ids"]], dtype=np.float64)
    return ResponseFeatures(
        rm_scores=scores.astype(np.float64),
        lengths=lengths,
        nll=nll,
        refusal=np.array([is_refusal(r, task) for r in responses], dtype=bool),
        violation=np.array([bool(v) for v in violations(prompts, responses, task)], dtype=bool),
        gold=np.array([gold(p, r) for p, r in zip(prompts, responses)]) if (gold := task and task.gold_score) else None,
    )


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
) -> list[str]:
    """One sampled response per prompt (full distribution at temperature), decoded without special tokens."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        out += decode_responses(
            tokenizer, sample(model, tokenizer, prompts[i : i + batch_size], max_new_tokens, temperature)
        )
    return out


@torch.no_grad()
def sample_kl(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
) -> tuple[list[str], np.ndarray]:
    """(responses, (N,) sequence KL(policy || reference)): k1 on the policy's own samples at temperature."""
    responses, kls = [], []
    for i in range(0, len(prompts), batch_size):
        # 1. sample from the policy (left-padded prompts)
        rollout = sample(policy, tokenizer, prompts[i : i + batch_size], max_new_tokens, temperature)
        query_len = rollout.query_ids.shape[1]
        mask = rollout.attention_mask
        kwargs = dict(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        # 2. log-probs of the sampled tokens under both models, at the sampling temperature
        logprobs = [
            logprobs_from_logits(m(**kwargs).logits[:, query_len - 1 : -1].float() / temperature, rollout.response_ids)
            for m in (policy, reference)
        ]
        # 3. k1 summed over the response: an unbiased estimate of the sequence KL
        kls.append(((logprobs[0] - logprobs[1]) * rollout.response_mask).sum(1).cpu().numpy())
        responses += decode_responses(tokenizer, rollout)
    return responses, (np.concatenate(kls) if kls else np.zeros(0))


def _pad_right(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of (B, L) right-padded token lists."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask
