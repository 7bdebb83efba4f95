"""Several training processes (DDP): who this process is, its shard of a batch, gathering the rest.

A stage with ``distributed.num_processes > 1`` runs in that many processes started by
``torchrun`` or ``accelerate launch`` (tasks/launch.py). They find each other through the
launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``);
``init_process_group`` joins them through accelerate's ``PartialState`` (gloo on CPUs,
NCCL on GPUs). In a single process every helper here is the identity, so the
single-process path runs exactly the code it always did.

Torch only (torch.distributed and accelerate's state), no MLflow or Prefect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of training processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's index among the training processes (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0: the one process that logs to MLflow and writes checkpoints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the launcher's environment names more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> torch.device:
    """Join the launcher's process group (through accelerate); this process's device."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.device


def device() -> torch.device:
    """This process's device: its own GPU under a launcher, else cuda:0 or the CPU."""
    if is_distributed() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_divisible(name: str, value: int, processes: int) -> None:
    """A global batch splits evenly over the processes, or the error says what to change."""
    if value % processes:
        raise ValueError(
            f"{name} ({value}) must be a multiple of distributed.num_processes ({processes}): "
            "batch sizes are global and each process takes an equal share; change one of them"
        )


@dataclass(frozen=True)
class Shard:
    """This process's equal share of a global batch of ``size`` rows."""

    rank: int
    world: int
    size: int

    @classmethod
    def of(cls, size: int, name: str = "batch") -> Shard:
        """The current process's shard of a global batch of ``size`` rows."""
        world = world_size()
        check_divisible(name, size, world)
        return cls(rank(), world, size)

    @property
    def rows(self) -> slice:
        """The slice of the global batch this process owns; every row on a single process."""
        if self.world == 1:
            return slice(None)
        local = self.size // self.world
        return slice(self.rank * local, (self.rank + 1) * local)


def all_gather_rows(tensor: torch.Tensor, pad_value: float | int = 0, left: bool = False) -> torch.Tensor:
    """Every process's (b, T_r, ...) rows concatenated in rank order: (W*b, max T, ...).

    Dim 1 may differ between processes (prompts and responses of different lengths);
    shorter ones are padded with ``pad_value`` on the right (or the left) first.
    """
    if not is_distributed():
        return tensor
    if tensor.dtype == torch.bool:  # gloo gathers no bools
        return all_gather_rows(tensor.to(torch.uint8), int(bool(pad_value)), left).bool()
    if tensor.dim() >= 2:
        length = torch.tensor([tensor.shape[1]], device=tensor.device)
        lengths = [torch.zeros_like(length) for _ in range(world_size())]
        dist.all_gather(lengths, length)
        longest = int(max(x.item() for x in lengths))
        missing = longest - tensor.shape[1]
        if missing:
            pad = torch.full(
                (tensor.shape[0], missing, *tensor.shape[2:]), pad_value, dtype=tensor.dtype, device=tensor.device
            )
            tensor = torch.cat([pad, tensor] if left else [tensor, pad], dim=1)
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(values: list[float], device_: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums of ``values`` over the processes (the values themselves on one process)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device_)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    """Wait for every process (no-op on one process)."""
    if is_distributed():
        dist.barrier()
