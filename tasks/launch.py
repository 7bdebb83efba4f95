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

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import mlflow
import psutil

from rlhf.config import PipelineConfig
from tasks.common import TRAINING_STAGES

REPO = Path(__file__).resolve().parents[1]
OUTPUT_TAIL_LINES = 60
POLL_S = 0.2
"""How often the flow checks on the launched processes (and so how late a time limit may act)."""
OUTPUT_DRAIN_S = 10.0
"""How long the flow waits for the rest of the output once the launcher has exited."""


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


def stop_launcher(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the launcher and every process under it: SIGTERM to each, SIGKILL after ``grace_s``
    seconds to whatever is still running.

    Signalled one by one, not through the launcher's process group: torchrun starts each worker
    in a session of its own, so a group signal would miss them, and a worker that hangs in a
    collective (a rendezvous that never completes) would outlive its launcher. The tree is read
    before any signal: a worker whose launcher has gone is re-parented and no longer found.
    """
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # the launcher is gone, and with it the way to its workers
        workers = []
    proc.terminate()
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.terminate()
    _wait_until_stopped(proc, workers, grace_s)
    for worker in filter(_running, workers):
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    if proc.poll() is None:
        proc.kill()
    _wait_until_stopped(proc, workers, grace_s)  # a killed process still has to be scheduled to exit
    proc.wait()


def _wait_until_stopped(proc: subprocess.Popen, workers: list[psutil.Process], timeout_s: float) -> None:
    """Wait, at most ``timeout_s`` seconds, for the launcher and its workers to exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc.poll() is None or any(map(_running, workers))):
        time.sleep(POLL_S)


def _running(process: psutil.Process) -> bool:
    """Whether a process still runs (an exited one may stay a zombie until its new parent reaps it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _copy_output(stream: Any, tail: deque[str]) -> None:
    """Copy the processes' output to this process's stdout as it comes, keeping the last lines."""
    for line in stream:
        sys.stdout.write(line)
        tail.append(line)


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
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=_copy_output, args=(proc.stdout, tail), name=f"{stage}-output", daemon=True)
        reader.start()
        try:
            # Wait in short naps, never in one blocking read or wait: off the main thread (or
            # where another SIGALRM handler is installed) Prefect enforces the stage's time limit
            # by raising in this thread between two Python instructions, which a blocking call
            # would hold off until the processes print or exit, possibly never.
            while proc.poll() is None:
                time.sleep(POLL_S)
        except BaseException:  # the stage's time limit, Ctrl-C, a cancellation: stop every process
            stop_launcher(proc)
            raise
        finally:
            reader.join(timeout=OUTPUT_DRAIN_S)
            if not reader.is_alive():  # else a process that outlived its launcher holds the pipe open
                proc.stdout.close()
        if proc.returncode != 0 or not result.exists():
            raise StageLaunchFailed(
                f"{stage} stage in {cfg.distributed.num_processes} processes failed (exit {proc.returncode}) "
                f"running: {' '.join(cmd)}\nlast output:\n{''.join(tail)}\n"
                "Fix the error above, or set distributed.num_processes=1 to train in one process"
            )
        return json.loads(result.read_text())
