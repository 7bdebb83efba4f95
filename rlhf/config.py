"""Pipeline configuration: frozen pydantic models whose defaults run the demo on a CPU.

Every field has a one-line description (the Prefect UI renders them as a form).
``load_config`` reads a YAML file and applies ``section.field=value`` overrides;
unknown keys raise with the list of valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.drift.config import BaselineConfig


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    source: str = Field("builtin", description="'builtin' for the embedded data set, or a folder holding sft.jsonl, preferences.jsonl, preferences_heldout.jsonl, prompts.jsonl, heldout_prompts.jsonl (JSON/JSONL/CSV/Parquet; per-file paths below override)")
    sft_path: str | None = Field(None, description="SFT demonstrations (prompt, completion); overrides the file in `source`")
    preferences_path: str | None = Field(None, description="Preference pairs (prompt, chosen, rejected) for reward-model training")
    preferences_heldout_path: str | None = Field(None, description="Held-out preference pairs for reward-model accuracy")
    prompts_path: str | None = Field(None, description="PPO training prompts (prompt)")
    heldout_prompts_path: str | None = Field(None, description="Held-out evaluation prompts (prompt)")
    max_heldout_prompts: int = Field(128, ge=1, description="Evaluation uses at most this many held-out prompts")


class ValidationConfig(_Section):
    min_rows: int = Field(8, ge=1, description="Fewest rows a training split may have")
    max_rows: int = Field(5_000_000, ge=1, description="Most rows a split may have")
    min_chars: int = Field(1, ge=0, description="Shortest prompt/response text in characters")
    max_chars: int = Field(8000, ge=1, description="Longest prompt/response text in characters")
    max_tokens: int = Field(2048, ge=1, description="Longest prompt/response text in tokens of the base model's tokenizer (checked only when the stage is given the tokenizer)")
    pii_policy: Literal["fail", "redact"] = Field("fail", description="On e-mail, phone or card numbers in the data: fail the run, or redact them and report")
    pii_kinds: tuple[Literal["email", "phone", "card"], ...] = Field(("email", "phone", "card"), description="PII patterns to look for: e-mail addresses, phone numbers, payment card numbers (Luhn-checked)")
    max_duplicate_fraction: float = Field(0.01, ge=0, le=1, description="Largest share of SFT demonstrations or preference pairs that repeat an earlier row (a pair with chosen/rejected swapped counts as a repeat); PPO prompts may repeat freely")
    max_leaked_fraction: float = Field(0.0, ge=0, le=1, description="Largest share of a training split (sft, preferences, prompts) whose prompts also occur in a held-out split (heldout_prompts, preferences_heldout)")
    max_row_bytes: int = Field(1_000_000, ge=1024, description="Longest line/row of a data file in bytes; a longer one is rejected before parsing (usually a broken export)")
    max_file_bytes: int = Field(2_000_000_000, ge=1024, description="Largest data file in bytes; a bigger one is rejected before it is read (split it, or raise this)")
    max_examples: int = Field(3, ge=1, description="Example rows quoted per failed check in error messages")

    @model_validator(mode="after")
    def _check_bounds(self) -> "ValidationConfig":
        for low, high in (("min_rows", "max_rows"), ("min_chars", "max_chars")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"validation.{low} ({getattr(self, low)}) must not exceed validation.{high} "
                    f"({getattr(self, high)}): change one of them"
                )
        return self


class ModelConfig(_Section):
    base_model: str = Field("builtin:tiny-gpt2", description="Hugging Face name or local path of the base causal LM; 'builtin:tiny-gpt2' or 'builtin:tiny-llama' for the embedded default")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a Hub checkpoint (off unless you trust it)")
    lora_r: int = Field(0, ge=0, description="LoRA rank for SFT and reward-model training (peft); 0 trains every weight. Each stage merges its adapters into the checkpoint it logs, so later stages load a plain model")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch")
    lora_target_modules: str = Field("all-linear", description="Modules that get adapters: 'all-linear', or comma-separated module names (e.g. 'q_proj,v_proj' for Llama/Qwen, 'c_attn' for GPT-2)")


class SFTConfig(_Section):
    max_steps: int = Field(150, ge=1, description="Optimizer steps of supervised fine-tuning")
    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step")
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear decay)")
    max_length: int = Field(128, ge=8, description="Longest prompt+completion in tokens; longer rows are truncated")


class RewardConfig(_Section):
    max_steps: int = Field(250, ge=1, description="Optimizer steps of reward-model training (Bradley-Terry loss)")
    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (linear decay)")
    max_length: int = Field(128, ge=8, description="Longest prompt+response in tokens; longer pairs are dropped")


class PPOConfig(_Section):
    steps: int = Field(60, ge=1, description="PPO iterations (each: generate, score, update)")
    batch_size: int = Field(32, ge=1, description="Episodes (prompt + sampled response) per iteration")
    mini_batch_size: int = Field(16, ge=1, description="Episodes per gradient step; must divide batch_size")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each batch of episodes")
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use the same temperature")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate for policy and value head")
    kl_control: Literal["fixed", "adaptive"] = Field("adaptive", description="Fixed KL coefficient, or the adaptive controller of Ziegler et al. 2019")
    kl_coef: float = Field(0.1, ge=0, description="Initial KL penalty coefficient beta")
    kl_target: float = Field(6.0, gt=0, description="Target sequence-level KL(pi || pi_ref) in nats for the adaptive controller")
    kl_horizon: int = Field(1000, ge=1, description="Adaptive controller horizon in episodes; at least batch_size, so beta moves at most 20% per iteration")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator in the reward penalty (Schulman 2020); objective/kl and the controller always use k1")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip range")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient")
    ent_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip")
    whiten_advantages: bool = Field(True, description="Normalise advantages per batch")
    normalize_reward: bool = Field(True, description="Normalise reward-model scores with running mean/std")
    reward_clip: float = Field(5.0, gt=0, description="Clip normalised scores to [-reward_clip, reward_clip]")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the score of a response that never ends")
    ratio_skip_threshold: float = Field(10.0, gt=1, description="Skip a minibatch (and raise a `ratio_explosion` alert) when its mean probability ratio pi/pi_old over response tokens exceeds this (TRL's ratio_threshold)")
    kl_budget: float | None = Field(12.0, gt=0, description="Largest objective/kl (nats, batch mean) the run may reach; above it `kl_budget_action` happens; None: no budget. Keep it well above kl_target (e.g. 2x): one batch's KL is noisy")
    kl_budget_action: Literal["warn", "stop", "rollback"] = Field("warn", description="On exceeding kl_budget: warn and go on; stop (final = current policy); or roll back to the best checkpoint within budget and stop")
    resume_from: str | None = Field(None, description="Resume from an earlier PPO run: its MLflow run id (latest complete checkpoint) or a checkpoint URI (.../checkpoints/step_XXXXX); continues to `steps`, logging at the following step numbers")
    auto_resume: bool = Field(True, description="Without resume_from: continue an interrupted PPO run with the same inputs (killed, failed, or a lost tracking connection) from its latest good checkpoint instead of starting afresh")
    checkpoint_every: int = Field(20, ge=1, description="Log a full checkpoint every N iterations (and at step 0 and the end)")
    sample_every: int = Field(20, ge=1, description="Log a table of sample responses every N iterations")

    @model_validator(mode="after")
    def _check_batches(self) -> "PPOConfig":
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


class EvalConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, description="Longest response in tokens")
    samples_per_prompt: int = Field(2, ge=1, description="Responses sampled per held-out prompt")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (same as PPO's, so KL is comparable)")


class DistributedConfig(_Section):
    num_processes: int = Field(1, ge=1, description="Training processes for the SFT, reward-model and PPO stages: 1 trains in the flow's own process; more launches them on this machine with torchrun (DDP: gloo on CPUs, NCCL with one GPU per process). Batch sizes stay global and must be multiples of it")
    accelerate_config: str | None = Field(None, description="An `accelerate config` file for the SFT and reward-model stages (FSDP, DeepSpeed, mixed precision); they are then started with `accelerate launch --config_file`. PPO's own loop always runs DDP")


class PipelineConfig(_Section):
    experiment: str = Field("rlhf", description="MLflow experiment name")
    registered_model: str = Field("rlhf-policy", description="MLflow registered model for the policy")
    seed: int = Field(0, description="Seed for data, initialisation and sampling")
    output_dir: str = Field("outputs", description="Local folder for checkpoints and data of each run")
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    baseline: BaselineConfig = BaselineConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _check_global_batches(self) -> "PipelineConfig":
        n = self.distributed.num_processes
        for name, value in (("sft.batch_size", self.sft.batch_size), ("reward.batch_size", self.reward.batch_size),
                            ("ppo.batch_size", self.ppo.batch_size), ("ppo.mini_batch_size", self.ppo.mini_batch_size)):
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
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            section = _section_at(first["loc"][:-1])
            valid = ", ".join(section.model_fields)
            raise ConfigError(f"unknown option {where!r}: valid options here are {valid}") from None
        raise ConfigError(f"bad value for {where!r}: {first['msg']}") from None


def _section_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model
