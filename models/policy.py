"""The PPO policy: a causal LM with a scalar value head on its last hidden state.

The value head shares the policy's trunk (one forward pass gives log-probs and
values, half the memory and compute of a separate critic). The cost is that value
and policy gradients meet in the trunk; ``vf_coef`` keeps the value loss from
dominating. A separate critic is the usual choice past a few billion parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from models.lora import has_adapters, save_adapters, save_merged

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_DIR = "adapter"
"""Subfolder of a checkpoint of a policy with LoRA adapters: the adapters alone (peft's layout), for resuming.
A subfolder, so that ``from_pretrained`` on the checkpoint loads the merged weights and never looks for peft."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only real tokens, as generate() does for left padding."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """Causal LM + linear value head; forward returns (logits (B, L, V), values (B, L))."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Zero-initialised (Huang et al. 2022, "The N implementation details of RLHF with PPO"): a random
        # head adds a random baseline per token to the first advantages and sends large value-loss
        # gradients into the shared trunk before the head has learnt anything. The PPO stage then copies the reward
        # model's score head in where it fits (``init_value_head_from``, ``ppo.value_head_init``).
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values) of the last ``logits_to_keep`` positions (0: every position), each (B, K, V) / (B, K).

        PPO needs only the positions that predict response tokens: the language-model head (vocabulary-wide) and
        the value head then run on those alone.
        """
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        hidden = out.hidden_states[-1]  # (B, L, H)
        values = self.value_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).squeeze(-1)  # (B, K)
        return out.logits, values.float()  # fp32 even under bf16 autocast: GAE and the losses work in fp32

    def init_value_head_from(self, reward_model: nn.Module) -> bool:
        """Start the value head as a copy of the reward model's score head; returns whether it could.

        A reward model trained from the policy's own SFT checkpoint reads nearly the same hidden states, so its
        head on the policy's trunk is a first estimate of every prefix's reward: TRL's PPO starts its value model
        as a copy of the whole reward model for this reason, at the price of a second trunk. It could not (and the
        head stays as it was) where the reward model has no ``score`` head (the name decoder sequence classifiers
        in transformers give it) or reads hidden states of another size.
        """
        head = getattr(reward_model, "score", None)
        if not isinstance(head, nn.Linear) or head.weight.shape != self.value_head.weight.shape:
            return False
        with torch.no_grad():
            self.value_head.weight.copy_(head.weight)
            self.value_head.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(self.value_head.bias))
        return True

    def save(self, out_dir: str | Path) -> None:
        """Policy in Hugging Face layout plus the value head, both safetensors; with LoRA the weights are a merged
        copy (a plain model, loadable without peft) and the adapters go to ``ADAPTER_DIR`` as well."""
        out = Path(out_dir)
        save_merged(self.lm, out, keep_adapters=True)
        if has_adapters(self.lm):
            save_adapters(self.lm, out / ADAPTER_DIR)
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(out / VALUE_HEAD_FILE))

    def load_value_head(self, checkpoint_dir: str | Path) -> bool:
        """Load a saved value head if the checkpoint has one; returns whether it did."""
        path = Path(checkpoint_dir) / VALUE_HEAD_FILE
        if not path.exists():
            return False
        self.value_head.load_state_dict(load_file(str(path), device=str(self.value_head.weight.device)))
        return True
