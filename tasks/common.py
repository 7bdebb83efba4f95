"""What the stages hand each other: references, never live objects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Checkpoint:
    """A stage's logged model: the child run that made it and its artifact URI."""

    run_id: str
    uri: str


def trainer_precision_args() -> dict[str, bool]:
    """Trainer device/precision flags: bf16 on a GPU that has it, fp32 on the CPU."""
    import torch

    on_gpu = torch.cuda.is_available()
    return {"use_cpu": not on_gpu, "bf16": on_gpu and torch.cuda.is_bf16_supported()}
