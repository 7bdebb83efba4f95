"""What the TRL-trained policy stages (DPO, RLOO, GRPO) share: their MLflow run, checkpoints and metric names.

Each of tasks/dpo.py, tasks/rloo.py and tasks/grpo.py builds TRL's trainer for its algorithm
(our config section mapped onto TRL's config, never the reverse) and hands it to
``train_policy``, which

1. opens the stage's child run (params, dataset inputs, system metrics);
2. trains with two callbacks: ``TRLMetrics`` logs TRL's per-step metrics under our names
   (``METRIC_NAMES``: the same quantity has the same name as in PPO; docs/metrics.md), and
   ``PolicyCheckpoints`` logs a checkpoint every ``checkpoint_every`` steps and at the end,
   and probes it: ``objective/kl`` is measured there exactly as PPO measures it (batch mean of
   the sequence-level k1 KL(pi || pi_sft) on the policy's own samples, at the training
   temperature), on a fixed seeded sample of the training prompts;
3. returns the same handover as PPO (``PPOResult``): the final checkpoint and every checkpoint
   by step, step 0 being the SFT checkpoint itself, so evaluation, hacking flags, gates,
   registry and monitoring take it unchanged.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.reward import score_texts
from rlhf.builtin.task import task_knowledge
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.evaluation.sampling import sample_with_kl
from rlhf.infra.distributed import device
from rlhf.infra.hf_logging import MlflowStepLogger
from rlhf.infra.progress import TrainerProgress
from rlhf.infra.tracking import download, flatten, log_checkpoint, log_params, stage_run
from tasks.common import Checkpoint, PPOResult

PROBE_PROMPTS = 32
"""Training prompts (a fixed seeded sample) on which every checkpoint's objective/kl is measured."""
CHECKPOINT_DIR = "checkpoints"

METRIC_NAMES: dict[str, dict[str, str]] = {
    "dpo": {
        "loss": "dpo/loss",
        "rewards/chosen": "dpo/rewards_chosen",
        "rewards/rejected": "dpo/rewards_rejected",
        "rewards/accuracies": "dpo/rewards_accuracy",
        "rewards/margins": "dpo/rewards_margin",
        "logps/chosen": "dpo/logps_chosen",
        "logps/rejected": "dpo/logps_rejected",
        "logits/chosen": "dpo/logits_chosen",
        "logits/rejected": "dpo/logits_rejected",
        "entropy": "policy/entropy_avg",
        "grad_norm": "policy/grad_norm",
    },
    "rloo": {
        "loss": "loss/policy_avg",
        "reward": "objective/scores",
        "rewards/gold/mean": "objective/gold_scores",
        "kl": "objective/kl_token_k1",
        "entropy": "policy/entropy_avg",
        "clip_ratio/region_mean": "policy/clipfrac_avg",
        "grad_norm": "policy/grad_norm",
        "completions/mean_length": "response/length_mean",
    },
    "grpo": {
        "loss": "loss/policy_avg",
        "reward": "objective/scores",
        "rewards/gold/mean": "objective/gold_scores",
        "kl": "objective/kl_token_k3",
        "entropy": "policy/entropy_avg",
        "clip_ratio/region_mean": "policy/clipfrac_avg",
        "grad_norm": "policy/grad_norm",
        "completions/mean_length": "response/length_mean",
    },
}
"""TRL's log names -> ours, per algorithm; any other numeric entry is logged as ``<algorithm>/<TRL name>``
(``/`` kept). ``completions/clipped_ratio`` also gives ``response/eos_rate`` = 1 - it."""


OUR_NAMESPACES = frozenset({"objective", "policy", "loss", "response", "dpo"})
"""Namespaces of the names METRIC_NAMES maps to (logged as they are, not under the algorithm's prefix)."""


class TRLMetrics(MlflowStepLogger):
    """TRL's per-step logs under our names (``METRIC_NAMES``), at the trainer's global step."""

    def __init__(self, algorithm: str):
        super().__init__(algorithm)
        self.names = METRIC_NAMES[algorithm]

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "completions/clipped_ratio" in logs:  # TRL's share of responses cut at max length: PPO's eos_rate
            logs["response/eos_rate"] = 1.0 - logs["completions/clipped_ratio"]
        renamed = {self.names.get(key, key): value for key, value in logs.items()}
        ours = {key: value for key, value in renamed.items() if "/" in key and key.split("/")[0] in OUR_NAMESPACES}
        if ours and state.is_world_process_zero:
            mlflow.log_metrics({k: float(v) for k, v in ours.items()}, step=state.global_step)
        # everything else under the algorithm's namespace (MlflowStepLogger adds the prefix)
        super().on_log(args, state, control, {k: v for k, v in renamed.items() if k not in ours}, **kwargs)


