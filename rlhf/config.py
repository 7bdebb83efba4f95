"""Pipeline configuration: frozen pydantic models whose defaults run the demo on a CPU.

One tree: every section (data, training, evaluation diagnostics, promotion gates,
drift baseline and monitoring) hangs off ``PipelineConfig``, so ``--set
section.field=value`` reaches all of them; the monitor and promote flows take their
own section as their parameter. Every field has a one-line description (the Prefect
UI renders them as a form), and each default is written once, here.
``load_config`` reads a YAML file and applies ``section.field=value`` overrides;
unknown keys raise with the list of valid ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

MAX_SEED = 2**32 - 1  # numpy's seeds are 0..2**32-1
Algorithm = Literal["ppo", "dpo", "rloo", "grpo"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)


class _Section(BaseModel):
    # inf and nan are never a sensible learning rate, temperature or threshold.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`ppo.steps=true` must not train 1 step: a boolean is refused where a number is expected."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            types = set(get_args(annotation) or (annotation,))
            if types & {int, float} and bool not in types:
                raise ValueError(f"got the boolean {str(value).lower()}, but this option is a number")
        return value


class DataConfig(_Section):
    source: str = Field(
        "builtin",
        description="'builtin' for the embedded data set, or a folder holding sft.jsonl, preferences.jsonl, preferences_heldout.jsonl, prompts.jsonl, heldout_prompts.jsonl (JSON/JSONL/CSV/Parquet; per-file paths below override)",
    )
    sft_path: str | None = Field(
        None, description="SFT demonstrations (prompt, completion); overrides the file in `source`"
    )
    preferences_path: str | None = Field(
        None, description="Preference pairs (prompt, chosen, rejected) for reward-model training"
    )
    preferences_heldout_path: str | None = Field(
        None,
        description="Held-out preference pairs for reward-model accuracy. Any *_path may name a Hub data set as org/name[:split][@revision] (split defaults to train; pin the revision), e.g. HuggingFaceH4/ultrafeedback_binarized:test_prefs@<sha>",
    )
    prompts_path: str | None = Field(None, description="PPO training prompts (prompt)")
    heldout_prompts_path: str | None = Field(None, description="Held-out evaluation prompts (prompt)")
    max_heldout_prompts: int = Field(
        128,
        ge=2,
        description="Evaluation uses at most this many held-out prompts (at least 2: one to choose the checkpoint, one to test it)",
    )

    @property
    def is_builtin(self) -> bool:
        """The embedded support task (its gold judge and task checks apply)."""
        return self.source == "builtin"


class ValidationConfig(_Section):
    min_rows: int = Field(8, ge=1, description="Fewest rows a training split may have")
    max_rows: int = Field(5_000_000, ge=1, description="Most rows a split may have")
    min_chars: int = Field(1, ge=0, description="Shortest prompt/response text in characters")
    max_chars: int = Field(8000, ge=1, description="Longest prompt/response text in characters")
    max_tokens: int = Field(
        2048,
        ge=1,
        description="Longest prompt/response text in tokens of the base model's tokenizer (checked only when the stage is given the tokenizer)",
    )
    pii_policy: Literal["fail", "redact"] = Field(
        "fail",
        description="On e-mail, phone, card, SSN or IBAN numbers in the data: fail the run, or redact them and report",
    )
    pii_kinds: tuple[Literal["email", "phone", "card", "ssn", "iban"], ...] = Field(
        ("email", "phone", "card", "ssn", "iban"),
        description="PII patterns to look for: e-mail addresses, phone numbers, payment card numbers (Luhn-checked), US social security numbers, IBANs (mod-97-checked)",
    )
    max_duplicate_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Largest share of SFT demonstrations or preference pairs that repeat an earlier row (a pair with chosen/rejected swapped counts as a repeat); PPO prompts may repeat freely",
    )
    max_leaked_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Largest share of a training split (sft, preferences, prompts) whose prompts also occur in a held-out split (heldout_prompts, preferences_heldout)",
    )
    max_row_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="Longest line/row of a data file in bytes; a longer one is rejected before parsing (usually a broken export)",
    )
    max_file_bytes: int = Field(
        2_000_000_000,
        ge=1024,
        description="Largest data file in bytes; a bigger one is rejected before it is read (split it, or raise this)",
    )
    max_examples: int = Field(3, ge=1, description="Example rows quoted per failed check in error messages")

    @model_validator(mode="after")
    def _check_bounds(self) -> ValidationConfig:
        for low, high in (("min_rows", "max_rows"), ("min_chars", "max_chars")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"validation.{low} ({getattr(self, low)}) must not exceed validation.{high} "
                    f"({getattr(self, high)}): change one of them"
                )
        return self


class ModelConfig(_Section):
    base_model: str = Field(
        "builtin:tiny-gpt2",
        description="Hugging Face name or local path of the base causal LM; 'builtin:tiny-gpt2' or 'builtin:tiny-llama' for the embedded default",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a Hub checkpoint (off unless you trust it)"
    )
    lora_r: int = Field(
        0,
        ge=0,
        description="LoRA rank for SFT, reward-model and PPO training (peft; DPO, RLOO and GRPO train every weight); 0 trains every weight. Each stage logs checkpoints with the adapters merged, so later stages load a plain model. In PPO the reference is the policy with its adapters disabled (no second copy of the weights) and the value head trains in full",
    )
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA branch (SFT and reward model; PPO runs without dropout)"
    )
    lora_target_modules: str = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear', or comma-separated module names (e.g. 'q_proj,v_proj' for Llama/Qwen, 'c_attn' for GPT-2)",
    )


class SFTConfig(_Section):
    max_steps: int = Field(
        300,
        ge=1,
        description="Optimizer steps of supervised fine-tuning; 150 left the demo policy writing garbled mixtures of answers that PPO could not clean up (docs/evaluation.md)",
    )
    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step")
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Peak AdamW learning rate (linear decay)")
    max_length: int = Field(128, ge=8, description="Longest prompt+completion in tokens; longer rows are truncated")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass to save memory (about 20% slower); off unless the model does not fit",
    )
    group_by_length: bool = Field(
        True,
        description="Batch rows of similar length (transformers' LengthGroupedSampler) so less of each batch is padding; the built-in data's random batches are about a third padding. Grouping is per process: with several processes the global batches hold other rows than with one",
    )


class RewardConfig(_Section):
    max_steps: int = Field(
        400,
        ge=1,
        description="Optimizer steps of reward-model training (Bradley-Terry loss); at 250 the demo reward model barely told a refund answer from a shipping one (docs/evaluation.md)",
    )
    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step")
    learning_rate: float = Field(
        3e-4,
        gt=0,
        le=1,
        description="Peak AdamW learning rate (linear decay); 1e-3 left the demo's reward model at 0.73-0.83 held-out accuracy on seed 1 (docs/evaluation.md, ablation)",
    )
    max_length: int = Field(128, ge=8, description="Longest prompt+response in tokens; longer pairs are dropped")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass to save memory (about 20% slower); off unless the model does not fit",
    )
    group_by_length: bool = Field(
        True,
        description="Batch pairs of similar length (the longer of chosen and rejected) so less of each batch is padding",
    )
    max_heldout_pairs: int | None = Field(
        None,
        ge=1,
        description="Held-out accuracy (reward/accuracy) is measured on at most this many held-out pairs, drawn with the seed; all when unset",
    )


class PPOConfig(_Section):
    steps: int = Field(60, ge=1, description="PPO iterations (each: generate, score, update)")
    batch_size: int = Field(32, ge=1, description="Episodes (prompt + sampled response) per iteration")
    mini_batch_size: int = Field(16, ge=1, description="Episodes per gradient step; must divide batch_size")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each batch of episodes")
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens")
    temperature: float = Field(
        1.0,
        gt=0,
        le=10,
        description="Sampling temperature; log-probs use the same temperature (above a few, sampling is nearly uniform)",
    )
    learning_rate: float = Field(3e-4, gt=0, le=1, description="AdamW learning rate for policy and value head")
    lr_schedule: Literal["constant", "linear"] = Field(
        "linear",
        description="linear: from learning_rate at iteration 1 down to learning_rate/steps at the last (TRL's PPOTrainer default), so the late iterations, where the demo policy narrowed onto templates, move it less; constant: learning_rate every iteration (docs/evaluation.md, round four)",
    )
    bf16: bool = Field(
        False,
        description="Run every model forward (sampling, reference, reward model, update) under bf16 autocast; log-probs, values, advantages, losses and the optimizer stay fp32. Needs a GPU with bf16 (Ampere or later) or the CPU (where the tests run it)",
    )
    kl_control: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="Fixed KL coefficient, or the adaptive controller of Ziegler et al. 2019"
    )
    kl_coef: float = Field(0.1, ge=0, description="Initial KL penalty coefficient beta")
    kl_target: float = Field(
        6.0, gt=0, description="Target sequence-level KL(pi || pi_ref) in nats for the adaptive controller"
    )
    kl_horizon: int = Field(
        300,
        ge=1,
        description="Adaptive controller horizon in episodes; at least batch_size, so beta moves at most 20% per iteration. The default moves beta up to 2% per iteration of 32 episodes: at 1000 (0.6%) it barely moved in a 60-iteration run while KL reached 2-4x target (docs/evaluation.md)",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1",
        description="Per-token KL estimator in the reward penalty (Schulman 2020); objective/kl and the controller always use k1",
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip range")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient")
    value_head_init: Literal["reward_model", "zero"] = Field(
        "reward_model",
        description="Where a fresh value head starts: reward_model, a copy of the reward model's score head (TRL starts its value model as the reward model; ours shares the policy's trunk, so the head alone is copied: it needs a reward model trained from the policy's SFT model, and falls back to zero where the reward model's head does not fit); zero: zeros. A value head saved with the start checkpoint or a resumed run's is loaded instead (docs/benchmarks.md, the critic's start)",
    )
    ent_coef: float = Field(
        0.1,
        ge=0,
        description="Entropy bonus coefficient; at 0 the demo policy collapsed onto one opening and one closing (distinct-2 0.77x SFT's); 0.1 with the linear lr_schedule, 0.05 with a constant one (docs/evaluation.md, rounds two to four)",
    )
    entropy_floor: bool = Field(
        True,
        description="The entropy bonus pushes only where the policy's per-token entropy is below the SFT reference's (a floor); false: a plain bonus on the policy's entropy everywhere, which on 3 of 6 fresh seeds heated the demo policy into wrong-intent answers (docs/evaluation.md)",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip")
    whiten_advantages: bool = Field(True, description="Normalise advantages per batch")
    normalize_reward: bool = Field(True, description="Normalise reward-model scores with running mean/std")
    reward_clip: float = Field(5.0, gt=0, description="Clip normalised scores to [-reward_clip, reward_clip]")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the score of a response that never ends")
    ratio_skip_threshold: float = Field(
        10.0,
        gt=1,
        description="Skip a minibatch (and raise a `ratio_explosion` alert) when its mean probability ratio pi/pi_old over response tokens exceeds this (TRL's ratio_threshold)",
    )
    kl_budget: float | None = Field(
        12.0,
        gt=0,
        description="Largest objective/kl (nats, batch mean) the run may reach; above it `kl_budget_action` happens; None: no budget. Keep it well above kl_target (e.g. 2x): one batch's KL is noisy",
    )
    kl_budget_action: Literal["warn", "stop", "rollback"] = Field(
        "warn",
        description="On exceeding kl_budget: warn and go on; stop (final = current policy); or roll back to the best checkpoint within budget and stop",
    )
    resume_from: str | None = Field(
        None,
        description="Resume from an earlier PPO run: its MLflow run id (latest complete checkpoint) or a checkpoint URI (.../checkpoints/step_XXXXX); continues to `steps`, logging at the following step numbers",
    )
    auto_resume: bool = Field(
        True,
        description="Without resume_from: continue an interrupted PPO run with the same inputs (killed, failed, or a lost tracking connection) from its latest good checkpoint instead of starting afresh",
    )
    checkpoint_every: int = Field(
        20, ge=1, description="Log a full checkpoint every N iterations (and at step 0 and the end)"
    )
    sample_every: int = Field(20, ge=1, description="Log a table of sample responses every N iterations")

    @model_validator(mode="after")
    def _check_batches(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.mini_batch_size "
                f"({self.mini_batch_size}): change one of them"
            )
        if self.kl_horizon < self.batch_size:
            raise ValueError(
                f"ppo.kl_horizon ({self.kl_horizon}) must be at least ppo.batch_size ({self.batch_size}), "
                "else one noisy batch moves beta by more than 20%: raise kl_horizon"
            )
        if self.kl_control == "adaptive" and self.kl_budget is not None and self.kl_budget <= self.kl_target:
            raise ValueError(
                f"ppo.kl_budget ({self.kl_budget}) must exceed ppo.kl_target ({self.kl_target}), else the controller "
                "steers into the budget: raise kl_budget (e.g. to 2x kl_target) or set it to null"
            )
        return self


class DPOConfig(_Section):
    """Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer: the SFT policy trained on the
    preference pairs directly, against the frozen SFT reference; no reward model in the loop."""

    steps: int = Field(100, ge=1, description="Optimizer steps")
    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak AdamW learning rate (linear decay, 5% warm-up)")
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the implicit KL regulariser: higher keeps the policy closer to the SFT reference (IPO: the regulariser tau)",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="sigmoid: the DPO loss; ipo: IPO's squared loss (Azar et al. 2023); hinge: SLiC; robust: DPO corrected for label noise at rate label_smoothing",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed share of flipped preference labels (loss=robust only; 0 otherwise)"
    )
    max_length: int = Field(128, ge=8, description="Longest prompt+response in tokens; longer pairs are truncated")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip")
    checkpoint_every: int = Field(
        20, ge=1, description="Log a checkpoint every N steps (and at the end); step 0 is the SFT checkpoint"
    )

    @model_validator(mode="after")
    def _check_smoothing(self) -> DPOConfig:
        if self.label_smoothing and self.loss != "robust":
            raise ValueError(
                f"dpo.label_smoothing ({self.label_smoothing}) only applies to dpo.loss=robust (got "
                f"{self.loss!r}): set dpo.loss=robust or dpo.label_smoothing=0"
            )
        return self


class _SampledPolicyConfig(_Section):
    """What RLOO and GRPO share: several sampled responses per prompt, scored by the reward model."""

    steps: int = Field(
        60,
        ge=1,
        description="Optimizer steps; each samples and scores a new batch of episodes (with epochs > 1, every `epochs` steps)",
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Episodes (prompt + sampled response) per optimizer step: batch_size / num_generations prompts",
    )
    num_generations: int = Field(
        4, ge=2, description="Responses sampled per prompt; each response's baseline comes from its siblings"
    )
    beta: float = Field(
        0.05,
        ge=0,
        description="KL coefficient to the SFT reference (fixed; 0 drops the reference model and the KL term)",
    )
    learning_rate: float = Field(
        1e-4,
        gt=0,
        le=1,
        description="AdamW learning rate (constant); 3e-4 ran past a 12-nat KL budget on the built-in task (docs/alternatives.md)",
    )
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature (same as eval.temperature's)")
    epochs: int = Field(
        1, ge=1, description="Optimizer steps on each sampled batch of episodes (TRL's num_iterations, mu)"
    )
    clip_range: float = Field(0.2, gt=0, description="Ratio clip epsilon (matters only with epochs > 1)")
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="Subtracted from the score of a response that never ends (as in PPO)"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip")
    checkpoint_every: int = Field(
        20, ge=1, description="Log a checkpoint every N iterations (and at the end); step 0 is the SFT checkpoint"
    )

    @model_validator(mode="after")
    def _check_groups(self) -> _SampledPolicyConfig:
        name = "grpo" if isinstance(self, GRPOConfig) else "rloo"
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"{name}.batch_size ({self.batch_size}) must be a multiple of {name}.num_generations "
                f"({self.num_generations}): each prompt's responses form one group; change one of them"
            )
        return self


class RLOOConfig(_SampledPolicyConfig):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024) with TRL's RLOOTrainer: each response's baseline is the mean
    reward of its siblings; the KL to the reference is a penalty in the reward (sequence-level k1), as in PPO."""


