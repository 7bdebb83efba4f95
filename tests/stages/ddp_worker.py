"""The SFT, reward-model and PPO stages in one group of processes, for tests/stages/test_distributed.py.

Run in the test's own process (one process) and under torchrun (two, gloo): each stage
goes through ``rlhf.cli.run_stage``, the code every launched process runs, so rank 0
logs into the stage runs the test opened and PPO opens its own. One thing differs from
production, and only so both runs see the same episodes: PPO's sampling
(``replay_generate``) draws the whole global batch on every process from one seed per
step, instead of each process sampling its own shard with its own seed.

    python -m torch.distributed.run --nproc_per_node 2 tests/stages/ddp_worker.py SPEC RESULT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from models.generation import Rollout, sample
from rlhf.cli import run_stage
from rlhf.ppo.trainer import PPOTrainer


def replay_generate(self: PPOTrainer, prompts: list[str]) -> Rollout:
    """The whole batch, sampled from a seed of the step alone: the same on every process and world size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 + self.step_count)
        return sample(self.policy.lm, self.tokenizer, prompts, self.cfg.max_new_tokens, self.cfg.temperature)


def run_all(spec: dict[str, Any]) -> dict[str, Any]:
    """SFT, reward model and PPO (spec: config, tracking_uri, and per stage run_id and args); rank 0's results."""
    out = {}
    for stage in ("sft", "reward", "ppo"):
        if stage == "reward":
            torch.manual_seed(spec["config"]["seed"])  # train_reward does this in a launched process
        out[stage] = run_stage(
            stage,
            {
                "config": spec["config"],
                "tracking_uri": spec["tracking_uri"],
                **spec[stage],
            },
        )
    return out


def main(spec_path: str, result_path: str) -> None:
    import torch.distributed as dist

    from rlhf.infra import distributed
    from rlhf.infra.env import quiet_defaults

    quiet_defaults()
    distributed.init_process_group()
    PPOTrainer.generate = replay_generate  # type: ignore[method-assign]
    out = run_all(json.loads(Path(spec_path).read_text()))
    if distributed.is_main_process():
        Path(result_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
