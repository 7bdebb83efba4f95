"""Two training processes (DDP over gloo on the CPU) against one, with the same global batches.

``test_two_processes_match_one_process`` runs SFT, reward-model and PPO training through
``rlhf.cli.run_stage`` (tests/stages/ddp_worker.py) once in this process and once under
torchrun with two processes, and compares the logged losses step by step. The two runs
start from the same weights, see the same data in the same order (each process half of
every batch), and PPO sees the same episodes (ddp_worker's replay_generate); the base
model has dropout off, since dropout draws different masks in a different process layout.
What is left is floating-point order: per-process forward passes over half batches,
the gradient all-reduce, one thread per process. Measured: see TOLERANCE.

``test_ppo_stage_in_two_processes_logs_once`` runs the production path end to end:
``run_ppo`` with ``distributed.num_processes=2`` starts torchrun (``rlhf train-stage``),
each process samples its own shard, and only rank 0 logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from rlhf.config import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "sft.max_steps=6",
    "sft.batch_size=8",
    # Length grouping draws its batches per process (a megabatch of 50 local batches, sorted), so with two
    # processes the global batches are other rows than with one; the equality below needs the same rows.
    "sft.group_by_length=false",
    "reward.max_steps=6",
    "reward.batch_size=8",
    "reward.group_by_length=false",
    "reward.max_heldout_pairs=50",
    "ppo.steps=3",
    "ppo.batch_size=8",
    "ppo.mini_batch_size=4",
    "ppo.max_new_tokens=12",
    "ppo.kl_horizon=8",
    "ppo.auto_resume=false",
]
TOLERANCE = {"sft": 1e-5, "reward": 1e-5, "ppo": 1e-3}
"""Largest |two processes - one process| allowed for any logged loss (SFT, reward model) or PPO statistic at any
step. Measured on this machine: at most 9.5e-7 (sft/loss), 1.8e-7 (reward/loss); PPO 5.1e-4 (objective/kl, a sum
over the response's tokens) and 8.8e-6 at most for the rest. PPO's is larger because its reference log-probs and
entropies come from length-sorted chunks trimmed to their own longest response (``PPOTrainer._score_frozen``): one
process chunks the 8 rows, each of two processes its 4, so the same rows go through differently shaped forwards and
round differently (before that trimming: 1.2e-7). The entropy floor then amplifies it: its ``max(H_ref - H, 0)``
switches tokens in or out on a rounding of H_ref, and at ``ent_coef`` 0.05 objective/kl differed by 6.7e-5, at the
default 0.1 by 5.1e-4. A real error in the gradient averaging moves these by orders more. See docs/deployments.md,
"Training on several processes"."""
COMPARED = {
    "sft": ["sft/loss"],
    "reward": ["reward/loss"],
    "ppo": [
        "loss/policy_avg",
        "loss/value_avg",
        "objective/kl",
        "objective/scores",
        "objective/kl_coef",
        "objective/rlhf_reward",
        "policy/clipfrac_avg",
        "value/explained_variance",
    ],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tracking store, the built-in data and a dropout-free copy of the tiny base model."""
    from rlhf.builtin.model import resolve_base_model
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.infra.tracking import setup_experiment

    root = tmp_path_factory.mktemp("ddp")
    uri = f"sqlite:///{root}/mlflow.db"
    old_uri, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)
    cfg = load_config(None, OVERRIDES)
    paths = resolve_data_paths(cfg.data, root, cfg.seed)
    base = root / "base"
    shutil.copytree(resolve_base_model(cfg.model.base_model, root / "base-models", cfg.seed), base)
    config = json.loads((base / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (base / "config.json").write_text(json.dumps(config))
    mlflow.set_tracking_uri(uri)
    experiment_id = setup_experiment("ddp")
    yield types.SimpleNamespace(root=root, uri=uri, cfg=cfg, paths=paths, base=str(base), experiment_id=experiment_id)
    os.chdir(cwd)
    if old_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_uri
    mlflow.set_tracking_uri(None)


def stage_spec(setup, cfg, label: str) -> dict:
    """ddp_worker's spec: SFT and reward log into runs made here; PPO opens its own under a parent run."""
    client = MlflowClient()
    parent = client.create_run(setup.experiment_id, run_name=f"parent-{label}").info.run_id
    runs = {
        stage: client.create_run(
            setup.experiment_id, run_name=f"{stage}-{label}", tags={"mlflow.parentRunId": parent, "rlhf.stage": stage}
        ).info.run_id
        for stage in ("sft", "reward")
    }
    base = {"run_id": "base", "uri": setup.base}  # PPO's policy and reward model both start from the base
    return {
        "config": cfg.model_dump(mode="json"),
        "tracking_uri": setup.uri,
        "parent": parent,
        "sft": {"run_id": runs["sft"], "args": {"base_model": setup.base, "sft_path": setup.paths["sft"]}},
        "reward": {
            "run_id": runs["reward"],
            "args": {
                "sft_uri": setup.base,
                "preferences_path": setup.paths["preferences"],
                "heldout_path": setup.paths["preferences_heldout"],
            },
        },
        "ppo": {
            "run_id": None,
            "args": {
                "sft": base,
                "reward": base,
                "prompts_path": setup.paths["prompts"],
                "parent_run_id": parent,
                "resume_from": None,
            },
        },
    }


def histories(client: MlflowClient, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each metric's logged (step, value) pairs, in step order."""
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def test_two_processes_match_one_process(setup, monkeypatch):
    import ddp_worker

    from rlhf.ppo.trainer import PPOTrainer

    client = MlflowClient()
    # 1. One process: here.
    one = stage_spec(setup, setup.cfg, "1proc")
    monkeypatch.setattr(PPOTrainer, "generate", ddp_worker.replay_generate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has (OMP_NUM_THREADS=1): no oversubscribed cores
    try:
        t0 = time.perf_counter()
        out_one = ddp_worker.run_all(one)
        t1 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)

    # 2. Two processes under torchrun, gloo; the same global batches.
    two = stage_spec(setup, load_config(None, OVERRIDES + ["distributed.num_processes=2"]), "2proc")
    spec, result = setup.root / "spec.json", setup.root / "result.json"
    spec.write_text(json.dumps(two))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": setup.uri,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "stages")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(ROOT / "tests" / "stages" / "ddp_worker.py"),
            str(spec),
            str(result),
        ],
        env=env,
        cwd=setup.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    t2 = time.perf_counter()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out_two = json.loads(result.read_text())
    print(f"one process {t1 - t0:.1f} s, two processes {t2 - t1:.1f} s")

    # 3. The same losses and statistics at every step, within TOLERANCE.
    ppo_one, ppo_two = out_one["ppo"]["final"]["run_id"], out_two["ppo"]["final"]["run_id"]
    run_ids = {
        "sft": (one["sft"]["run_id"], two["sft"]["run_id"]),
        "reward": (one["reward"]["run_id"], two["reward"]["run_id"]),
        "ppo": (ppo_one, ppo_two),
    }
    steps = {"sft": 6, "reward": 6, "ppo": 3}
    worst = {}
    for stage, keys in COMPARED.items():
        h1, h2 = (histories(client, r, keys) for r in run_ids[stage])
        for key in keys:
            # Only rank 0 logged: one value per step (a second logging process would double them).
            assert [s for s, _ in h1[key]] == [s for s, _ in h2[key]] == list(range(1, steps[stage] + 1)), (stage, key)
            diff = max(abs(a - b) for (_, a), (_, b) in zip(h1[key], h2[key]))
            worst[stage, key] = diff
    print("largest differences:", {k: f"{v:.2e}" for (_, k), v in worst.items()})
    assert all(diff <= TOLERANCE[stage] for (stage, _), diff in worst.items()), worst
    # SFT actually learned (the comparison is not between two flat lines). Each logged loss is one batch of 8
    # rows, so the last one alone can be a hard batch (6.58 -> 5.46 at step 5, then 7.47 at step 6, measured).
    sft_losses = [v for _, v in histories(client, two["sft"]["run_id"], ["sft/loss"])["sft/loss"]]
    assert min(sft_losses[1:]) < sft_losses[0] - 0.5, sft_losses

    # 4. The KL controller and reward normaliser end in the same state (from rank 0's final checkpoint).
    states = [
        json.loads(
            Path(mlflow.artifacts.download_artifacts(f"{out['ppo']['final']['uri']}/trainer_state.json")).read_text()
        )
        for out in (out_one, out_two)
    ]
    assert states[0]["kl_controller"]["kind"] == states[1]["kl_controller"]["kind"]
    assert states[0]["kl_controller"]["value"] == pytest.approx(
        states[1]["kl_controller"]["value"], abs=TOLERANCE["ppo"]
    )
    for key in ("mean", "var", "count"):
        assert states[0]["reward_moments"][key] == pytest.approx(states[1]["reward_moments"][key], abs=TOLERANCE["ppo"])

    # 5. Only rank 0 logged: exactly one run per stage and one set of PPO checkpoints.
    children = client.search_runs([setup.experiment_id], f"tags.mlflow.parentRunId = '{two['parent']}'")
    assert sorted(r.data.tags["rlhf.stage"] for r in children) == ["ppo", "reward", "sft"]
    checkpoints = {f.path for f in client.list_artifacts(ppo_two, "checkpoints")}
    assert checkpoints == {"checkpoints/step_00000", "checkpoints/step_00003"}
    for stage in ("sft", "reward"):
        assert "checkpoint/model.safetensors" in {
            f.path for f in client.list_artifacts(run_ids[stage][1], "checkpoint")
        }


def test_ppo_stage_in_two_processes_logs_once(setup):
    """run_ppo with num_processes=2: torchrun, `rlhf train-stage`, sharded sampling, rank 0 logs."""
    from tasks.common import Checkpoint
    from tasks.ppo import run_ppo

    cfg = load_config(None, OVERRIDES + ["distributed.num_processes=2", "ppo.sample_every=1"])
    client = MlflowClient()
    parent = client.create_run(setup.experiment_id, run_name="parent-launch").info.run_id
    base = Checkpoint("base", setup.base)
    result = run_ppo(cfg, base, base, setup.paths["prompts"], parent)

    run_id = result.final.run_id
    assert sorted(result.checkpoints) == [0, 3] and result.stopped_at is None
    for key in ("objective/kl", "objective/scores", "loss/policy_avg", "objective/kl_coef"):
        assert [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)] == [1, 2, 3], key
    children = client.search_runs([setup.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in children] == [run_id]
    # The sample table holds the whole global batch: both processes' shards, gathered.
    table = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/step_00001.json")).read_text()
    )
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 8 and all(row["response"] is not None for row in rows)


def _free_port() -> int:
    from tasks.launch import free_port

    return free_port()
