"""Drift-monitoring configuration: thresholds and the monitor flow's parameters (frozen pydantic).

Every threshold is an effect size; the monitor also requires the statistic's
p-value to be below ``alpha`` (where the statistic has one), so a big window does
not alarm on a negligible shift and a small window does not alarm on noise.
Defaults were calibrated with bench/drift_detection.py (docs/monitoring.md).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaselineConfig(_Section):
    max_prompts: int = Field(1000, ge=2, description="Prompts profiled (tokens, intents, lengths), a seeded sample of the evaluation and PPO prompts")
    embedding_rows: int = Field(500, ge=2, description="Of those, prompts embedded for the MMD test")
    responses: int = Field(512, ge=2, description="Of those, prompts the policy answers (reward scores, lengths, NLL, KL, rates, gold)")
    batch_size: int = Field(64, ge=1, description="Sequences per forward pass or generation batch")


class DriftThresholds(_Section):
    alpha: float = Field(0.001, gt=0, lt=1, description="Significance level of every two-sample test; a signal breaches only when its p-value is below it and its effect crosses the threshold")
    prompt_token_js: float = Field(0.02, gt=0, le=1, description="Jensen-Shannon divergence (bits) of the prompt token distribution from the baseline's")
    prompt_intent_psi: float = Field(0.1, gt=0, description="Population stability index of the prompt intent distribution (0.1 = moderate shift)")
    prompt_mmd2: float = Field(0.01, gt=0, description="Unbiased MMD^2 (RBF kernel, baseline bandwidth) of prompt embeddings")
    prompt_length_ks: float = Field(0.1, gt=0, le=1, description="Kolmogorov-Smirnov statistic of prompt lengths (tokens)")
    kl_live_delta: float = Field(1.0, gt=0, description="Absolute change in nats of the mean sequence KL(champion || reference) on live prompts against the baseline's")
    rm_score_ks: float = Field(0.1, gt=0, le=1, description="Kolmogorov-Smirnov statistic of reward-model scores of served responses")
    response_length_ks: float = Field(0.1, gt=0, le=1, description="Kolmogorov-Smirnov statistic of response lengths (tokens)")
    response_nll_ks: float = Field(0.1, gt=0, le=1, description="Kolmogorov-Smirnov statistic of served responses' mean per-token NLL under the champion (are they what the champion would say?)")
    refusal_rate_delta: float = Field(0.05, gt=0, le=1, description="Absolute change of the refusal rate")
    violation_rate_delta: float = Field(0.05, gt=0, le=1, description="Absolute change of the policy-violation rate")
    gold_reward_drop: float = Field(0.2, gt=0, description="Fall of the mean gold-judge reward below the baseline's (built-in task)")
    feedback_rate_drop: float = Field(0.1, gt=0, le=1, description="Fall of the positive user-feedback rate below the baseline's")
    rm_gold_gap: float = Field(0.5, gt=0, description="Reward-model blind spot: how far (in baseline standard deviations) the reward-model score's shift exceeds the gold (or feedback) shift")


class MonitorConfig(_Section):
    experiment: str = Field("rlhf-monitoring", description="MLflow experiment of the monitoring runs")
    registered_model: str = Field("rlhf-policy", description="Registered policy model to monitor")
    alias: str = Field("champion", description="Registry alias of the version to monitor (ignored when `version` is set)")
    version: str | None = Field(None, description="Monitor this model version instead of the alias's")
    traffic: str = Field("traffic/window_*.jsonl", description="Glob of production-traffic windows (JSONL: timestamp, prompt, response, model_version, optional feedback); sorted names give the window order")
    window_index: int | None = Field(None, ge=0, description="Monitor this window (0-based position in the sorted glob) instead of the latest")
    force: bool = Field(False, description="Monitor the window again even if a monitoring run for it exists")
    min_rows: int = Field(100, ge=10, description="Fewest rows of the monitored version a window needs; smaller windows raise")
    use_gold_judge: bool = Field(True, description="Score served responses with the built-in gold judge (the built-in support task only)")
    thresholds: DriftThresholds = DriftThresholds()
    kl_prompts: int = Field(64, ge=2, description="Live prompts on which the champion is sampled for KL(champion || reference)")
    embedding_rows: int = Field(500, ge=10, description="Window prompts embedded for the MMD test (a random subset)")
    scored_rows: int = Field(2000, ge=10, description="Window rows whose responses are scored (reward model, NLL under the champion, rates, gold): a random subset of larger windows; prompt tokens, intents and lengths use every row")
    mmd_permutations: int = Field(1000, ge=20, description="Permutations of the MMD test (the smallest p-value is 1 / (permutations + 1), so it must be below thresholds.alpha)")
    batch_size: int = Field(64, ge=1, description="Sequences per forward pass when scoring")
    seed: int = Field(0, description="Seed of subsampling, sampling and permutations (plus the window index)")
    report_dir: str = Field("outputs/monitoring", description="Local folder for diagnosis reports before they are logged")
    trigger_deployment: str | None = Field(None, description="On an alert, start this Prefect deployment ('flow-name/deployment-name', e.g. the training pipeline's)")

    @model_validator(mode="after")
    def _check_alpha(self) -> "MonitorConfig":
        if 1.0 / (self.mmd_permutations + 1) >= self.thresholds.alpha:
            raise ValueError(
                f"mmd_permutations ({self.mmd_permutations}) cannot reach p < thresholds.alpha "
                f"({self.thresholds.alpha}): use at least {int(1 / self.thresholds.alpha)} permutations or raise alpha"
            )
        return self