class GRPOConfig(_SampledPolicyConfig):
    """Group Relative Policy Optimization (Shao et al. 2024) with TRL's GRPOTrainer: advantages are rewards
    normalised within each prompt's group; the KL to the reference (k3, per token) is a term of the loss."""

    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo",
        description="How token losses are averaged: grpo (per sequence, then batch; length-biased), dapo (over all tokens of the batch, TRL's default), dr_grpo (by a constant), bnpo (tokens of the local batch)",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the reward std of the group (GRPO), of the batch, or not at all (Dr. GRPO)",
    )


class EvalConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens")
    samples_per_prompt: int = Field(2, ge=1, description="Responses sampled per held-out prompt")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature (same as PPO's, so KL is comparable)"
    )


class DistributedConfig(_Section):
    num_processes: int = Field(
        1,
        ge=1,
        description="Training processes for the SFT, reward-model and PPO stages: 1 trains in the flow's own process; more launches them on this machine with torchrun (DDP: gloo on CPUs, NCCL with one GPU per process). Batch sizes stay global and must be multiples of it",
    )
    accelerate_config: str | None = Field(
        None,
        description="An `accelerate config` file for the SFT and reward-model stages (FSDP, DeepSpeed, mixed precision); they are then started with `accelerate launch --config_file`. PPO's own loop always runs DDP",
    )


