"""The feedback flow at smoke sizes: a ranked batch is merged, the reward model retrained, the champion continued,
evaluated and registered with the batch in its lineage; a second run with nothing new is Skipped."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rlhf.builtin.task import resolve_data_paths
from rlhf.config import load_config
from rlhf.feedback.batches import BatchManifest, add_ranking, batch_name, validate_batch
from rlhf.feedback.pairs import Ranking, prompt_id
from rlhf.registry.promotion import CHAMPION
from tasks.feedback import FEEDBACK_BATCHES_TAG, continued_config
from tasks.label import label_prompts

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
RESPONSES = (
    " I am sorry for the trouble. Your refund is approved and will reach your card in five days.",
    " Your refund is approved and will reach your card in five days.",
    " Please contact our support team.",
    " I am not sure, please try again later. Have a nice day.",
)


def ranked_batch(root: Path, prompts: list[str], version: str) -> str:
    """A validated batch: one rater ranks RESPONSES in order on each prompt (6 pairs each)."""
    now = datetime(2026, 12, 4, tzinfo=UTC)
    name = batch_name("label", version, now)
    manifest = BatchManifest(name, "ranking", version, now.isoformat())
    for p in prompts:
        ranking = Ranking(prompt_id(p), p, RESPONSES, (1, 2, 3, 4), "ann", now.isoformat(), version, name)
        manifest = add_ranking(root / name, manifest, ranking)
    manifest = validate_batch(root / name, manifest, load_config(SMOKE).validation)
    assert manifest.validated, manifest.failures
    return name


def test_the_continued_run_takes_the_feedback_entropy_bonus() -> None:
    cfg = load_config(SMOKE, ["ppo.ent_coef=0.05", "feedback.ent_coef=0.01"])
    continued = continued_config(cfg)
    assert continued.ppo.ent_coef == 0.01 and cfg.ppo.ent_coef == 0.05
    assert continued.ppo.model_dump(exclude={"ent_coef"}) == cfg.ppo.model_dump(exclude={"ent_coef"})
    assert continued.model_dump(exclude={"ppo"}) == cfg.model_dump(exclude={"ppo"})


@pytest.mark.slow
def test_feedback_flow_learns_from_a_new_batch_and_skips_when_nothing_is_new(prefect_harness, mlflow_store, tmp_path):
    from flows.feedback import rlhf_feedback
    from flows.pipeline import rlhf_pipeline

    client = MlflowClient()
    cfg = load_config(SMOKE, [f"feedback.dir={tmp_path / 'feedback'}"])
    first = rlhf_pipeline(cfg)
    if not first.promotion.promoted:  # smoke numbers are not meaningful: make it champion by hand
        client.set_registered_model_alias("rlhf-policy", CHAMPION, "1")
    prompts = label_prompts(resolve_data_paths(cfg.data, tmp_path / "data", cfg.seed)["prompts"], 3, 0)
    batch = ranked_batch(tmp_path / "feedback", prompts, "models:/rlhf-policy/1")

    result = rlhf_feedback(cfg)

    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name.startswith("feedback-")
    assert parent.data.tags["rlhf.continued_from"] == "models:/rlhf-policy/1"
    assert parent.data.tags["feedback.batches"] == batch
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_stage = {run.data.tags["rlhf.stage"]: run for run in children}
    assert {"feedback-data", "validate", "sft", "reward", "ppo", "evaluate", "register"} <= set(by_stage)
    data_run = by_stage["feedback-data"]
    assert data_run.data.metrics["feedback/new_pairs"] == 3 * 6
    assert data_run.data.metrics["feedback/ranking_pairs"] == 3 * 6
    assert {i.dataset.name for i in data_run.inputs.dataset_inputs} == {batch, "feedback"}
    # the start is the champion's policy, KL reference included; the reward model retrained on the merged pairs
    assert by_stage["sft"].data.params["continued_from"] == "models:/rlhf-policy/1"
    assert by_stage["ppo"].data.params["sft_run_id"] == by_stage["sft"].info.run_id
    assert float(by_stage["ppo"].data.params["ppo.ent_coef"]) == cfg.feedback.ent_coef == 0.0
    assert by_stage["validate"].data.metrics["data/preferences_rows"] == 6000 + 3 * 6
    # the reward model trains on the validated pairs with the feedback pairs replayed feedback.replay (3) times
    assert parent.data.metrics["feedback/replay"] == 3
    assert parent.data.metrics["feedback/train_share"] == pytest.approx(3 * 18 / (6000 + 3 * 18))
    version = client.get_model_version("rlhf-policy", "2")
    assert version.tags[FEEDBACK_BATCHES_TAG] == batch
    assert result.model_uri == "models:/rlhf-policy/2" and "eval/win_rate_vs_champion" in result.metrics

    # nothing new since version 2 learned the batch (once it is champion): Skipped, saying how to get feedback
    client.set_registered_model_alias("rlhf-policy", CHAMPION, "2")
    state = rlhf_feedback(cfg, return_state=True)
    assert state.name == "Skipped" and "rlhf label" in state.message
