"""PPO clipped policy/value losses and logit utilities."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf.rl.advantages import masked_mean, masked_var


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective, as a loss to minimise (Schulman et al. 2017, Eq. 7)."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)  # ()

    with torch.no_grad():
        keep = mask.bool()
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(logprobs.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(keep, ratio, torch.full_like(ratio, -math.inf)).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) (Schulman et al. 2017; OpenAI baselines ppo2)."""
    if clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)  # (B, T)
    vf_losses = (values - returns) ** 2  # (B, T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)  # ()
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)
    return loss, {"clipfrac": clipfrac.detach()}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(l) - sum(p * l) (as in TRL/OpenRLHF)."""
    # -inf logits (masked vocab) would give 0 * -inf = nan; clamp them to the most negative finite value.
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)  # (..., V)
    probs = torch.softmax(logits, dim=-1)  # (..., V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (...)


def entropy_shortfall(entropy: Tensor, ref_entropy: Tensor, mask: Tensor) -> Tensor:
    """Mean over `mask`ed tokens of how far the policy's entropy falls below the reference's: max(H_ref - H, 0).

    As a loss term (``ppo.entropy_floor``) it pushes the entropy up only where the policy is more certain than
    the reference, so it stops the collapse onto a few templates without heating the policy past the SFT model:
    a plain entropy bonus keeps pushing everywhere, and at beta ~0.1 it acts like sampling the reference at a
    higher temperature (docs/evaluation.md).
    """
    return masked_mean((ref_entropy - entropy).clamp(min=0), mask)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) gathered at `tokens` (as in torchtune `logits_to_logprobs`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be tokens.shape + (V,); tokens {tuple(tokens.shape)}")
    if temperature != 1.0:
        logits = logits / temperature
    # log softmax at the chosen token only: l_tok - logsumexp(l), without writing a (B, T, V) log-softmax
    chosen = torch.gather(logits, dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return chosen - torch.logsumexp(logits, dim=-1)  # (B, T)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked positions; nan when Var[R] == 0 (OpenAI baselines)."""
    values = values.detach()
    returns = returns.detach()
    var_returns = masked_var(returns, mask, unbiased=False).item()
    if var_returns == 0.0:
        return float("nan")
    var_residual = masked_var(returns - values, mask, unbiased=False).item()
    return 1.0 - var_residual / var_returns
