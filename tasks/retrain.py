"""Drift-triggered retraining: train again only when something changed since the drifted version was trained.

The ``retrain-on-drift`` deployment (prefect.yaml) is started by a Prefect trigger on the
monitor's ``rlhf.drift.alert`` event, at most once per model version within the trigger's
cooldown, with ``retrain_of`` = the alerting version (``models:/<name>/<version>``). The
trigger sees only the event; whether a retraining could learn anything new is decided
here. Retraining on the same data with the same code and config reproduces the version,
drift included, so the pipeline compares what registration recorded on the version
(``lineage.data.<split>``, ``lineage.code``, ``lineage.config_hash``: tasks/caching.py
``training_lineage``) with its own, right after validation, and stops before SFT when
nothing differs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from rlhf.config import PipelineConfig
from tasks.caching import LINEAGE_DATA_PREFIX, training_lineage

RETRAIN_CHECK = "retrain-check"
_VERSION_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")


@dataclass(frozen=True)
class DriftedVersion:
    """The registered version a drift alert names, with the lineage its registration recorded."""

    model_uri: str
    lineage: dict[str, str]
    """Its ``lineage.*`` tags."""


@dataclass(frozen=True)
class RetrainDecision:
    """Whether a drift-triggered run trains, and why (logged, and the flow run's state message when it does not)."""

    retrain: bool
    changes: tuple[str, ...]
    """What differs from the drifted version's lineage; empty when nothing does."""
    message: str


def drifted_version(model_uri: str) -> DriftedVersion:
    """Read ``models:/<name>/<version>`` from the registry; raises ValueError naming the fix when it is not there."""
    match = _VERSION_URI.fullmatch(model_uri)
    if match is None:
        raise ValueError(
            f"retrain_of={model_uri!r} is not a model version URI: give models:/<registered model>/<version> "
            "(the rlhf.drift.alert event's payload.model_uri), e.g. models:/rlhf-policy/3"
        )
    name, version = match["name"], match["version"]
    try:
        tags = MlflowClient().get_model_version(name, version).tags or {}
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(
            f"retrain_of={model_uri!r}: the registry has no version {version} of {name!r}. Check that the flow run "
            "logs to the tracking server the monitor used (MLFLOW_TRACKING_URI in the worker's environment), or "
            "run the deployment without retrain_of to retrain unconditionally"
        ) from None
    lineage = {k: v for k, v in tags.items() if k.startswith("lineage.")}
    return DriftedVersion(model_uri, lineage)


def what_changed(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """Each lineage entry of ``current`` that ``recorded`` lacks or holds another value for, and each data split
    ``recorded`` has that ``current`` lacks; one line each, sorted."""
    changes = []
    for key in sorted(current):
        if key not in recorded:
            changes.append(f"{key}: not recorded on the version")
        elif recorded[key] != current[key]:
            changes.append(f"{key}: {recorded[key][:12]} -> {current[key][:12]}")
    for key in sorted(recorded):
        if key.startswith(LINEAGE_DATA_PREFIX) and key not in current:
            changes.append(f"{key}: the split is gone from the data")
    return changes


def retrain_check(drifted: DriftedVersion, cfg: PipelineConfig, fingerprints: dict[str, str]) -> RetrainDecision:
    """Compare this run's data, code and config with what the drifted version was trained from."""
    changes = what_changed(drifted.lineage, training_lineage(cfg, fingerprints))
    if changes:
        return RetrainDecision(
            True, tuple(changes), f"retraining {drifted.model_uri}, which drifted: " + "; ".join(changes)
        )
    return RetrainDecision(
        False,
        (),
        f"not retraining {drifted.model_uri}: it was trained on the same data (fingerprints of "
        f"{', '.join(sorted(fingerprints))}), code and config as this run has, so retraining would reproduce it, "
        "drift included. Add data that covers the drifted traffic (docs/monitoring.md, Diagnosis) or change the "
        "code or config; then the next alert after the trigger's cooldown retrains, or run the deployment "
        "without retrain_of to retrain now",
    )


@task(name=RETRAIN_CHECK, cache_policy=NO_CACHE)
def retrain_check_task(drifted: DriftedVersion, cfg: PipelineConfig, fingerprints: dict[str, str]) -> RetrainDecision:
    """Retrain only if the data, code or config changed since the drifted version was trained."""
    return retrain_check(drifted, cfg, fingerprints)
