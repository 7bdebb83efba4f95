"""Tier 3: the compare flow under Prefect's test harness, at smoke sizes: one SFT and reward model shared by two
algorithms and two seeds, each a child run with its training and evaluation, then the comparison run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlhf.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def children(client: MlflowClient, run_id: str) -> dict[str, object]:
    experiment_id = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {run.info.run_name: run for run in runs}


@pytest.mark.slow
def test_compare_shares_sft_and_reward_and_logs_the_frontier(prefect_harness, mlflow_store, tmp_path):
    from flows.compare import rlhf_compare

    result = rlhf_compare(("ppo", "dpo"), (0, 1), load_config(SMOKE))

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name.startswith("compare-") and parent.info.status == "FINISHED"
    top = children(client, result.parent_run_id)
    candidates = {"ppo-seed0", "dpo-seed0", "ppo-seed1", "dpo-seed1"}
    assert {"validate", "sft", "reward", "compare"} | candidates <= set(top)
    for name in candidates:  # each candidate: its own training stage and the same evaluate stage
        algorithm = name.split("-")[0]
        assert set(children(client, top[name].info.run_id)) == {algorithm, "evaluate"}, name
        assert top[name].data.tags["rlhf.algorithm"] == algorithm
    # SFT and the reward model trained once for all four candidates
    experiment_id = parent.info.experiment_id
    assert len(client.search_runs([experiment_id], "tags.`rlhf.stage` = 'sft'")) == 1
    assert len(client.search_runs([experiment_id], "tags.`rlhf.stage` = 'reward'")) == 1

    compare = top["compare"].info.run_id
    files = {f.path for f in client.list_artifacts(compare, "compare")}
    assert {"compare/frontier.png", "compare/table.json", "compare/frontier.json", "compare/summary.md"} <= files
    table = json.loads(Path(client.download_artifacts(compare, "compare/table.json", str(tmp_path))).read_text())
    rows = dict(zip(table["columns"], zip(*table["data"])))
    assert rows["algorithm"] == ("ppo", "dpo") and rows["seeds"] == (2, 2)
    frontier = json.loads(Path(client.download_artifacts(compare, "compare/frontier.json", str(tmp_path))).read_text())
    points = [dict(zip(frontier["columns"], row)) for row in frontier["data"]]
    # every checkpoint of every candidate: steps 0 (SFT), 2 and 4, for 2 algorithms x 2 seeds
    assert sorted((p["algorithm"], p["seed"], p["step"]) for p in points) == sorted(
        (a, s, step) for a in ("ppo", "dpo") for s in (0, 1) for step in (0, 2, 4)
    )
    sft_points = {(p["kl"], p["judge"]) for p in points if p["step"] == 0}
    assert len(sft_points) == 1  # SFT measured on the same prompts with the same random numbers for every run
    winner = client.get_run(compare).data.tags["compare.winner"]
    assert winner == (result.comparison.winner or "none")
    if result.model_uri is not None:
        name, version = result.model_uri.removeprefix("models:/").split("/")
        assert client.get_model_version(name, version).tags["lineage.algorithm"] == winner