@dataclass
class Probe:
    """What a checkpoint is measured with: the frozen reference, the reward model, the gold judge (if any)."""

    ref: PreTrainedModel
    reward_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    max_new_tokens: int
    temperature: float
    seed: int
    gold: Callable[[str, str], float] | None

    def measure(self, policy: PreTrainedModel) -> dict[str, float]:
        """objective/kl, objective/scores and (with a gold judge) objective/gold_scores of the policy's samples.

        Seeded and on a forked RNG: every checkpoint meets the same random numbers, and training's
        own random stream is left where it was.
        """
        was_training = policy.training
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            samples = sample_with_kl(
                policy, self.ref, self.tokenizer, self.prompts, self.max_new_tokens, self.temperature
            )
        policy.train(was_training)
        n = len(self.prompts)
        scores = score_texts(self.reward_model, self.tokenizer, self.prompts, samples.responses)
        out = {"objective/kl": sum(samples.kl) / n, "objective/scores": scores.mean().item()}
        if self.gold is not None:
            out["objective/gold_scores"] = sum(self.gold(p, r) for p, r in zip(self.prompts, samples.responses)) / n
        return out


class PolicyCheckpoints(TrainerCallback):
    """Log the policy every ``every`` steps and at the end as ``checkpoints/step_NNNNN`` (Hugging Face layout),
    each with its probe measurements (``objective/kl``; with ``log_scores`` also ``objective/scores`` and
    ``objective/gold_scores``, for DPO, whose training logs no reward) at that step, linked to it."""

    def __init__(self, every: int, tokenizer: PreTrainedTokenizerBase, probe: Probe, scratch: Path, log_scores: bool):
        self.every = every
        self.tokenizer = tokenizer
        self.probe = probe
        self.scratch = scratch
        self.log_scores = log_scores
        self.checkpoints: dict[int, str] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step >= state.max_steps:
            self.save(model, step)

    def save(self, model: PreTrainedModel, step: int) -> None:
        if step in self.checkpoints:
            return
        folder = self.scratch / f"step_{step:05d}"
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        measured = self.probe.measure(model)
        metrics = measured if self.log_scores else {"objective/kl": measured["objective/kl"]}
        self.checkpoints[step] = log_checkpoint(folder, f"{CHECKPOINT_DIR}/step_{step:05d}", metrics, step)
        shutil.rmtree(folder)


@dataclass
class Models:
    """The SFT policy (trained), its frozen copy (the reference), the reward model and the tokenizer, loaded
    from the handed-over checkpoints; ``sft_dir`` is the local SFT folder, alive while the stage runs."""

    policy: PreTrainedModel
    ref: PreTrainedModel
    reward_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    sft_dir: str


def trl_policy_args(section: Any, seed: int, output_dir: str, scheduler: str) -> dict[str, Any]:
    """The TrainingArguments every TRL policy trainer takes, mapped from our section of the config."""
    on_gpu = device().type == "cuda"
    return {
        "output_dir": output_dir,
        "max_steps": section.steps,
        "per_device_train_batch_size": section.batch_size,
        "learning_rate": section.learning_rate,
        "lr_scheduler_type": scheduler,
        "max_grad_norm": section.max_grad_norm,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": False,  # keeps the Trainer's ProgressCallback (which the stage swaps for TrainerProgress), not the log printer
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "activation_checkpointing": False,  # TRL turns it on by default; the models here fit without
        "use_cpu": not on_gpu,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
    }


def sampled_policy_args(section: Any, seed: int, output_dir: str, reward_weights: list[float]) -> dict[str, Any]:
    """trl_policy_args plus what RLOOConfig and GRPOConfig share, mapped from our rloo/grpo section."""
    return {
        **trl_policy_args(section, seed, output_dir, "constant"),
        "num_generations": section.num_generations,
        "max_completion_length": section.max_new_tokens,
        "temperature": section.temperature,
        "beta": section.beta,
        "num_iterations": section.epochs,
        "epsilon": section.clip_range,
        "reward_weights": reward_weights,
        "disable_dropout": True,  # log-probs of sampling and of the update must agree
    }


