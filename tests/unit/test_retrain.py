"""Drift-triggered retraining's condition: something changed since the drifted version was trained."""

from __future__ import annotations

import pytest

from tasks.retrain import drifted_version, what_changed

RECORDED = {
    "lineage.config_hash": "c" * 16,
    "lineage.code": "a" * 64,
    "lineage.data.sft": "1" * 64,
    "lineage.data.preferences": "2" * 64,
    "lineage.pipeline_run_id": "run",  # lineage that says nothing about what was trained from
}
CURRENT = {k: v for k, v in RECORDED.items() if k != "lineage.pipeline_run_id"}


def test_nothing_changed_means_no_change():
    assert what_changed(RECORDED, CURRENT) == []


def test_each_kind_of_change_is_named():
    assert what_changed(RECORDED, {**CURRENT, "lineage.data.sft": "9" * 64}) == [
        "lineage.data.sft: 111111111111 -> 999999999999"
    ]
    assert what_changed(RECORDED, {**CURRENT, "lineage.code": "b" * 64}) == [
        "lineage.code: aaaaaaaaaaaa -> bbbbbbbbbbbb"
    ]
    assert what_changed(RECORDED, {**CURRENT, "lineage.data.prompts": "3" * 64}) == [
        "lineage.data.prompts: not recorded on the version"
    ]
    fewer = {k: v for k, v in CURRENT.items() if k != "lineage.data.preferences"}
    assert what_changed(RECORDED, fewer) == ["lineage.data.preferences: the split is gone from the data"]
    # a version registered before the code fingerprint was recorded cannot show that nothing changed
    older = {k: v for k, v in RECORDED.items() if k != "lineage.code"}
    assert what_changed(older, CURRENT) == ["lineage.code: not recorded on the version"]


def test_retrain_of_must_name_a_registered_version(mlflow_store):
    with pytest.raises(ValueError, match=r"not a model version URI: give models:/<registered model>/<version>"):
        drifted_version("rlhf-policy/3")
    with pytest.raises(ValueError, match="not a model version URI"):
        drifted_version("models:/rlhf-policy@champion")
    with pytest.raises(ValueError, match=r"the registry has no version 3 of 'rlhf-policy'. Check that the flow run"):
        drifted_version("models:/rlhf-policy/3")
