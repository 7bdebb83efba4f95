"""Build the embedded default: a byte-level BPE tokenizer and a tiny causal LM.

No model hub is reachable here, so the default base model is built from the
built-in corpus and saved in Hugging Face layout; everything downstream loads it
with ``from_pretrained`` exactly as it would load ``gpt2`` or a Llama checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
Arch = Literal["gpt2", "llama"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        model_max_length=256,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: Arch = "gpt2",
    n_layer: int = 4,
    n_embd: int = 160,
    n_head: int = 5,
    n_positions: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM sized for CPU training (about 1M parameters)."""
    torch.manual_seed(seed)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            # GPT-2's tanh GELU as one fused kernel: "gelu_new" computes the same formula in
            # six elementwise ops, about 15% of a training step of this model on the CPU
            activation_function="gelu_pytorch_tanh",
            # No dropout, as in Llama-family checkpoints and as the reward-model (TRL's
            # disable_dropout) and PPO (eval mode) stages already train: on the CPU the masks
            # cost a quarter of an SFT step (issue 21)
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=n_embd,
            intermediate_size=n_embd * 3,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=n_positions,
            tie_word_embeddings=True,
            **ids,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown tiny architecture {arch!r}: use 'gpt2' or 'llama'")


def build_tiny_checkpoint(out_dir: str | Path, corpus: Iterable[str], arch: Arch = "gpt2", seed: int = 0) -> Path:
    """Tokenizer + untrained tiny model saved in Hugging Face layout (safetensors)."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, arch=arch, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return out
