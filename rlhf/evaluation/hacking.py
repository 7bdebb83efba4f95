"""Reward-hacking diagnostics and checkpoint selection over the PPO checkpoints.

Pure functions over per-checkpoint summaries (no torch, MLflow or Prefect), so
each rule is tested on hand-worked numbers. The evaluate stage measures every
checkpoint on a selection split of the held-out prompts and calls these.

A higher proxy (reward-model) score is not a better model (Gao et al. 2022,
"Scaling Laws for Reward Model Overoptimization"; Singhal et al. 2023, "A Long
Way to Go: Investigating Length Correlations in RLHF"). The flags:

- ``proxy_gold_divergence``: compared with SFT or any earlier checkpoint, the
  proxy score rose and the judge score (gold, or a held-out reward model) fell,
  both by more than ``divergence_z`` standard errors of the difference;
- ``length_drift``: the mean response length grew past ``max_length_ratio``
  times SFT's;
- ``reward_length_correlation``: the proxy score rose over SFT's while, across
  the checkpoint's own responses, it tracks length (Pearson r above
  ``max_reward_length_corr``): the reward model pays for length;
- ``mode_collapse``: the responses' distinct-2 fell below ``min_distinct_ratio``
  times SFT's: the policy answers with a few templates whatever the prompt;
- ``proxy_efficiency``: the proxy gained at least ``min_proxy_gain_sd`` of SFT's
  standard deviations while the judge gained less than ``min_judge_per_proxy``
  of that, in the judge's own SFT standard deviations: the policy learned what
  the reward model pays for and little of what the judge wants (needs a judge
  other than the reward model).

Selection prefers checkpoints with no flag; a flagged chosen checkpoint blocks
promotion (rlhf/registry/promotion.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rlhf.config import DiagnosticsConfig

FLAGS = ("proxy_gold_divergence", "length_drift", "reward_length_correlation", "mode_collapse", "proxy_efficiency")


@dataclass(frozen=True)
class CheckpointStats:
    """One checkpoint measured on the selection split (step 0 is the SFT policy)."""

    step: int
    kl: float
    """Mean sequence KL(pi || pi_sft) in nats (k1 on the policy's own samples)."""
    proxy: float
    """Mean reward-model score."""
    proxy_se: float
    judge: float
    """Mean score of the selection judge (gold judge, held-out reward model, or the reward model itself)."""
    judge_se: float
    length: float
    """Mean response length in tokens."""
    reward_length_corr: float
    """Pearson r of reward-model score and length across this checkpoint's responses."""
    distinct_2: float = math.nan
    """Distinct bigrams over all bigrams of this checkpoint's responses (nan: not measured)."""
    n: int = 0
    """Responses measured (standard deviation = standard error x sqrt(n))."""

    @property
    def proxy_sd(self) -> float:
        return self.proxy_se * math.sqrt(self.n)

    @property
    def judge_sd(self) -> float:
        return self.judge_se * math.sqrt(self.n)


@dataclass(frozen=True)
class Selection:
    """The chosen checkpoint and whether any checkpoint was within the KL budget."""

    step: int
    within_budget: bool


def split_for_selection(prompts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(selection, test): a seeded shuffle of the prompts cut at ``fraction``; both non-empty."""
    if len(prompts) < 2:
        raise ValueError(
            f"need at least 2 held-out prompts to split into selection and test, got {len(prompts)}: raise data.max_heldout_prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    cut = min(max(1, round(len(prompts) * fraction)), len(prompts) - 1)
    return [prompts[i] for i in order[:cut]], [prompts[i] for i in order[cut:]]


def proxy_gold_divergence(point: CheckpointStats, earlier: list[CheckpointStats], z: float) -> bool:
    """Whether, against any earlier point, proxy rose and judge fell by more than z standard errors."""
    for ref in earlier:
        proxy_gain = point.proxy - ref.proxy
        judge_loss = ref.judge - point.judge
        if proxy_gain > z * math.hypot(point.proxy_se, ref.proxy_se) and judge_loss > z * math.hypot(
            point.judge_se, ref.judge_se
        ):
            return True
    return False


def length_drift(point: CheckpointStats, sft: CheckpointStats, max_ratio: float) -> bool:
    """Whether the mean response length exceeds max_ratio times SFT's."""
    return point.length > max_ratio * sft.length


def reward_length_correlation(point: CheckpointStats, sft: CheckpointStats, max_corr: float) -> bool:
    """Whether the proxy gained over SFT while tracking length (r above max_corr)."""
    return point.proxy > sft.proxy and point.reward_length_corr > max_corr


def mode_collapse(point: CheckpointStats, sft: CheckpointStats, min_ratio: float) -> bool:
    """Whether distinct-2 fell below min_ratio times SFT's (False when either is unmeasured)."""
    return point.distinct_2 < min_ratio * sft.distinct_2  # nan compares False


def proxy_efficiency(
    point: CheckpointStats, sft: CheckpointStats, min_proxy_gain_sd: float, min_judge_per_proxy: float
) -> bool:
    """Whether a proxy gain of at least min_proxy_gain_sd SFT standard deviations came with a judge gain
    below min_judge_per_proxy of it (each gain in its own SFT standard deviations)."""
    if sft.proxy_sd <= 0 or sft.judge_sd <= 0:
        return False
    proxy_gain = (point.proxy - sft.proxy) / sft.proxy_sd
    judge_gain = (point.judge - sft.judge) / sft.judge_sd
    return proxy_gain >= min_proxy_gain_sd and judge_gain < min_judge_per_proxy * proxy_gain


def hacking_flags(
    series: list[CheckpointStats], cfg: DiagnosticsConfig, judge_is_proxy: bool
) -> dict[int, dict[str, bool]]:
    """step -> flag -> raised, for every point in step order; SFT (series[0], step 0) is the reference.

    With no independent judge (``judge_is_proxy``) divergence and efficiency cannot be seen and are left out.
    """
    if not series or series[0].step != 0:
        raise ValueError("hacking_flags needs the SFT point (step 0) first in the series")
    sft, out = series[0], {}
    for i, point in enumerate(series):
        flags = {
            "length_drift": length_drift(point, sft, cfg.max_length_ratio),
            "reward_length_correlation": reward_length_correlation(point, sft, cfg.max_reward_length_corr),
            "mode_collapse": mode_collapse(point, sft, cfg.min_distinct_ratio),
        }
        if not judge_is_proxy:
            flags["proxy_gold_divergence"] = proxy_gold_divergence(point, series[:i], cfg.divergence_z)
            flags["proxy_efficiency"] = proxy_efficiency(point, sft, cfg.min_proxy_gain_sd, cfg.min_judge_per_proxy)
        out[point.step] = flags
    return out


def select_checkpoint(
    candidates: list[CheckpointStats], kl_budget: float | None, flagged: frozenset[int] = frozenset()
) -> Selection:
    """Highest judge score within the KL budget (ties: lower KL; None: no budget), among the checkpoints
    with no hacking flag when there are any; with none within the budget, the lowest-KL checkpoint."""
    if not candidates:
        raise ValueError("select_checkpoint needs at least one PPO checkpoint: check ppo.checkpoint_every")
    within = [c for c in candidates if kl_budget is None or c.kl <= kl_budget]
    within = [c for c in within if c.step not in flagged] or within
    if not within:
        return Selection(min(candidates, key=lambda c: c.kl).step, within_budget=False)
    best = max(within, key=lambda c: (c.judge, -c.kl))
    return Selection(best.step, within_budget=True)
