"""RLOO stage: REINFORCE Leave-One-Out against our reward model, with TRL's RLOOTrainer.

Each prompt gets ``rloo.num_generations`` sampled responses, scored by the reward model (as PPO
scores them, less ``missing_eos_penalty`` for a response that never ended) minus
``beta`` times its sequence-level k1 KL to the SFT reference; a response's advantage is its
reward minus the mean of its siblings' (Ahmadian et al. 2024). No value head. The stage logs
its checkpoints and hands over a ``PPOResult`` like PPO's (tasks/policy.py).
"""

from __future__ import annotations

from prefect import task
from trl import RLOOConfig as TRLRLOOConfig
from trl import RLOOTrainer

from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from tasks.caching import cached_stage
from tasks.common import RLOO, Checkpoint, PPOResult
from tasks.policy import Models, reward_functions, sampled_policy_args, train_policy


def run_rloo(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """RLOO from the SFT checkpoint on the training prompts, rewarded by the reward model."""
    section = cfg.rloo

    def build(models: Models, output_dir: str, callbacks: list) -> RLOOTrainer:
        funcs, weights = reward_functions(cfg, models, section.missing_eos_penalty)
        args = TRLRLOOConfig(
            **sampled_policy_args(section, cfg.seed, output_dir, weights),
        )
        return RLOOTrainer(
            model=models.policy,
            reward_funcs=funcs,
            args=args,
            train_dataset=load_split(prompts_path),
            processing_class=models.tokenizer,
            callbacks=callbacks,
        )

    inputs = {"prompts": prompts_path}
    return train_policy(
        RLOO, cfg, sft, reward, inputs, parent_run_id, build, section.temperature, section.max_new_tokens
    )


@task(**cached_stage(RLOO))
def rloo_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, prompts_path: str, parent_run_id: str
) -> PPOResult:
    """RLOO against the reward model, from the SFT policy."""
    return run_rloo(cfg, sft, reward, prompts_path, parent_run_id)
