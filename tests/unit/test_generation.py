"""Our decode loop (models/generation.py) against transformers' generate() and a full forward pass.

The loop must draw exactly what generate() draws (same tokens for the same seed) and hand back, from the
sampling pass, the log-probs and values PPO would otherwise recompute with a second forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from models import generation
from models.generation import InPlaceLayer, fast_decode_supported, sample
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
def test_decode_loop_draws_what_generate_draws(tiny, monkeypatch, temperature):
    model, tokenizer = tiny
    assert fast_decode_supported(model)
    torch.manual_seed(1)
    ours = sample(model, tokenizer, PROMPTS, max_new_tokens=24, temperature=temperature)
    monkeypatch.setattr(generation, "fast_decode_supported", lambda m: False)
    torch.manual_seed(1)
    theirs = sample(model, tokenizer, PROMPTS, max_new_tokens=24, temperature=temperature)
    assert ours.logprobs is not None and theirs.logprobs is None
    assert 1 < len(set(ours.lengths.tolist()))  # rows ended at different steps (the EOS-handling path ran)
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask) and torch.equal(ours.ended, theirs.ended)


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
