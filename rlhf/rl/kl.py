"""KL penalty: per-token estimators of KL(pi || ref) and the coefficient (beta) controllers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KLControllerKind = Literal["fixed", "adaptive"]

_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
_CONTROLLER_KINDS: tuple[str, ...] = get_args(KLControllerKind)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL divergence")."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed values: {', '.join(_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"shape mismatch: logprobs {tuple(logprobs.shape)} vs ref_logprobs {tuple(ref_logprobs.shape)}"
        )
    log_ratio = logprobs - ref_logprobs  # (B, T) log pi(x) - log ref(x)
    if estimator == "k1":
        return log_ratio  # unbiased, high variance, can be negative
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)  # biased, low variance, >= 0
    # k3: unbiased and >= 0, since exp(-r) - 1 + r >= 0 for all r
    return torch.expm1(-log_ratio) + log_ratio


def kl_mean_upper_bound(seq_kl: Tensor, z: float = 2.0) -> float:
    """Mean + z standard errors of per-sequence KL estimates (one per episode, shape (B,)).

    KL(pi || ref) >= 0, and k1 on samples of pi is unbiased, so a batch mean whose
    upper bound is still below 0 is not sampling noise: the log-probs are not those of
    the distribution that sampled (TRL's docs: "negative KL" is a sampling/log-prob mismatch).
    One episode has no standard error; its estimate is returned as is.
    """
    if seq_kl.dim() != 1 or seq_kl.numel() == 0:
        raise ValueError(f"seq_kl must be a non-empty (B,) tensor of per-sequence KL, got shape {tuple(seq_kl.shape)}")
    x = seq_kl.detach().to(torch.float64)
    mean = x.mean().item()
    if x.numel() == 1:
        return mean
    stderr = x.std(unbiased=True).item() / x.numel() ** 0.5
    return mean + z * stderr


@dataclass
class FixedKLController:
    """Constant KL coefficient beta (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: a fixed coefficient never changes (Ziegler et al. 2019)."""
        del current_kl, n_steps

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state for checkpointing."""
        return {"kind": "fixed", "value": float(self.value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller steering observed KL towards `target` (Ziegler et al. 2019, Sec. 2.2)."""

    value: float  # current beta (initialised to the initial coefficient)
    target: float  # KL_target
    horizon: int  # K_beta: larger = slower adaptation

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"kl_target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """beta <- beta * (1 + clip(KL/KL_target - 1, -0.2, 0.2) * n_steps / horizon) (Ziegler et al. 2019)."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state for checkpointing."""
        return {
            "kind": "adaptive",
            "value": float(self.value),
            "target": float(self.target),
            "horizon": int(self.horizon),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def make_kl_controller(
    kind: KLControllerKind, init_coef: float, target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """Build a fixed or adaptive KL controller (Ziegler et al. 2019)."""
    if kind == "fixed":
        return FixedKLController(value=init_coef)
    if kind == "adaptive":
        if target is None:
            raise ValueError("adaptive KL controller requires kl_target (got None)")
        return AdaptiveKLController(value=init_coef, target=target, horizon=horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; allowed values: {', '.join(_CONTROLLER_KINDS)}")
