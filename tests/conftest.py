"""Shared fixtures: offline defaults, an isolated MLflow store per test, one Prefect harness."""

from __future__ import annotations

import os

# Under pytest-xdist each worker gets its share of the cores, set before torch is imported (and inherited
# by the pipelines tests start): two workers of two torch threads each on two cores stall each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

import pytest  # noqa: E402

from rlhf.infra.env import quiet_defaults

quiet_defaults()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store and working folder for one test."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory):
    """SFT policy and reward model trained briefly on the built-in data, shared by the session.

    Returns a namespace with the config used, the data paths, the base model path,
    the MLflow tracking URI and the SFT and reward-model Checkpoints. About 40 s.
    """
    import types

    import mlflow

    from rlhf.builtin.model import resolve_base_model
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.config import load_config
    from rlhf.infra.tracking import setup_experiment
    from tasks.reward import run_reward
    from tasks.sft import run_sft

    root = tmp_path_factory.mktemp("tiny_stack")
    uri = f"sqlite:///{root}/mlflow.db"
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # system metrics every second, not every 10 s, so that the short stage runs log some
    old_interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(
            None,
            # random batches, as when the PPO tests' figures (tests/stages/test_ppo.py) were measured on this stack
            [
                "sft.max_steps=120",
                "sft.batch_size=32",
                "sft.group_by_length=false",
                "reward.max_steps=160",
                "reward.batch_size=32",
                "reward.group_by_length=false",
            ],
        )
        paths = resolve_data_paths(cfg.data, root, cfg.seed)
        base = resolve_base_model(cfg.model.base_model, root / "base-models", cfg.seed)
        experiment_id = setup_experiment("tiny-stack")
        with mlflow.start_run(experiment_id=experiment_id) as parent:
            sft = run_sft(cfg, base, paths["sft"], parent.info.run_id)
            reward = run_reward(cfg, sft, paths["preferences"], paths["preferences_heldout"], parent.info.run_id)
    finally:
        os.chdir(cwd)
        for key, old in (("MLFLOW_TRACKING_URI", old_uri), ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", old_interval)):
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        mlflow.set_tracking_uri(None)
    return types.SimpleNamespace(
        cfg=cfg,
        paths=paths,
        base_model=base,
        tracking_uri=uri,
        root=root,
        sft=sft,
        reward=reward,
        parent_run_id=parent.info.run_id,
    )


# -- running in parallel (pytest-xdist, `make test` runs two workers) ------------------------------
# Tests that share an expensive session fixture run on one worker, so each is built once:
# the trained tiny stack, and the integration tier's live servers and smoke run.
SHARED_FIXTURE_GROUPS = {"tiny_stack": "tiny_stack", "live_servers": "live_servers", "smoke_outcome": "live_servers"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """Mark each test that uses a shared session fixture with that fixture's xdist group."""
    for item in items:
        groups = {
            SHARED_FIXTURE_GROUPS[name] for name in getattr(item, "fixturenames", ()) if name in SHARED_FIXTURE_GROUPS
        }
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses fixtures of two xdist groups {sorted(groups)}: merge them")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))
