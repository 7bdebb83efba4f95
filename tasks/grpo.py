"""GRPO stage: Group Relative Policy Optimization against our reward model, with TRL's GRPOTrainer.

Each prompt gets ``grpo.num_generations`` sampled responses, scored by the reward model (as PPO
scores them, less ``missing_eos_penalty`` for a response that never ended); a response's
advantage is its reward minus its group's mean, divided by the group's std
(``scale_rewards``; Shao et al. 2024). The KL to the SFT reference is not in the reward but a
per-token k3 term of the loss, weighted by ``beta``. No value head. The stage logs its
checkpoints and hands over a ``PPOResult`` like PPO's (tasks/policy.py).
"""

from __future__ import annotations

from prefect import task
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer

from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from tasks.caching import cached_stage
from tasks.common import GRPO, Checkpoint, PPOResult
from tasks.policy import Models, reward_functions, sampled_policy_args, train_policy


def run_grpo(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """GRPO from the SFT checkpoint on the training prompts, rewarded by the reward model."""
    section = cfg.grpo

    def build(models: Models, output_dir: str, callbacks: list) -> GRPOTrainer:
        funcs, weights = reward_functions(cfg, models, section.missing_eos_penalty)
        args = TRLGRPOConfig(
            **sampled_policy_args(section, cfg.seed, output_dir, weights),
            loss_type=section.loss_type,
            scale_rewards=section.scale_rewards,
        )
        return GRPOTrainer(
            model=models.policy,
            reward_funcs=funcs,
            args=args,
            train_dataset=load_split(prompts_path),
            processing_class=models.tokenizer,
            callbacks=callbacks,
        )

    inputs = {"prompts": prompts_path}
    return train_policy(
        GRPO, cfg, sft, reward, inputs, parent_run_id, build, section.temperature, section.max_new_tokens
    )


@task(**cached_stage(GRPO))
def grpo_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """GRPO against the reward model, from the SFT policy."""
    return run_grpo(cfg, sft, reward, prompts_path, parent_run_id)
