"""The launcher's command lines, how it stops, and the config checks of several processes (fast)."""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from rlhf.config import ConfigError, load_config
from rlhf.infra.distributed import Shard, all_gather_rows, all_reduce_sum, world_size
from tasks.launch import launch_command, stop_launcher


def test_torchrun_for_ddp_and_accelerate_launch_for_an_accelerate_config(tmp_path):
    cfg = load_config(None, ["distributed.num_processes=4"])
    cmd = launch_command("sft", cfg, tmp_path / "spec.json", tmp_path / "result.json")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    assert cmd[-6:] == [
        "-m",
        "rlhf.cli",
        "train-stage",
        "sft",
        str(tmp_path / "spec.json"),
        str(tmp_path / "result.json"),
    ]

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\n")
    cfg = load_config(None, ["distributed.num_processes=4", f"distributed.accelerate_config={fsdp}"])
    cmd = launch_command("reward", cfg, tmp_path / "s", tmp_path / "r")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(fsdp) and cmd[cmd.index("--num_processes") + 1] == "4"
    # PPO's own loop always runs DDP under torchrun.
    assert launch_command("ppo", cfg, tmp_path / "s", tmp_path / "r")[2] == "torch.distributed.run"

    cfg = load_config(None, ["distributed.num_processes=2", "distributed.accelerate_config=/no/such.yaml"])
    with pytest.raises(ValueError, match="accelerate config --config_file"):
        launch_command("sft", cfg, tmp_path / "s", tmp_path / "r")


def test_global_batches_must_split_evenly():
    with pytest.raises(
        ConfigError, match=r"ppo.mini_batch_size \(4\) must be a multiple of distributed.num_processes \(3\)"
    ):
        load_config(
            None,
            [
                "distributed.num_processes=3",
                "sft.batch_size=6",
                "reward.batch_size=6",
                "ppo.batch_size=12",
                "ppo.mini_batch_size=4",
            ],
        )
    with pytest.raises(ConfigError, match=r"sft.batch_size \(32\) must be a multiple"):
        load_config(None, ["distributed.num_processes=3"])


def test_one_process_helpers_are_the_identity():
    import torch

    assert world_size() == 1
    assert Shard.of(8).rows == slice(None)
    assert Shard(1, 2, 8).rows == slice(4, 8)  # rank 1 of 2 owns rows 4-7 of a batch of 8
    x = torch.arange(6).reshape(2, 3)
    assert all_gather_rows(x) is x
    assert all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]


def test_stopping_a_launcher_stops_each_worker_even_one_that_ignores_sigterm():
    # The launcher starts its worker in a session of its own, as torchrun does; the worker ignores
    # SIGTERM, as one stuck in a collective may; SIGKILL follows after the grace period.
    worker = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    launcher = (
        "import subprocess, sys, time\n"
        f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert proc.stdout.readline() == "up\n"  # the worker has set its handler
        child = psutil.Process(pid)
        stop_launcher(proc, grace_s=1.0)
        assert proc.returncode == -signal.SIGTERM
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
