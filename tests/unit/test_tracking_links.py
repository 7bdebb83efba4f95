"""Links into the MLflow UI: the page of a run, for a tracking server and for a local store."""

from __future__ import annotations

import pytest

from rlhf.infra.tracking import LOCAL_UI_URL, run_url


@pytest.mark.parametrize(
    ("uri", "base"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://mlflow.example.com/", "https://mlflow.example.com"),
        ("https://alice:s3cret@mlflow.example.com:8443/mlflow", "https://mlflow.example.com:8443/mlflow"),
        ("http://[::1]:5000", "http://[::1]:5000"),
        ("sqlite:////work/rlhf/mlflow.db", LOCAL_UI_URL),
        ("sqlite:///mlflow.db", "http://127.0.0.1:5000"),
        ("file:///tmp/mlruns", LOCAL_UI_URL),
        ("postgresql://rlhf@db/mlflow", LOCAL_UI_URL),
    ],
)
def test_run_url_points_at_the_ui_that_shows_the_store(uri: str, base: str):
    assert run_url("7", "a1b2c3", uri) == f"{base}/#/experiments/7/runs/a1b2c3"


def test_run_url_never_carries_credentials():
    assert "s3cret" not in run_url("1", "r", "https://alice:s3cret@mlflow.example.com")