class TimeoutConfig(_Section):
    """How long each pipeline stage may run, in seconds, before Prefect fails it (a hung DDP
    rendezvous or a stuck download must not hold the training queue forever). Generous on
    purpose: a slow but healthy stage should never meet them; raise one for a bigger run."""

    validate_s: int = Field(3600, ge=1, description="Data validation (Great Expectations, tokenizer checks)")
    sft_s: int = Field(43_200, ge=1, description="Supervised fine-tuning, all processes together")
    reward_s: int = Field(
        43_200, ge=1, description="Reward-model training (also the judge reward model on your own data)"
    )
    ppo_s: int = Field(86_400, ge=1, description="PPO, all iterations and checkpoints")
    dpo_s: int = Field(86_400, ge=1, description="DPO (algorithm=dpo), all steps and checkpoints")
    rloo_s: int = Field(86_400, ge=1, description="RLOO (algorithm=rloo), all iterations and checkpoints")
    grpo_s: int = Field(86_400, ge=1, description="GRPO (algorithm=grpo), all iterations and checkpoints")
    evaluate_s: int = Field(21_600, ge=1, description="Held-out evaluation and checkpoint selection")
    register_s: int = Field(3600, ge=1, description="Registering the policy and reward model versions")
    baseline_s: int = Field(7200, ge=1, description="The drift-monitoring baseline profile of the new version")


