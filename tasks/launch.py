"""Run one training stage in several processes, and the entry each of those processes runs.

The flow stays one process. A training stage with ``distributed.num_processes > 1``
opens its MLflow stage run as usual, then ``launch_stage`` starts the processes on this
machine and waits:

- ``torchrun`` (``python -m torch.distributed.run``): DDP, gloo on CPUs, NCCL with one
  GPU per process; always for PPO, and for SFT/reward without an accelerate config;
- ``accelerate launch --config_file F`` for SFT/reward when ``distributed.accelerate_config``
  names one (FSDP, DeepSpeed, mixed precision: whatever ``accelerate config`` wrote).

Each process runs ``rlhf train-stage STAGE SPEC RESULT`` (rlhf/cli.py, the top layer,
which alone may import the stages this module launches): it joins the process group, and
rank 0 alone logs to MLflow (SFT and reward: into the stage run the flow opened, by id;
PPO: the stage run it opens itself), writes checkpoints, and writes the stage's result
(JSON) for the flow to read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import mlflow

from rlhf.config import PipelineConfig
from tasks.common import TRAINING_STAGES

REPO = Path(__file__).resolve().parents[1]
OUTPUT_TAIL_LINES = 60


class StageLaunchFailed(RuntimeError):
    """The stage's processes exited with an error; the message holds their last output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the processes' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(stage: str, cfg: PipelineConfig, spec: Path, result: Path) -> list[str]:
    """The command that starts ``cfg.distributed.num_processes`` processes running the stage."""
    n = str(cfg.distributed.num_processes)
    entry = ["-m", "rlhf.cli", "train-stage", stage, str(spec), str(result)]
    accelerate_config = cfg.distributed.accelerate_config
    if accelerate_config and stage != "ppo":
        if not Path(accelerate_config).is_file():
            raise ValueError(
                f"distributed.accelerate_config {accelerate_config!r} is not a file: write one with "
                "`accelerate config --config_file PATH` or set it to null for plain DDP"
            )
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "--num_processes",
            n,
            "--main_process_port",
            str(free_port()),
            *entry,
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        n,
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *entry,
    ]


def stop_launcher(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the launcher (torchrun, and accelerate through it, stops its workers on it),
    SIGKILL after ``grace_s`` seconds if it is still there.

    The launcher stays in the flow's process group, so a worker that kills the whole group
    (a cancelled flow run) still takes every training process with it."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch_stage(stage: str, cfg: PipelineConfig, run_id: str | None, args: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` in several processes; rank 0's result (JSON).

    With ``run_id``, rank 0 logs into that (already open) MLflow run; without, the stage
    function opens its own (PPO does: its run, resume and checkpoints live in tasks/ppo.py).

    The processes' output goes to this process's stdout as it comes; on failure the
    last lines are in the error.
    """
    if stage not in TRAINING_STAGES:
        raise ValueError(f"unknown training stage {stage!r}: use one of {', '.join(TRAINING_STAGES)}")
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage}-launch-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "config": cfg.model_dump(mode="json"),
                    "run_id": run_id,
                    "tracking_uri": mlflow.get_tracking_uri(),
                    "args": args,
                }
            )
        )
        env = dict(os.environ)
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        cmd = launch_command(stage, cfg, spec, result)
        tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            try:
                for line in proc.stdout or ():
                    sys.stdout.write(line)
                    tail.append(line)
            except BaseException:  # the stage's time limit, Ctrl-C, a cancellation: do not wait on a hung rendezvous
                stop_launcher(proc)
                raise
        if proc.returncode != 0 or not result.exists():
            raise StageLaunchFailed(
                f"{stage} stage in {cfg.distributed.num_processes} processes failed (exit {proc.returncode}) "
                f"running: {' '.join(cmd)}\nlast output:\n{''.join(tail)}\n"
                "Fix the error above, or set distributed.num_processes=1 to train in one process"
            )
        return json.loads(result.read_text())
