"""Promotion gates, alias moves, rollback, concurrency and the approval pause."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import rlhf.registry.promotion as promotion
from rlhf.config import PromotionConfig
from rlhf.registry.promotion import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    Approval,
    PromotionError,
    evaluate_gates,
    lock_path,
    promote_version,
    registry_aliases,
    resolve_version,
    rollback_champion,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "rlhf-policy"
CFG = PromotionConfig(lock_timeout_s=30)


def evidence(**changes: str) -> dict[str, str]:
    """Tags of a version that passes every gate against champion 1; keyword args override."""
    tags = {
        "eval.champion_version": "1",
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
        "hacking.run.proxy_gold_divergence": "true",
        "hacking.run.length_drift": "false",
        "hacking.run.reward_length_correlation": "false",
        "validation.success": "true",
    }
    tags.update(changes)
    return {k: v for k, v in tags.items() if v != "<missing>"}


def failures(tags: dict[str, str], champion: str | None = "1", cfg: PromotionConfig = CFG) -> dict[str, str]:
    """gate name -> detail of each failed gate."""
    return {g.name: g.detail for g in evaluate_gates(tags, champion, cfg) if not g.passed}


# ---------------------------------------------------------------------------------- pure gates
def test_every_gate_passes_on_good_evidence():
    gates = evaluate_gates(evidence(), "1", CFG)
    assert [g.name for g in gates] == [
        "validation",
        "win_rate_vs_sft",
        "win_rate_vs_champion",
        "kl_budget",
        "violation_rate",
        "no_hacking",
    ]
    assert all(g.passed for g in gates), gates
    assert gates[2].tag() == "pass: lower bound 0.560 > 0.500 against champion v1"


@pytest.mark.parametrize(
    ("changes", "champion", "gate", "detail"),
    [
        # The lower bound must be strictly above 0.5: a bound of exactly 0.5 fails.
        (
            {"eval/win_rate_vs_champion_low": "0.5"},
            "1",
            "win_rate_vs_champion",
            "lower bound 0.500 <= 0.500 against champion v1",
        ),
        ({"eval/win_rate_vs_champion_low": "<missing>"}, "1", "win_rate_vs_champion", "re-run the evaluate stage"),
        ({}, "2", "win_rate_vs_champion", "measured against champion 1 but the champion is now 2: re-evaluate"),
        ({}, None, "win_rate_vs_champion", "measured against champion 1 but the champion is now none"),
        ({"eval.champion_version": "<missing>"}, "1", "win_rate_vs_champion", "no eval.champion_version tag"),
        ({"eval/win_rate_vs_sft_low": "0.42"}, "1", "win_rate_vs_sft", "lower bound 0.420 <= 0.500"),
        ({"eval/kl_mean": "12.5"}, "1", "kl_budget", "KL 12.500 > 12 nats"),
        ({"eval/kl_mean": "nan?"}, "1", "kl_budget", "no eval/kl_mean tag"),
        ({"eval/kl_budget": "<missing>"}, "1", "kl_budget", "set promotion.max_kl"),
        ({"eval/kl_budget": "3.0"}, "1", "kl_budget", "KL 3.200 > 3 nats"),
        ({"hacking.length_drift": "true"}, "1", "no_hacking", "flagged: hacking.length_drift"),
        ({"hacking.mode_collapse": "true"}, "1", "no_hacking", "flagged: hacking.mode_collapse"),
        # 9 of 64 = 0.141 against the champion's 0.125 (Wilson 95%: 0.076-0.246): worse is worse
        (
            {"eval/violation_rate": "0.140625"},
            "1",
            "violation_rate",
            "0.141 (95% CI 0.076-0.246) > champion v1's 0.125",
        ),
        ({"eval/champion_violation_rate": "<missing>"}, "1", "violation_rate", "no eval/champion_violation_rate tag"),
        ({"eval/violation_rate": "<missing>"}, "1", "violation_rate", "re-run the evaluate stage"),
        ({"validation.success": "false"}, "1", "validation", "validation.success=false"),
        ({"validation.success": "<missing>"}, "1", "validation", "no validation.success tag"),
    ],
)
def test_each_gate_fails_with_its_reason(changes, champion, gate, detail):
    failed = failures(evidence(**changes), champion)
    assert list(failed) == [gate], failed
    assert detail in failed[gate]


def test_first_version_needs_no_champion_but_must_beat_sft():
    tags = evidence(**{"eval.champion_version": "none", "eval/win_rate_vs_champion_low": "<missing>"})
    assert failures(tags, champion=None) == {}
    gate = next(g for g in evaluate_gates(tags, None, CFG) if g.name == "win_rate_vs_champion")
    assert gate.detail == "no champion yet"
    assert list(failures({**tags, "eval/win_rate_vs_sft_low": "0.3"}, champion=None)) == ["win_rate_vs_sft"]
    # with no champion the violation rate is held against SFT's
    assert list(failures({**tags, "eval/violation_rate": "0.51"}, champion=None)) == ["violation_rate"]


def test_run_level_flags_block_only_when_configured():
    assert failures(evidence()) == {}  # hacking.run.proxy_gold_divergence=true, chosen checkpoint clean
    strict = PromotionConfig(block_on_run_flags=True)
    assert failures(evidence(), cfg=strict) == {"no_hacking": "flagged: hacking.run.proxy_gold_divergence"}
    no_diagnostics = {k: v for k, v in evidence().items() if not k.startswith("hacking.")}
    assert "evaluate this version" in failures(no_diagnostics)["no_hacking"]


def test_validation_gate_can_be_waived():
    tags = evidence(**{"validation.success": "<missing>"})
    assert failures(tags, cfg=PromotionConfig(require_validation=False)) == {}


def test_lock_path_sits_beside_a_local_store_and_remote_stores_need_lock_dir(tmp_path):
    assert (
        lock_path(f"sqlite:///{tmp_path}/mlflow.db", "rlhf-policy") == tmp_path / "mlflow.db.rlhf-policy.promote.lock"
    )
    assert lock_path(f"file://{tmp_path}/mlruns", "a/b") == tmp_path / "mlruns" / "a_b.promote.lock"
    assert lock_path("http://mlflow:5000", "m", lock_dir=str(tmp_path)) == tmp_path / "m.promote.lock"
    with pytest.raises(PromotionError, match="set the promotion config's lock_dir"):
        lock_path("http://mlflow:5000", "m")


# ------------------------------------------------------------------------------ registry moves
@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables created once (migrations take seconds per store)."""
    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def registry(empty_store, tmp_path, monkeypatch):
    """A client on a fresh store, a helper that registers a version with tags, and the lock file."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    client.create_registered_model(MODEL)
    source = tmp_path / "model"
    source.mkdir()

    def add(tags: dict[str, str]) -> str:
        return str(client.create_model_version(MODEL, source=str(source), tags=tags).version)

    yield client, add, lock_path(uri, MODEL)
    mlflow.set_tracking_uri(None)


def first_version_tags() -> dict[str, str]:
    return evidence(**{"eval.champion_version": "none", "eval/win_rate_vs_champion_low": "<missing>"})


def test_pass_makes_champion_and_keeps_the_old_one_for_rollback(registry):
    client, add, lock = registry
    v1, v2 = add(first_version_tags()), add(evidence())

    first = promote_version(client, MODEL, v1, CFG, lock)
    assert (first.promoted, first.champion, first.previous_champion) == (True, v1, None)
    assert registry_aliases(client, MODEL) == {CHAMPION: v1}

    second = promote_version(client, MODEL, v2, CFG, lock)
    assert (second.promoted, second.status) == (True, "champion")
    assert registry_aliases(client, MODEL) == {CHAMPION: v2, PREVIOUS_CHAMPION: v1}  # challenger cleared
    tags = client.get_model_version(MODEL, v2).tags
    assert tags["promotion.status"] == "champion" and tags["promotion.previous_champion"] == v1
    assert tags["gate.win_rate_vs_champion"] == "pass: lower bound 0.560 > 0.500 against champion v1"
    assert client.get_model_version(MODEL, v1).tags["promotion.status"] == "retired"
    again = promote_version(client, MODEL, v2, CFG, lock)
    assert (again.promoted, again.reasons) == (False, ("already the champion",))


def test_fail_tags_rejected_with_reasons_and_moves_no_alias(registry):
    client, add, lock = registry
    v1 = add(first_version_tags())
    promote_version(client, MODEL, v1, CFG, lock)
    v2 = add(evidence(**{"eval/win_rate_vs_champion_low": "0.41", "hacking.length_drift": "true"}))

    outcome = promote_version(client, MODEL, v2, CFG, lock)

    assert (outcome.promoted, outcome.status, outcome.champion) == (False, "rejected", v1)
    assert registry_aliases(client, MODEL) == {CHAMPION: v1}
    tags = client.get_model_version(MODEL, v2).tags
    assert tags["promotion.status"] == "rejected"
    assert tags["promotion.reasons"] == (
        "win_rate_vs_champion: lower bound 0.410 <= 0.500 against champion v1; no_hacking: flagged: hacking.length_drift"
    )
    assert tags["gate.kl_budget"] == "pass: KL 3.200 <= 12 nats"
    assert tags["gate.no_hacking"] == "fail: flagged: hacking.length_drift"


def test_rollback_moves_champion_back_one_promotion_at_a_time(registry):
    client, add, lock = registry
    v1 = add(first_version_tags())
    promote_version(client, MODEL, v1, CFG, lock)
    v2 = add(evidence())
    promote_version(client, MODEL, v2, CFG, lock)
    v3 = add(evidence(**{"eval.champion_version": v2}))
    promote_version(client, MODEL, v3, CFG, lock)
    assert registry_aliases(client, MODEL) == {CHAMPION: v3, PREVIOUS_CHAMPION: v2}
    assert resolve_version(client, MODEL, "latest") == v3

    back = rollback_champion(client, MODEL, lock, 5.0)
    assert (back.rolled_back, back.champion, back.previous_champion) == (v3, v2, v1)
    assert registry_aliases(client, MODEL) == {CHAMPION: v2, PREVIOUS_CHAMPION: v1}
    assert client.get_model_version(MODEL, v3).tags["promotion.status"] == "rolled_back"

    rollback_champion(client, MODEL, lock, 5.0)
    assert registry_aliases(client, MODEL) == {CHAMPION: v1}
    with pytest.raises(PromotionError, match="no previous champion recorded"):
        rollback_champion(client, MODEL, lock, 5.0)


def test_approval_denied_rejects_and_approval_granted_crowns(registry):
    client, add, lock = registry
    v1 = add(first_version_tags())
    seen: list[dict[str, str]] = []

    def deny(version: str) -> Approval:
        seen.append(registry_aliases(client, MODEL))
        return Approval(False, "alice", "answers look templated")

    denied = promote_version(client, MODEL, v1, CFG, lock, approve=deny)
    assert seen == [{CHALLENGER: v1}]  # challenger while the reviewer looks
    assert (denied.promoted, denied.reasons) == (False, ("approval: not approved by alice: answers look templated",))
    assert registry_aliases(client, MODEL) == {}

    granted = promote_version(client, MODEL, v1, CFG, lock, approve=lambda v: Approval(True, "bob"))
    assert granted.promoted and registry_aliases(client, MODEL) == {CHAMPION: v1}
    assert client.get_model_version(MODEL, v1).tags["promotion.approved_by"] == "bob"


def test_crowning_keeps_the_challenger_alias_of_another_waiting_version(registry):
    client, add, lock = registry
    v1, v2 = add(first_version_tags()), add(first_version_tags())

    def v2_becomes_challenger_meanwhile(version: str) -> Approval:
        client.set_registered_model_alias(MODEL, CHALLENGER, v2)  # another promotion awaits its own reviewer
        return Approval(True, "bob")

    assert promote_version(client, MODEL, v1, CFG, lock, approve=v2_becomes_challenger_meanwhile).promoted
    assert registry_aliases(client, MODEL) == {CHAMPION: v1, CHALLENGER: v2}


def test_an_approval_needs_a_reviewer(registry):
    from pydantic import ValidationError

    from flows.promote import ApprovalInput

    client, add, lock = registry
    v1 = add(first_version_tags())
    outcome = promote_version(client, MODEL, v1, CFG, lock, approve=lambda v: Approval(True, "   "))
    assert not outcome.promoted
    assert outcome.reasons == (
        "approval: approved without a reviewer's name: the reviewer must give their name to approve",
    )
    assert registry_aliases(client, MODEL) == {}
    for blank in ("", "   "):
        with pytest.raises(ValidationError, match="reviewer"):
            ApprovalInput(approved=True, reviewer=blank)
    with pytest.raises(ValidationError, match="reviewer"):
        ApprovalInput(approved=True)
    assert ApprovalInput(approved=True, reviewer="dana").reviewer == "dana"


def test_champion_moving_during_approval_rejects_the_waiting_challenger(registry):
    client, add, lock = registry
    v1, v2 = add(first_version_tags()), add(first_version_tags())

    def meanwhile_promote_v2(version: str) -> Approval:
        assert promote_version(client, MODEL, v2, CFG, lock).promoted  # the lock is free while we wait
        return Approval(True, "carol")

    outcome = promote_version(client, MODEL, v1, CFG, lock, approve=meanwhile_promote_v2)
    assert not outcome.promoted
    assert "the champion moved from none to 2 while awaiting approval" in outcome.reasons[0]
    assert registry_aliases(client, MODEL) == {CHAMPION: v2}


def test_two_concurrent_promotions_cannot_both_win(registry, monkeypatch):
    client, add, lock = registry
    v1 = add(first_version_tags())
    promote_version(client, MODEL, v1, CFG, lock)
    contenders = [add(evidence()), add(evidence())]  # both evaluated against champion v1

    # Widen the race: each promotion dawdles between reading the champion and moving it,
    # so without the lock both would read v1, pass, and crown themselves.
    real_gates = promotion.evaluate_gates

    def slow_gates(*args, **kwargs):
        result = real_gates(*args, **kwargs)
        time.sleep(0.5)
        return result

    monkeypatch.setattr(promotion, "evaluate_gates", slow_gates)
    barrier = threading.Barrier(2)
    outcomes = {}

    def race(version: str) -> None:
        barrier.wait()
        outcomes[version] = promote_version(MlflowClient(), MODEL, version, CFG, lock)

    threads = [threading.Thread(target=race, args=(v,)) for v in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    winners = [v for v, o in outcomes.items() if o.promoted]
    assert len(outcomes) == 2 and len(winners) == 1, outcomes
    (loser,) = set(contenders) - set(winners)
    assert "re-evaluate against the current champion" in outcomes[loser].reasons[0]
    assert registry_aliases(client, MODEL) == {CHAMPION: winners[0], PREVIOUS_CHAMPION: v1}
    assert client.get_model_version(MODEL, loser).tags["promotion.status"] == "rejected"


def test_lock_held_by_another_process_blocks_promotion(registry):
    client, add, lock = registry
    v1 = add(first_version_tags())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from rlhf.registry.promotion import promotion_lock\n"
                "with promotion_lock(Path(sys.argv[1]), 5):\n    print('locked', flush=True); time.sleep(30)"
            ),
            str(lock),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PromotionError, match="another promotion or rollback holds"):
            promote_version(client, MODEL, v1, PromotionConfig(lock_timeout_s=0.3), lock)
        assert registry_aliases(client, MODEL) == {}
    finally:
        holder.kill()
        holder.wait()
    assert promote_version(client, MODEL, v1, CFG, lock).promoted  # freed when the holder died


# ------------------------------------------------------------------------------- Prefect flows
@pytest.mark.slow
def test_promote_flow_pauses_for_approval_and_resumes_with_the_reviewers_input(prefect_harness, registry):
    from prefect import get_client
    from prefect.flow_runs import resume_flow_run

    from flows.promote import promote, rollback

    client, add, lock = registry
    v1 = add(first_version_tags())
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(
            outcome=promote(MODEL, "latest", PromotionConfig(require_approval=True, approval_timeout_s=120))
        )
    )
    runner.start()
    with get_client(sync_client=True) as prefect:
        deadline = time.monotonic() + 90
        paused = []
        while not paused and time.monotonic() < deadline:
            time.sleep(0.5)
            paused = [r for r in prefect.read_flow_runs() if r.state and r.state.is_paused()]
        assert paused, "the promote flow never paused for approval"
        assert registry_aliases(client, MODEL) == {CHALLENGER: v1}
        resume_flow_run(paused[0].id, run_input={"approved": True, "reviewer": "dana", "comment": "ok"})
    runner.join(timeout=90)
    assert result["outcome"].promoted and registry_aliases(client, MODEL) == {CHAMPION: v1}
    assert client.get_model_version(MODEL, v1).tags["promotion.approved_by"] == "dana"
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(MODEL)
