"""Registration: one version per checkpoint even when two pipelines register it at once, and no temporary
folder left behind (the checkpoint is downloaded and copied into a folder the stage removes)."""

from __future__ import annotations

import tempfile
import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient


@pytest.fixture
def chosen(mlflow_store, tmp_path):
    """A logged checkpoint (the built-in tiny GPT-2) and the evaluate stage's verdict on it."""
    from rlhf.builtin.model import resolve_base_model
    from rlhf.infra.tracking import log_checkpoint, setup_experiment
    from tasks.common import Checkpoint, Evaluation, PPOResult

    base = resolve_base_model("builtin:tiny-gpt2", tmp_path / "base")
    experiment_id = setup_experiment("register-test")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        ckpt = Checkpoint(run.info.run_id, log_checkpoint(base, "checkpoint"))
    evaluation = Evaluation("no-eval-run", {"eval/kl_mean": 0.0}, ckpt, 0, {"eval.judge": "gold"})
    return experiment_id, PPOResult(ckpt, {0: ckpt.uri}), evaluation


def test_two_pipelines_registering_the_same_checkpoint_get_one_version(chosen, monkeypatch):
    import tasks.register as register
    from rlhf.config import load_config

    experiment_id, ppo, evaluation = chosen
    cfg = load_config(None)
    real_copy = register.servable_copy

    def slow_copy(*args):  # widen the window between "is it registered?" and "register it"
        time.sleep(1.0)
        return real_copy(*args)

    monkeypatch.setattr(register, "servable_copy", slow_copy)
    client = MlflowClient()
    parents = [client.create_run(experiment_id).info.run_id for _ in range(2)]
    results, errors = {}, []

    def pipeline(parent_id: str) -> None:
        try:
            results[parent_id] = register.run_register(cfg, ppo, evaluation, {}, parent_id)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=pipeline, args=(p,)) for p in parents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    versions = client.search_model_versions(f"name = '{cfg.registered_model}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert sorted(r.reused for r in results.values()) == [False, True]
    assert {r.version for r in results.values()} == {"1"}


def test_registration_leaves_no_temporary_folder(chosen, tmp_path, monkeypatch):
    from rlhf.config import load_config
    from tasks.register import run_register

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    experiment_id, ppo, evaluation = chosen
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        version = run_register(load_config(None), ppo, evaluation, {}, parent.info.run_id)
    assert version.version == "1" and not version.reused
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("rlhf-")) == []
