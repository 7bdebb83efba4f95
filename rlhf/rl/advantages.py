"""Masked statistics and Generalised Advantage Estimation over right-padded response tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Return `mask` as a {0, 1} tensor with the dtype/device of `like` after a shape check."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(like.shape)}")
    return mask.to(dtype=like.dtype, device=like.device)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where mask == 1 (as in TRL/OpenRLHF `masked_mean`)."""
    m = _as_mask(mask, x)  # same shape as x, e.g. (B, T)
    x = torch.where(m.bool(), x, torch.zeros_like(x))  # drop inf/nan that may sit at padded positions
    if dim is None:
        return (x * m).sum() / m.sum()  # ()
    return (x * m).sum(dim=dim) / m.sum(dim=dim)  # x.shape without `dim`


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over positions where mask == 1, optionally Bessel-corrected (as in TRL `masked_var`)."""
    m = _as_mask(mask, x)
    count = m.sum()
    if count.item() == 0:
        raise ValueError("masked_var: mask has no non-zero entries")
    mean = masked_mean(x, m)  # ()
    variance = masked_mean((x - mean) ** 2, m)  # ()
    if unbiased:
        if count.item() == 1:
            raise ValueError("masked_var: unbiased variance needs at least 2 masked entries (use unbiased=False)")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over masked entries; zeros elsewhere (as in TRL `masked_whiten`)."""
    m = _as_mask(mask, x)
    mean = masked_mean(x, m)  # ()
    var = masked_var(x, m)  # ()
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # same shape as x
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m.bool(), whitened, torch.zeros_like(whitened))


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) advantages and returns = A + V over right-padded responses (Schulman et al. 2016)."""
    if rewards.dim() != 2 or rewards.shape != values.shape:
        raise ValueError(
            f"rewards and values must both be (B, T); got {tuple(rewards.shape)} and {tuple(values.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    values = values.detach()
    rewards = rewards.detach()
    m = _as_mask(mask, values)  # (B, T) 1 = real response token
    keep = m.bool()
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))  # (B, T) padded rewards -> 0
    values = torch.where(keep, values, torch.zeros_like(values))  # (B, T) padded values -> 0

    batch, length = values.shape
    zeros = values.new_zeros(batch)  # (B,)
    advantages_reversed: list[Tensor] = []
    last_gae = zeros  # (B,) A_{t+1}
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else zeros  # (B,) V_{t+1}, 0 past the end
        next_mask = m[:, t + 1] if t + 1 < length else zeros  # (B,) m_{t+1}, 0 past the end
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]  # (B,)
        last_gae = delta + gamma * lam * next_mask * last_gae  # (B,)
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    advantages = advantages * m
    returns = (advantages + values) * m  # (B, T)
    return advantages, returns
