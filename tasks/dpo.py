"""DPO stage: train the SFT policy on the preference pairs directly, with TRL's DPOTrainer.

Direct Preference Optimization (Rafailov et al. 2023) maximises the same objective as PPO,
E[r] - beta * KL(pi || pi_sft), in closed form: the Bradley-Terry likelihood of the preference
pairs under the implicit reward ``beta * log(pi(y|x) / pi_sft(y|x))``. No reward model and no
sampling in the loop; the reward model is used only to probe each checkpoint
(``objective/scores``) beside the KL and the gold judge. The stage logs its checkpoints and
hands over a ``PPOResult`` like PPO's (tasks/policy.py), so everything downstream is unchanged.
"""

from __future__ import annotations

from prefect import task
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from tasks.caching import cached_stage
from tasks.common import DPO, Checkpoint, PPOResult
from tasks.policy import Models, train_policy, trl_policy_args


def run_dpo(
    cfg: PipelineConfig,
    sft: Checkpoint,
    reward: Checkpoint,
    preferences_path: str,
    prompts_path: str,
    parent_run_id: str,
) -> PPOResult:
    """DPO from the SFT checkpoint on (prompt, chosen, rejected) rows; every checkpoint probed on the prompts."""
    section = cfg.dpo

    def build(models: Models, output_dir: str, callbacks: list) -> DPOTrainer:
        args = TRLDPOConfig(
            **trl_policy_args(section, cfg.seed, output_dir, "linear"),
            warmup_steps=max(1, section.steps // 20),
            beta=section.beta,
            loss_type=[section.loss],
            label_smoothing=section.label_smoothing,
            max_length=section.max_length,
        )
        return DPOTrainer(
            model=models.policy,
            ref_model=models.ref,
            args=args,
            train_dataset=load_split(preferences_path),
            processing_class=models.tokenizer,
            callbacks=callbacks,
        )

    inputs = {"preferences": preferences_path, "prompts": prompts_path}
    return train_policy(
        DPO, cfg, sft, reward, inputs, parent_run_id, build, cfg.eval.temperature, cfg.eval.max_new_tokens
    )


@task(**cached_stage(DPO))
def dpo_task(
    cfg: PipelineConfig,
    sft: Checkpoint,
    reward: Checkpoint,
    preferences_path: str,
    prompts_path: str,
    parent_run_id: str,
) -> PPOResult:
    """DPO on the preference pairs, from the SFT policy."""
    return run_dpo(cfg, sft, reward, preferences_path, prompts_path, parent_run_id)