class BaselineConfig(_Section):
    max_prompts: int = Field(
        1000,
        ge=2,
        description="Prompts profiled (tokens, intents, lengths), a seeded sample of the evaluation and PPO prompts",
    )
    embedding_rows: int = Field(500, ge=2, description="Of those, prompts embedded for the MMD test")
    responses: int = Field(
        512, ge=2, description="Of those, prompts the policy answers (reward scores, lengths, NLL, KL, rates, gold)"
    )
    batch_size: int = Field(64, ge=1, description="Sequences per forward pass or generation batch")


MONITOR_TESTS = 13
"""Most drift tests in one window's Holm family (rlhf/drift/signals.py: every signal with a p-value)."""


class DriftThresholds(_Section):
    """Effect floors and the family-wise alpha of the drift tests.

    The floors are the 99% quantile of each effect over 100 clean 1000-row windows of fresh traffic from
    the calibration split (`bench/drift_heldout.py calibrate`, bench/results/drift_calibration.json, the
    built-in task's champion); calibrate again for another model or traffic.
    """

    alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Window-level false-alarm rate: family-wise significance level of the window's tests, Holm-adjusted; a signal breaches only when its adjusted p-value is below it and its effect crosses the threshold",
    )
    tail_share: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Share of the baseline beyond the cut of the tail-exceedance signals (response_nll_tail)",
    )
    prompt_token_js: float = Field(
        0.002402,
        gt=0,
        le=1,
        description="Jensen-Shannon divergence (bits) of the prompt token distribution from the baseline's",
    )
    prompt_intent_psi: float = Field(
        0.008483,
        gt=0,
        description="Population stability index of the prompt intent distribution (0.1 = moderate shift)",
    )
    prompt_mmd2: float = Field(
        0.001017, gt=0, description="Unbiased MMD^2 (RBF kernel, baseline bandwidth) of prompt embeddings"
    )
    prompt_length_ks: float = Field(
        0.058, gt=0, le=1, description="Kolmogorov-Smirnov statistic of prompt lengths (tokens)"
    )
    kl_live_delta: float = Field(
        1.105,
        gt=0,
        description="Absolute change in nats of the mean sequence KL(champion || reference) on live prompts against the baseline's",
    )
    rm_score_ks: float = Field(
        0.08288, gt=0, le=1, description="Kolmogorov-Smirnov statistic of reward-model scores of served responses"
    )
    response_length_ks: float = Field(
        0.05792, gt=0, le=1, description="Kolmogorov-Smirnov statistic of response lengths (tokens)"
    )
    response_nll_ks: float = Field(
        0.05507,
        gt=0,
        le=1,
        description="Kolmogorov-Smirnov statistic of served responses' mean per-token NLL under the champion (are they what the champion would say?)",
    )
    response_nll_tail: float = Field(
        0.011,
        gt=0,
        le=1,
        description="Share of served responses whose NLL under the champion passes the baseline's upper tail_share cut",
    )
    refusal_rate_delta: float = Field(0.03184, gt=0, le=1, description="Absolute change of the refusal rate")
    violation_rate_delta: float = Field(0.02541, gt=0, le=1, description="Absolute change of the policy-violation rate")
    gold_reward_drop: float = Field(
        1e-6, gt=0, description="Fall of the mean gold-judge reward below the baseline's (built-in task)"
    )
    feedback_rate_drop: float = Field(
        0.02849, gt=0, le=1, description="Fall of the positive user-feedback rate below the baseline's"
    )
    rm_gold_gap: float = Field(
        0.5,
        gt=0,
        description="Reward-model blind spot: how far (in baseline standard deviations) the reward-model score's shift exceeds the gold (or feedback) shift",
    )


