"""The operator's commands: `rlhf monitor`, `traffic`, `promote`, `rollback` (user errors, and the alias moves
against a real SQLite tracking store). `rlhf monitor` and `rlhf traffic` on real windows are in
tests/stages/test_monitor.py, beside the champion they need."""

from __future__ import annotations

import shutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prefect import flow  # noqa: F401  (sets up Prefect's logging now, on sys.stderr: not on a test's capsys)

from rlhf.builtin.traffic import DRIFT_KINDS
from rlhf.cli import DRIFT_KIND_CHOICES, main
from rlhf.registry.promotion import CHAMPION, PREVIOUS_CHAMPION, registry_aliases

MODEL = "rlhf-policy"


def passing_tags(champion: str) -> dict[str, str]:
    """The evaluate and validate stages' tags of a version that passes every gate against `champion` ('none')."""
    return {
        "eval.champion_version": champion,
        "eval/win_rate_vs_champion_low": "0.56",
        "eval/win_rate_vs_sft_low": "0.61",
        "eval/kl_mean": "3.2",
        "eval/kl_budget": "12",
        "eval/num_samples": "64",
        "eval/violation_rate": "0.125",
        "eval/sft_violation_rate": "0.5",
        "eval/champion_violation_rate": "0.125",
        "hacking.proxy_gold_divergence": "false",
        "hacking.length_drift": "false",
        "hacking.reward_length_correlation": "false",
        "validation.success": "true",
    }


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An SQLite store with its tables created once (MLflow's migrations take seconds per store)."""
    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """A fresh copy of the empty store as this test's tracking store, the working folder beside it."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_the_rlhf_command_exits_with_mains_code_after_freezing_the_heap(monkeypatch):
    """The console script is ``entry``: main's exit code, with the heap frozen first (no last full collection)."""
    import gc
    import tomllib
    from pathlib import Path

    import rlhf.cli as cli

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["rlhf"] == "rlhf.cli:entry"
    calls = []
    monkeypatch.setattr(cli, "main", lambda: calls.append("main") or 3)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    with pytest.raises(SystemExit) as exited:
        cli.entry()
    assert exited.value.code == 3 and calls == ["main", "freeze"]


def test_a_monitored_version_may_be_given_as_a_number():
    from rlhf.config import load_config

    assert load_config(None, ["monitor.version=3"]).monitor.version == "3"  # YAML reads 3 as an int


def test_drift_kind_choices_are_the_simulators():
    assert DRIFT_KIND_CHOICES == DRIFT_KINDS


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["monitor"], "simulate some with `rlhf traffic --kind new_intent`"),
        (["monitor", "--traffic", "/no/such/*.jsonl"], "no traffic window matches '/no/such/*.jsonl'"),
        (["monitor", "--set", "monitor.alpha=3"], "unknown option 'monitor.alpha'"),
        (["traffic", "--kind", "clean", "--magnitude", "1.5"], "pass a value in [0, 1]"),
        (["traffic", "--kind", "clean", "--rows", "20"], "pass --rows 100 or more"),
        (["traffic", "--kind", "new_intent"], "has no alias 'champion'"),
        (["promote", "three"], "pass one (e.g. 3), or latest"),
        (["promote", "latest"], "has no registered versions"),
        (["rollback"], "has no champion to roll back to"),
    ],
)
def test_operator_user_errors_are_one_line(argv, expected, store, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.slow
def test_promote_latest_and_rollback_move_the_aliases(prefect_harness, store, tmp_path, capsys):
    client = MlflowClient()
    client.create_registered_model(MODEL)
    (tmp_path / "model").mkdir()

    def register(tags: dict[str, str]) -> str:
        return str(client.create_model_version(MODEL, source=str(tmp_path / "model"), tags=tags).version)

    v1 = register({k: v for k, v in passing_tags("none").items() if k != "eval/win_rate_vs_champion_low"})
    assert main(["promote", "latest"]) == 0
    assert registry_aliases(client, MODEL) == {CHAMPION: v1}
    out = capsys.readouterr().out
    assert f"v{v1} is champion (previous: none)" in out
    assert "pass  win_rate_vs_champion   no champion yet" in out

    v2 = register(passing_tags(v1))
    assert main(["promote"]) == 0  # latest by default
    assert registry_aliases(client, MODEL) == {CHAMPION: v2, PREVIOUS_CHAMPION: v1}
    out = capsys.readouterr().out
    for gate in ("validation", "win_rate_vs_sft", "win_rate_vs_champion", "kl_budget", "violation_rate", "no_hacking"):
        assert f"pass  {gate}" in out, out

    v3 = register({**passing_tags(v2), "eval/kl_mean": "12.5"})
    assert main(["promote", v3]) == 1  # a gate refused it: no alias moves
    out = capsys.readouterr().out
    assert "FAIL  kl_budget" in out and f"v{v3} was not promoted: kl_budget: KL 12.500 > 12 nats" in out
    assert registry_aliases(client, MODEL) == {CHAMPION: v2, PREVIOUS_CHAMPION: v1}

    assert main(["rollback"]) == 0
    assert registry_aliases(client, MODEL) == {CHAMPION: v1}
    assert f"rolled back from v{v2} to v{v1} (previous-champion: none)" in capsys.readouterr().out
    assert main(["rollback", "--model", MODEL]) == 2
    assert "has no previous champion to roll back to" in capsys.readouterr().err
