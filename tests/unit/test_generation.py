"""Our decode loop (models/generation.py) against transformers' generate() and a full forward pass.

With generate()'s sampler (``torch.multinomial``) put in place of ours, the loop must draw exactly what
generate() draws (same tokens for the same seed), and it must hand back, from the sampling pass, the log-probs
and values PPO would otherwise recompute with a second forward pass. Our sampler, the inverse CDF, is tested on
its own: hand-worked indices and the frequencies of many draws.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy import stats

from models import generation
from models.generation import InPlaceLayer, draw, fast_decode_supported, inverse_cdf, sample
from models.lora import add_adapters, lora_config
from models.policy import PolicyWithValueHead
from models.tiny import build_model, build_tokenizer

CORPUS = [
    "Customer: Where is my order?\nAgent: It ships tomorrow.",
    "Customer: I forgot my password.\nAgent: I sent a reset link.",
    "Customer: Can I get a refund?\nAgent: Yes, within 30 days.",
] * 4
PROMPTS = ["Customer: Where is my order?\nAgent:", "Customer: hi\nAgent:", "Customer: refund?\nAgent:"] * 3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    model = build_model(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=128).eval()
    with torch.no_grad():  # a random model rarely says EOS: raise its logit by ~3 so rows end at different steps
        direction = torch.randn(32)
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[tokenizer.eos_token_id] = 3 * direction / direction.square().sum()
    return model, tokenizer


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_decode_loop_with_generates_sampler_draws_what_generate_draws(tiny, monkeypatch, temperature):
    model, tokenizer = tiny
    assert fast_decode_supported(model)
    monkeypatch.setattr(generation, "uniforms", lambda batch, device: torch.zeros(batch, 1))  # no RNG drawn here
    monkeypatch.setattr(generation, "draw", lambda logprobs, _: torch.multinomial(logprobs.exp(), 1).squeeze(1))
    monkeypatch.setattr(generation, "COMPACT_AT", 2.0)  # ended rows stay in the batch, as in generate()
    torch.manual_seed(1)
    ours = sample(model, tokenizer, PROMPTS, max_new_tokens=24, temperature=temperature)
    monkeypatch.setattr(generation, "fast_decode_supported", lambda m: False)
    torch.manual_seed(1)
    theirs = sample(model, tokenizer, PROMPTS, max_new_tokens=24, temperature=temperature)
    assert ours.logprobs is not None and theirs.logprobs is None
    assert 1 < len(set(ours.lengths.tolist()))  # rows ended at different steps (the EOS-handling path ran)
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask) and torch.equal(ours.ended, theirs.ended)


@pytest.mark.parametrize("compact_at", [1e-9, 0.25, 0.5])
def test_dropping_ended_rows_changes_nothing_sampled(tiny, monkeypatch, compact_at):
    model, tokenizer = tiny
    policy = PolicyWithValueHead(model)
    torch.nn.init.normal_(policy.value_head.weight, std=0.5)
    drops = []
    select = InPlaceLayer.batch_select_indices
    monkeypatch.setattr(InPlaceLayer, "batch_select_indices", lambda layer, i: drops.append(len(i)) or select(layer, i))
    runs = []
    for at in (2.0, compact_at):  # never drop, then drop at `compact_at`
        monkeypatch.setattr(generation, "COMPACT_AT", at)
        torch.manual_seed(5)
        runs.append(sample(model, tokenizer, PROMPTS, 24, 1.0, policy.value_head))
    whole, dropped = runs
    assert drops and 1 < len(set(whole.lengths.tolist()))  # rows left the batch; they ended at different steps
    assert torch.equal(whole.response_ids, dropped.response_ids) and torch.equal(whole.ended, dropped.ended)
    real = whole.response_mask.bool()
    torch.testing.assert_close(dropped.logprobs[real], whole.logprobs[real], atol=1e-5, rtol=0)  # batch-size rounding
    torch.testing.assert_close(dropped.values[real], whole.values[real], atol=1e-5, rtol=0)


def test_inverse_cdf_takes_the_first_index_above_the_uniform_and_skips_zero_probabilities():
    probs = torch.tensor([[0.25, 0.0, 0.5, 0.25]], dtype=torch.float64).expand(6, 4)  # CDF 0.25, 0.25, 0.75, 1
    uniforms = torch.tensor([[0.0], [0.2499], [0.25], [0.7499], [0.75], [0.9999]], dtype=torch.float64)
    assert inverse_cdf(probs, uniforms).tolist() == [0, 0, 2, 2, 3, 3]
    # A row that does not sum to 1 is read as its normalised distribution: CDF 1, 2, 4 of 4, u = 0.5 -> 2 of 4.
    assert inverse_cdf(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[0.5]])).tolist() == [2]


def test_draw_frequencies_follow_the_softmax():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0], dtype=torch.float64)
    logprobs = probs.log().expand(40_000, 6)  # the last entry is log(0) = -inf
    torch.manual_seed(3)
    counts = torch.bincount(draw(logprobs, torch.rand(40_000, 1, dtype=torch.float64)), minlength=6)
    assert counts[5] == 0
    assert stats.chisquare(counts[:5].numpy(), 40_000 * probs[:5].numpy()).pvalue > 1e-3


def with_random_adapters(model):
    """A copy of the model with LoRA adapters on every linear layer, B drawn at random (peft starts it at 0)."""
    adapted = add_adapters(copy.deepcopy(model), lora_config(4, 8, 0.0, "all-linear", "causal_lm"))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return adapted.eval()


@pytest.mark.parametrize("lora", [False, True])
def test_sampling_pass_logprobs_and_values_equal_a_forward_pass(tiny, lora):
    # With LoRA the decode loop runs the peft-wrapped model (cache and positions passed through to it).
    model, tokenizer = tiny
    if lora:
        model = with_random_adapters(model)
        assert fast_decode_supported(model)
    policy = PolicyWithValueHead(model)
    torch.nn.init.normal_(policy.value_head.weight, std=0.5)
    torch.manual_seed(2)
    rollout = sample(model, tokenizer, PROMPTS, max_new_tokens=24, temperature=0.7, value_head=policy.value_head)
    response_len = rollout.response_ids.shape[1]
    with torch.no_grad():
        logits, values = policy(rollout.input_ids, rollout.attention_mask, logits_to_keep=response_len + 1)
    logprobs = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(2, rollout.response_ids[..., None]).squeeze(-1)
    real = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[real], logprobs[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.values[real], values[:, :-1][real], atol=1e-5, rtol=0)
    if lora:  # the adapters took part: the plain model's log-probs are far from these
        with torch.no_grad():
            plain = tiny[0](input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[
                :, -response_len - 1 : -1
            ]
        plain_logprobs = torch.log_softmax(plain / 0.7, -1).gather(2, rollout.response_ids[..., None]).squeeze(-1)
        assert (plain_logprobs[real] - rollout.logprobs[real]).abs().max() > 0.1


def test_in_place_layer_returns_the_filled_prefix_and_refuses_overflow():
    layer = InPlaceLayer(capacity=3)
    k, v = torch.ones(1, 1, 2, 4), torch.full((1, 1, 2, 4), 2.0)
    keys, values = layer.update(k, v)
    assert keys.shape == (1, 1, 2, 4) and layer.get_seq_length() == 2 and values.eq(2).all()
    keys, _ = layer.update(3 * k[:, :, :1], v[:, :, :1])
    assert keys[0, 0, :, 0].tolist() == [1.0, 1.0, 3.0]
    with pytest.raises(RuntimeError, match="holds 3 positions"):
        layer.update(k[:, :, :1], v[:, :, :1])