class MonitorConfig(_Section):
    experiment: str = Field("rlhf-monitoring", description="MLflow experiment of the monitoring runs")
    registered_model: str = Field("rlhf-policy", description="Registered policy model to monitor")
    alias: str = Field(
        "champion", description="Registry alias of the version to monitor (ignored when `version` is set)"
    )
    version: str | None = Field(None, description="Monitor this model version instead of the alias's")
    traffic: str = Field(
        "traffic/window_*.jsonl",
        description="Glob of production-traffic windows (JSONL: timestamp, prompt, response, model_version, optional feedback); sorted names give the window order",
    )
    window_index: int | None = Field(
        None, ge=0, description="Monitor this window (0-based position in the sorted glob) instead of the latest"
    )
    force: bool = Field(False, description="Monitor the window again even if a monitoring run for it exists")
    min_rows: int = Field(
        100, ge=10, description="Fewest rows of the monitored version a window needs; smaller windows raise"
    )
    use_gold_judge: bool = Field(
        True, description="Score served responses with the built-in gold judge (the built-in support task only)"
    )
    thresholds: DriftThresholds = DriftThresholds()
    kl_prompts: int = Field(
        64, ge=2, description="Live prompts on which the champion is sampled for KL(champion || reference)"
    )
    embedding_rows: int = Field(500, ge=10, description="Window prompts embedded for the MMD test (a random subset)")
    scored_rows: int = Field(
        2000,
        ge=10,
        description="Window rows whose responses are scored (reward model, NLL under the champion, rates, gold): a random subset of larger windows; prompt tokens, intents and lengths use every row",
    )
    permutations: int = Field(
        2000,
        ge=20,
        description="Permutations of the MMD and prompt-token JS tests (the smallest p-value is 1 / (permutations + 1), so it must be below thresholds.alpha / the number of tests, Holm's first step)",
    )
    batch_size: int = Field(64, ge=1, description="Sequences per forward pass when scoring")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of subsampling, sampling and permutations (plus the window index)"
    )
    report_dir: str = Field(
        "outputs/monitoring", description="Local folder for diagnosis reports before they are logged"
    )
    feedback_dir: str | None = Field(
        "feedback",
        description="Folder of feedback batches: each monitored window's thumbs up/down on equivalent prompts become a batch of preference pairs here (the feedback flow learns from them); None collects none",
    )

    @model_validator(mode="before")
    @classmethod
    def _retraining_is_a_trigger(cls, data: Any) -> Any:
        """The options of the retraining the monitor used to start itself say where it is configured now."""
        if isinstance(data, dict) and "mmd_permutations" in data:
            raise ValueError(
                "mmd_permutations is now `permutations` (the MMD and the prompt-token JS tests share it): rename the option"
            )
        removed = sorted({"trigger_deployment", "retrain_cooldown_h"} & set(data)) if isinstance(data, dict) else []
        if removed:
            raise ValueError(
                f"{' and '.join(removed)}: the monitor no longer starts retraining; the retrain-on-drift deployment's "
                "trigger in prefect.yaml does, on the rlhf.drift.alert event, with its cooldown as the trigger's "
                f"`within:` (docs/monitoring.md). Fix: remove {' and '.join(removed)} from the monitor options"
            )
        return data

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        """`--set monitor.version=3` and YAML `version: 3` give an int: registry versions are numbers."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_alpha(self) -> MonitorConfig:
        # Holm's first step compares the smallest p-value with alpha / (number of tests).
        floor = self.thresholds.alpha / MONITOR_TESTS
        if 1.0 / (self.permutations + 1) >= floor:
            raise ValueError(
                f"permutations ({self.permutations}) cannot reach p < thresholds.alpha / {MONITOR_TESTS} tests "
                f"({floor:.2g}): use at least {math.ceil(1 / floor)} permutations or raise alpha"
            )
        return self


class DiagnosticsConfig(_Section):
    """Checkpoint selection and reward-hacking thresholds of the evaluate stage."""

    selection_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of the held-out prompts used to choose the checkpoint; the rest is the untouched test split of the final evaluation",
    )
    kl_budget: float | None = Field(
        None,
        gt=0,
        description="Largest mean sequence KL(pi || pi_sft) in nats a chosen checkpoint may have (measured on the selection split); None: ppo.kl_budget, the budget PPO trains under, which then bounds every algorithm (dpo, rloo, grpo too)",
    )
    divergence_z: float = Field(
        2.0,
        gt=0,
        description="Standard errors by which proxy must rise and gold fall before proxy_gold_divergence is flagged",
    )
    max_length_ratio: float = Field(
        1.5, gt=1, description="Mean response length over SFT's above which length_drift is flagged"
    )
    max_reward_length_corr: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Pearson r of proxy score and response length above which, with a proxy gain over SFT, reward_length_correlation is flagged",
    )
    min_distinct_ratio: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Distinct-2 of the responses over SFT's below which mode_collapse is flagged (and selection passes the checkpoint over); 0.8 is the alignment bar's own (docs/evaluation.md); at 0.6 a policy at 0.7x SFT's, a few templates, counted as healthy",
    )
    min_proxy_gain_sd: float = Field(
        1.0,
        gt=0,
        description="Proxy gain over SFT, in SFT's standard deviations of the proxy score, from which proxy_efficiency is checked",
    )
    min_judge_per_proxy: float = Field(
        0.25,
        gt=0,
        description="Judge gain (in SFT's standard deviations of the judge score) per unit of proxy gain below which proxy_efficiency is flagged",
    )


class PromotionConfig(_Section):
    """The promotion gates and how promotion waits for locks and reviewers."""

    min_win_rate_vs_champion_low: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="The 95% Wilson lower bound of the win rate against the current champion must exceed this (waived while there is no champion)",
    )
    min_win_rate_vs_sft_low: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="The 95% Wilson lower bound of the win rate against the SFT policy must exceed this",
    )
    max_violation_increase: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How much the policy-violation rate may exceed that of the model it replaces (the champion, or SFT while there is none)",
    )
    max_kl: float | None = Field(
        None,
        gt=0,
        description="Largest held-out KL(pi || pi_sft) in nats a promoted version may have; None: the KL budget it was trained and evaluated under (its eval/kl_budget tag)",
    )
    block_on_run_flags: bool = Field(
        False,
        description="Also block on hacking flags raised at other checkpoints of the same PPO run (hacking.run.*), not only at the registered one",
    )
    require_validation: bool = Field(
        True, description="Require the pipeline run's data validation to have passed (tag validation.success=true)"
    )
    require_approval: bool = Field(
        False, description="Pause the promotion flow for a human approval in the Prefect UI before moving the champion"
    )
    approval_timeout_s: int = Field(
        3600,
        ge=1,
        description="Seconds to wait for the approval before the flow run fails (the version stays challenger)",
    )
    lock_timeout_s: float = Field(
        120.0, gt=0, description="Seconds to wait for another promotion or rollback of the same model to finish"
    )
    lock_dir: str | None = Field(
        None,
        description="Folder for the promotion lock file; defaults to the local store's folder, required for a remote tracking server (a folder every promoter shares)",
    )


class FeedbackConfig(_Section):
    """Human feedback: the ranking page (`rlhf label`) and the feedback flow that learns from its batches."""

    dir: str = Field(
        "feedback",
        description="Folder of feedback batches (one subfolder each: rankings, pairs with provenance, manifest); `rlhf label` and the monitor write them, the feedback flow reads them",
    )
    k: int = Field(4, ge=2, le=8, description="Responses sampled per prompt for a rater to rank")
    prompts: int = Field(
        20, ge=1, description="Prompts per labelling session (drawn with the seed from the prompt file)"
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the responses shown (the policy's own)")
    max_new_tokens: int = Field(48, ge=1, description="Longest response shown, in tokens")
    batches: list[str] | None = Field(
        None,
        description="Feedback batches (folder names under `dir`) the feedback flow learns from besides those the champion already learned; None: every validated batch there",
    )
    replay: int = Field(
        3,
        ge=1,
        le=100,
        description="Times the reward model of the feedback flow sees each feedback pair per pass over the base pairs (the validated pairs are replayed after the gate, which refuses repeats): the on-policy pairs are where the policy goes, and at one round of ~500 ranked prompts (~2700 pairs) next to 6000 off-policy pairs, 3 makes them about half of what the reward model trains on (docs/feedback.md); 1 = no replay",
    )
    ent_coef: float = Field(
        0.0,
        ge=0,
        description="Entropy bonus (ppo.ent_coef) of the PPO run the feedback flow continues from the champion; ppo.ent_coef guards a run from SFT against collapse, but a champion already trained with it keeps its spread, and the bonus then pulls the continued run up in entropy and down in gold (docs/feedback.md)",
    )


class PipelineConfig(_Section):
    experiment: str = Field("rlhf", description="MLflow experiment name")
    registered_model: str = Field("rlhf-policy", description="MLflow registered model for the policy")
    registered_reward_model: str = Field(
        "rlhf-reward",
        description="MLflow registered model for the reward model (each policy version's tag lineage.reward_model points to its version)",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for data, initialisation and sampling (0..2**32-1)")
    output_dir: str = Field("outputs", description="Local folder for checkpoints and data of each run")
    algorithm: Algorithm = Field(
        "ppo",
        description="How the policy is trained from SFT: ppo (ours, value head, adaptive KL), dpo (on the preference pairs), rloo or grpo (several samples per prompt, scored by the reward model); its section below holds its options (docs/alternatives.md)",
    )
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    rloo: RLOOConfig = RLOOConfig()
    grpo: GRPOConfig = GRPOConfig()
    eval: EvalConfig = EvalConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    baseline: BaselineConfig = BaselineConfig()
    promotion: PromotionConfig = PromotionConfig()
    monitor: MonitorConfig = MonitorConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    distributed: DistributedConfig = DistributedConfig()
    timeouts: TimeoutConfig = TimeoutConfig()

    @model_validator(mode="after")
    def _check_global_batches(self) -> PipelineConfig:
        n = self.distributed.num_processes
        if n > 1 and self.algorithm != "ppo":
            raise ValueError(
                f"algorithm={self.algorithm} trains in one process here (distributed.num_processes={n}): set "
                "distributed.num_processes=1, or algorithm=ppo for several processes"
            )
        for name, value in (
            ("sft.batch_size", self.sft.batch_size),
            ("reward.batch_size", self.reward.batch_size),
            ("ppo.batch_size", self.ppo.batch_size),
            ("ppo.mini_batch_size", self.ppo.mini_batch_size),
        ):
            if value % n:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of distributed.num_processes ({n}): batch sizes are "
                    "global and each process takes an equal share; change one of them"
                )
        return self


class ConfigError(ValueError):
    """A configuration the user must fix; the message says how."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict copy."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE: write e.g. --set ppo.steps=10")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Config from an optional YAML file plus overrides; errors name the bad key and the fix."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist: pass an existing YAML file to --config")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a YAML mapping of sections")
    return _validated(apply_overrides(raw, overrides or []))


