"""Batched sampling with the KV cache, returning token ids and masks for PPO and evaluation.

Our own decode loop, not ``model.generate()``, for the decoder architectures in
``FAST_DECODE_MODEL_TYPES``. Two reasons, both measured on the built-in model (docs/benchmarks.md):
``generate()`` grows its KV cache by concatenation (``DynamicLayer.update``), copying the whole
cache of every layer at every token, which was 43% of sampling's CPU time for 32 responses of
48 tokens; and it cannot hand back what PPO needs from the same pass, the sampled tokens'
log-probs and the value head's estimates, so PPO ran the policy over every rollout a second
time. The loop preallocates the cache for prompt + ``max_new_tokens`` and writes each token in
place (``InPlaceLayer``), draws each token by inverting the CDF with one uniform per row
(``inverse_cdf``), and stops when every row has ended. ``generate()`` draws with ``torch.multinomial``,
whose CPU kernel spends ~0.6 ms on an exponential variate for every entry of a 32 x 1024 batch: 17%
of our sampling time on the built-in model, against ~0.05 ms for the inverse CDF (docs/benchmarks.md).
Both are exact draws from the same softmax; with multinomial put back in (``draw``) the loop gives
generate()'s very tokens for the same seed (tests/unit/test_generation.py). Rows that have ended
leave the batch (``COMPACT_AT``): on the built-in model a step for 16 rows costs two thirds of one for 32.
Other architectures (sliding-window or linear attention, encoder-decoders) go through
``generate()`` and PPO recomputes log-probs and values with a forward pass.
A policy with LoRA adapters (a peft ``PeftModel``) takes the same loop: peft passes the cache and
position arguments through to the wrapped model, and ``config`` and ``device`` are the wrapped model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from models.policy import position_ids_from_mask

FAST_DECODE_MODEL_TYPES = frozenset(
    {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "granite", "smollm3"}
)
"""Decoder-only architectures with full attention on every layer, which our decode loop serves."""

COMPACT_AT = 0.25
"""Share of the batch's rows that have ended at which the decode loop drops them (and their cache rows):
one ended row still costs its matrix rows at every step, a drop costs a copy of the cache (docs/benchmarks.md)."""


@dataclass
class Rollout:
    """Prompts (left-padded) and sampled responses (right-padded after the first EOS)."""

    query_ids: torch.Tensor  # (B, P)
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R), pad after EOS
    response_mask: torch.Tensor  # (B, R), 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    logprobs: torch.Tensor | None = None
    """(B, R) log-probs of the sampled tokens at the sampling temperature, from the sampling pass (our decode loop
    only; None from generate()). Meaningless after the first EOS."""
    values: torch.Tensor | None = None
    """(B, R) the value head's V(s_t) before each response token, when sample() was given a value head."""

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


