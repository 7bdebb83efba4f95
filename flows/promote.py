"""Promotion and rollback flows: registry aliases move only after the gates pass.

Wiring only: the gates, the alias moves and the lock live in rlhf/registry/promotion.py.

- ``promote(model_name, version, config)``: gates on the version's tags; pass ->
  alias ``challenger``, an optional human approval (the flow pauses with a form in
  the Prefect UI, ``config.require_approval``), then ``champion`` moves to the
  version and ``previous-champion`` to the old champion; fail -> the version is
  tagged ``promotion.status=rejected`` with ``promotion.reasons``, no alias moves.
- ``rollback(model_name)``: ``champion`` moves back to ``previous-champion``.
"""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from rlhf.config import PromotionConfig
from rlhf.infra.tracking import tracking_uri
from rlhf.registry.promotion import (
    Approval,
    PromotionOutcome,
    RollbackOutcome,
    lock_path,
    promote_version,
    resolve_version,
    rollback_champion,
)


class ApprovalInput(RunInput):
    """The reviewer's form in the Prefect UI when a promotion waits for approval."""

    approved: bool = Field(description="Promote the challenger to champion")
    reviewer: str = Field(
        min_length=1,
        pattern=r"\S",
        description="Who reviewed the challenger (required: recorded as promotion.approved_by)",
    )
    comment: str = Field("", description="Why (kept on the model version as promotion.reasons when rejected)")


def wait_for_approval(timeout_s: int) -> Approval:
    """Pause this flow run until a reviewer submits ApprovalInput (fails the run after timeout_s)."""
    answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s)
    return Approval(answer.approved, answer.reviewer, answer.comment)


@flow(name="promote", log_prints=True)
def promote(
    model_name: str = "rlhf-policy", version: str = "latest", config: PromotionConfig = PromotionConfig()
) -> PromotionOutcome:
    """Gate a registered version and, if it passes (and is approved), make it champion."""
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    version = resolve_version(client, model_name, version)
    approve = (lambda v: wait_for_approval(config.approval_timeout_s)) if config.require_approval else None
    outcome = promote_version(
        client, model_name, version, config, lock_path(mlflow.get_registry_uri(), model_name, config.lock_dir), approve
    )
    gates = {k: v for k, v in client.get_model_version(model_name, version).tags.items() if k.startswith("gate.")}
    lines = [f"## {model_name} v{version}: {outcome.status}", "", "| gate | result |", "|---|---|"]
    lines += [f"| {k.removeprefix('gate.')} | {v} |" for k, v in sorted(gates.items())]
    create_markdown_artifact("\n".join(lines), key="promotion", description=f"Promotion of {model_name} v{version}")
    if outcome.promoted:
        logger.info(
            "%s v%s is champion (previous champion: %s)", model_name, version, outcome.previous_champion or "none"
        )
    else:
        logger.warning("%s v%s not promoted: %s", model_name, version, "; ".join(outcome.reasons))
    return outcome


@flow(name="rollback", log_prints=True)
def rollback(model_name: str = "rlhf-policy", config: PromotionConfig = PromotionConfig()) -> RollbackOutcome:
    """Move champion back to the previous champion."""
    mlflow.set_tracking_uri(tracking_uri())
    outcome = rollback_champion(
        mlflow.MlflowClient(),
        model_name,
        lock_path(mlflow.get_registry_uri(), model_name, config.lock_dir),
        config.lock_timeout_s,
    )
    get_run_logger().info("%s champion rolled back from v%s to v%s", model_name, outcome.rolled_back, outcome.champion)
    return outcome