def resolve_config(
    config: PipelineConfig, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """The config a pipeline run trains with: ``config`` as given, or ``config_file`` (a YAML
    preset such as configs/gpu.yaml) instead; ``overrides`` (``section.field=value``, as
    ``--set``) apply on top of either. A deployment names its preset this way rather than
    copying its values. Giving both a non-default ``config`` and a ``config_file`` is an error."""
    if config_file is None:
        return _validated(apply_overrides(config.model_dump(mode="json"), overrides or [])) if overrides else config
    if config != PipelineConfig():
        raise ConfigError(
            f"both config and config_file ({str(config_file)!r}) were given: pass one of them, and put "
            "changes to the file's values in overrides (e.g. ['distributed.num_processes=4'])"
        )
    return load_config(config_file, overrides)


def _validated(raw: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


def explain(error: ValidationError) -> str:
    """The first error of a config validation in one line: the key, what is wrong with the value, and the fix."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    where = ".".join(str(x) for x in loc) or "config"
    if first["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        valid = ", ".join(section.model_fields)
        return f"unknown option {where!r}: valid options here are {valid}. Fix: correct the spelling"
    msg = first["msg"].removeprefix("Value error, ")
    field = _field_at(loc)
    if field is None:  # a check across fields of a section: its message names the keys and the fix
        return f"bad configuration{'' if where == 'config' else f' in {where!r}'}: {msg}"
    default = field.default
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)
    ctx = first.get("ctx") or {}
    bounds = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    wanted = [f"{words} {ctx[k]}" for k, words in bounds.items() if k in ctx]
    if first["type"] == "finite_number":
        wanted = ["a finite number"]
    elif isinstance(first.get("input"), bool) and first["type"] == "value_error":
        wanted = ["a number"]
    requirement = " and ".join(wanted) or "a valid value"
    return (
        f"bad value {first.get('input')!r} for {where!r}: {msg}. Fix: set {where} to {requirement} "
        f"({field.description}; default {shown})"
    )


def _field_at(loc: tuple) -> Any:
    """The pydantic FieldInfo of a leaf option at loc, or None where loc ends at a section."""
    model: type[BaseModel] = PipelineConfig
    field = None
    for part in loc:
        if not isinstance(part, str) or model is None or part not in model.model_fields:
            return field if isinstance(part, int) else None  # list items: the list's field
        field = model.model_fields[part]
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return None if model is not None else field


def _section_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model