def train_policy(
    algorithm: str,
    cfg: PipelineConfig,
    sft: Checkpoint,
    reward: Checkpoint,
    inputs: dict[str, str],
    parent_run_id: str,
    build: Callable[[Models, str, list[TrainerCallback]], Any],
    probe_temperature: float,
    probe_max_new_tokens: int,
) -> PPOResult:
    """Run one TRL policy stage (see the module docstring). ``build(models, output_dir, callbacks)`` returns the
    TRL trainer; ``inputs`` (split -> file) are the stage's data, ``inputs['prompts']`` the probe's prompts."""
    section = getattr(cfg, algorithm)
    with (
        stage_run(
            parent_run_id, algorithm, flatten({algorithm: section.model_dump()}), inputs, system_metrics=True
        ) as run,
        tempfile.TemporaryDirectory(prefix=f"rlhf-{algorithm}-") as scratch,
    ):
        log_params({"algorithm": algorithm, "sft_run_id": sft.run_id, "reward_run_id": reward.run_id})
        models = load_models(cfg, sft, reward, Path(scratch))
        task = task_knowledge(cfg.data)
        prompts = list(load_split(inputs["prompts"])["prompt"])
        probe = Probe(
            models.ref,
            models.reward_model,
            models.tokenizer,
            random.Random(cfg.seed).sample(prompts, min(PROBE_PROMPTS, len(prompts))),
            probe_max_new_tokens,
            probe_temperature,
            cfg.seed,
            task.gold_score if task else None,
        )
        saver = PolicyCheckpoints(section.checkpoint_every, models.tokenizer, probe, Path(scratch), algorithm == "dpo")
        torch.manual_seed(cfg.seed)
        trainer = build(
            models, str(Path(scratch) / "trainer"), [TRLMetrics(algorithm), saver, TrainerProgress(algorithm)]
        )
        trainer.remove_callback(ProgressCallback)  # TrainerProgress replaces its bar and log prints
        trainer.train()
        saver.save(trainer.model, trainer.state.global_step)  # the end, should the last step not be a multiple
        checkpoints = {0: sft.uri, **saver.checkpoints}  # step 0: the SFT policy the stage started from
        final = checkpoints[max(checkpoints)]
        mlflow.set_tags({f"{algorithm}.final_checkpoint": final, "rlhf.algorithm": algorithm})
        return PPOResult(Checkpoint(run.info.run_id, final), checkpoints)


def load_models(cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, scratch: Path) -> Models:
    """The policy and reference from the SFT checkpoint, the reward model; on the training device."""
    trust = cfg.model.trust_remote_code
    sft_dir, rm_dir = str(download(sft.uri, scratch)), str(download(reward.uri, scratch))
    tokenizer = load_tokenizer(sft_dir, trust)
    here = device()
    policy = load_causal_lm(sft_dir, trust_remote_code=trust)
    ref = load_causal_lm(sft_dir, trust_remote_code=trust).to(here).eval()
    reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id, trust_remote_code=trust).to(here).eval()
    for frozen in (ref, reward_model):
        frozen.requires_grad_(False)
    return Models(policy, ref, reward_model, tokenizer, sft_dir)


def reward_functions(cfg: PipelineConfig, models: Models, missing_eos_penalty: float) -> tuple[list, list[float]]:
    """(reward_funcs, reward_weights) for RLOO and GRPO: our reward model, scored as PPO and evaluation score
    (prompt + response + EOS, ``models.reward.score_texts``) less ``missing_eos_penalty`` for a response that
    never ended; with the task's gold judge as a second function of weight 0, so TRL logs its mean
    (``objective/gold_scores``) without training on it."""
    tokenizer, eos = models.tokenizer, models.tokenizer.eos_token_id

    def reward_model(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any):
        scores = score_texts(models.reward_model, tokenizer, prompts, completions)
        ended = torch.tensor([bool(ids) and ids[-1] == eos for ids in completion_ids])
        return (scores - missing_eos_penalty * (~ended).float()).tolist()

    task = task_knowledge(cfg.data)
    if task is None or task.gold_score is None:
        return [reward_model], [1.0]
    gold_score = task.gold_score

    def gold(prompts: list[str], completions: list[str], **_: Any):
        return [gold_score(p, c) for p, c in zip(prompts, completions)]

    return [reward_model, gold], [1.0, 0.0]