class InPlaceLayer(DynamicLayer):
    """One layer's KV cache, allocated once for ``capacity`` positions and written in place.

    ``update`` returns views of the filled prefix, so attention sees exactly the tokens so far
    (no padding to the capacity and no mask over it, unlike transformers' StaticLayer).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self._keys = key_states.new_empty(batch, heads, self.capacity, dim)
        self._values = value_states.new_empty(batch, heads, self.capacity, dim)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"InPlaceLayer holds {self.capacity} positions, asked for {end}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices``: the filled prefix moves into buffers of the smaller batch."""
        if not self.is_initialized:
            return
        _, heads, _, dim = self._keys.shape
        keys = self._keys.new_empty(len(indices), heads, self.capacity, dim)
        values = self._values.new_empty(len(indices), heads, self.capacity, dim)
        keys[:, :, : self.length] = self._keys[indices, :, : self.length]
        values[:, :, : self.length] = self._values[indices, :, : self.length]
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, : self.length], values[:, :, : self.length]


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B,) for each row the first index whose cumulative probability exceeds ``uniforms`` (B, 1) in [0, 1).

    ``probs`` (B, V) need not sum exactly to 1: the uniforms are scaled by each row's total, so the last index
    is the furthest a draw can reach, and a zero-probability index is never drawn (its CDF equals its
    predecessor's, and the search takes the first index strictly above the uniform).
    """
    cdf = probs.cumsum(-1)  # (B, V)
    return torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).squeeze(1)


def uniforms(batch: int, device: torch.device) -> torch.Tensor:
    """(B, 1) one float64 uniform per row from the global torch RNG: a step's randomness for the whole batch."""
    return torch.rand(batch, 1, dtype=torch.float64, device=device)


def draw(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B,) one token per row from ``softmax(logprobs)`` (B, V), by inverse CDF (float64) at ``uniforms`` (B, 1)."""
    return inverse_cdf(logprobs.double().exp(), uniforms)


def fast_decode_supported(model: PreTrainedModel) -> bool:
    """Whether our decode loop serves this model (full attention on every layer of a known decoder)."""
    config = model.config.get_text_config()
    if config.model_type not in FAST_DECODE_MODEL_TYPES or model.config.is_encoder_decoder:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
) -> Rollout:
    """Sample one response per prompt from the full distribution (no top-k/top-p, no EOS block), at temperature.

    With our decode loop (``fast_decode_supported``) the rollout carries the sampled tokens' log-probs and, given
    the policy's ``value_head``, the values of every state, both from the sampling pass itself.
    """
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = enc.to(model.device)  # left-padded: every prompt ends where generation starts
    if fast_decode_supported(model):
        raw, logprobs, values = _decode(
            model, tokenizer, enc.input_ids, enc.attention_mask, max_new_tokens, temperature, value_head
        )
    else:
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
        raw, logprobs, values = out[:, enc.input_ids.shape[1] :], None, None  # (B, R), R <= max_new_tokens
    ids, mask, ended = truncate_after_eos(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return Rollout(enc.input_ids, enc.attention_mask, ids, mask, ended, logprobs, values)


def _decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    value_head: nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, their log-probs, values) of the sampled responses, each (B, R): the KV cache written in place.

    Draws from softmax(logits / temperature) with ``draw``, one call per step over the rows still going. Rows
    that have ended are dropped from the batch (and the cache) once ``COMPACT_AT`` of it has ended, and are
    fed the pad token until then; after a row's EOS its tokens are pad, its log-probs and values meaningless.
    Each row draws from its own uniform of the step, so the tokens do not depend on when rows are dropped.
    """
    batch, prompt_len = query_ids.shape
    device = query_ids.device
    layers = model.config.get_text_config().num_hidden_layers
    cache = Cache(layers=[InPlaceLayer(prompt_len + max_new_tokens) for _ in range(layers)])
    mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=query_mask.dtype, device=device)
    mask[:, :prompt_len] = query_mask
    positions = position_ids_from_mask(query_mask)
    ids = query_ids
    next_position = positions[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    values = torch.zeros(batch, max_new_tokens, device=device) if value_head is not None else None
    rows = torch.arange(batch, device=device)  # the original row of each row still in the batch
    going = torch.ones(batch, dtype=torch.bool, device=device)  # (n,) not ended yet
    for step in range(max_new_tokens):
        out = model(
            input_ids=ids,
            attention_mask=mask[:, : prompt_len + step],
            position_ids=positions,
            cache=cache,
            use_cache=True,
            output_hidden_states=value_head is not None,
            logits_to_keep=1,
        )
        if values is not None:
            # V(s_t): the state before token t; fp32 even under bf16 autocast, as the log-probs
            values[rows, step] = value_head(out.hidden_states[-1][:, -1]).squeeze(-1).float()
        step_logprobs = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)  # (n, V)
        # Uniforms for the whole batch, each row taking its own: dropping rows changes nothing drawn.
        token = torch.where(going, draw(step_logprobs, uniforms(batch, device)[rows]), tokenizer.pad_token_id)  # (n,)
        tokens[rows, step] = token
        logprobs[rows, step] = step_logprobs.gather(1, token[:, None]).squeeze(1)
        going &= token != tokenizer.eos_token_id
        left = int(going.sum())
        if left == 0:
            break
        if left <= (1 - COMPACT_AT) * len(going):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, going, mask, next_position = (t[keep] for t in (rows, token, going, mask, next_position))
        ids, positions = token[:, None], next_position
        next_position = next_position + 1
    done = step + 1
    return tokens[:, :done], logprobs[:, :done], None if values is None else values[:, :done]


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """Response texts without special tokens."""
    return tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
