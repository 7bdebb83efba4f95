"""Running reward statistics (parallel Welford / Chan et al.) and score normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class RunningMoments:
    """Running mean / population variance of scalar scores (Chan et al. 1979 parallel update, as in TRL)."""

    mean: float = 0.0
    var: float = 1.0  # population variance (M2 / count)
    count: float = 1e-24  # ~0, so the prior (mean 0, var 1) vanishes on the first update

    @property
    def std(self) -> float:
        """Running population standard deviation sqrt(var)."""
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge batch `x` into the running moments; return the batch (mean, population std) (Chan et al. 1979)."""
        xs = x.detach().to(device="cpu", dtype=torch.float64).flatten()  # (N,)
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        batch_var, batch_mean = torch.var_mean(xs, unbiased=False)
        b_mean, b_var = batch_mean.item(), batch_var.item()

        delta = b_mean - self.mean
        tot = self.count + n
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / tot
        self.count = tot
        return b_mean, math.sqrt(b_var)

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state for checkpointing."""
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = float(state["count"])


def normalize_scores(scores: Tensor, moments: RunningMoments, clip: float | None) -> Tensor:
    """(scores - mean) / std using running moments, optionally clamped to [-clip, clip] (as in TRL/OpenRLHF)."""
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    std = max(moments.std, 1e-8)  # guard against a constant-score history
    out = (scores - moments.mean) / std  # same shape as scores, e.g. (B,)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out
