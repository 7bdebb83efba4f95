"""Promotion and rollback of registered policy versions: gates, alias moves, a lock.

A registered version carries its evidence as tags (tasks/register.py): the
evaluation (``eval.*``), the reward-hacking flags (``hacking.*``) and the data
validation result (``validation.success``). Promotion checks the gates on those
tags (pure functions below), then moves the registry aliases:

- pass: ``challenger`` -> the version, then (after an optional human approval)
  ``champion`` -> the version and ``previous-champion`` -> the old champion;
- fail: the version is tagged ``promotion.status=rejected`` with
  ``promotion.reasons``, and no alias moves.

Every version that was ever crowned records the champion it replaced
(``promotion.previous_champion``), so rollback can walk back more than one step.

Two promotions at once cannot both win: every read-check-move of the aliases
happens under an exclusive ``fcntl`` file lock beside the local store (or in
``PromotionConfig.lock_dir``), and the champion gate requires the win rate to
have been measured against the champion of *now*, so the loser of a race is
rejected as stale rather than crowned on outdated evidence.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from rlhf.config import PromotionConfig
from rlhf.evaluation.hacking import FLAGS as HACKING_FLAGS
from rlhf.evaluation.stats import wilson_interval

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict and why."""

    name: str
    passed: bool
    detail: str

    def tag(self) -> str:
        """The value of the ``gate.<name>`` tag."""
        return f"{'pass' if self.passed else 'fail'}: {self.detail}"


@dataclass(frozen=True)
class Approval:
    """A reviewer's decision on a challenger."""

    approved: bool
    reviewer: str = ""
    comment: str = ""


@dataclass(frozen=True)
class PromotionOutcome:
    """What a promotion did: promoted or not, why, and the aliases after it."""

    model_name: str
    version: str
    promoted: bool
    status: str
    reasons: tuple[str, ...]
    champion: str | None
    previous_champion: str | None
    gates: tuple[GateResult, ...] = ()
    """Every gate's verdict (empty when the gates were not checked: the version already is champion)."""


@dataclass(frozen=True)
class RollbackOutcome:
    """The champion before and after a rollback."""

    model_name: str
    rolled_back: str
    champion: str
    previous_champion: str | None


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot proceed; the message says what to do."""


# -------------------------------------------------------------------------------------- gates
def _number(tags: dict[str, str], key: str) -> float | None:
    """A numeric tag, or None when missing or not a number."""
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def gate_win_rate_vs_champion(tags: dict[str, str], champion: str | None, cfg: PromotionConfig) -> GateResult:
    """The lower bound of the win rate against the current champion must exceed the threshold."""
    name = "win_rate_vs_champion"
    measured_against = tags.get("eval.champion_version")
    if measured_against is None:
        return GateResult(
            name, False, "no eval.champion_version tag: evaluate this version with the pipeline's evaluate stage"
        )
    if measured_against != (champion or "none"):
        return GateResult(
            name,
            False,
            f"win rate was measured against champion {measured_against} but the champion is now {champion or 'none'}: re-evaluate against the current champion",
        )
    if champion is None:
        return GateResult(name, True, "no champion yet")
    low = _number(tags, "eval/win_rate_vs_champion_low")
    if low is None:
        return GateResult(name, False, "no eval/win_rate_vs_champion_low tag: re-run the evaluate stage")
    verdict = ">" if low > cfg.min_win_rate_vs_champion_low else "<="
    return GateResult(
        name,
        low > cfg.min_win_rate_vs_champion_low,
        f"lower bound {low:.3f} {verdict} {cfg.min_win_rate_vs_champion_low:.3f} against champion v{champion}",
    )


def gate_win_rate_vs_sft(tags: dict[str, str], cfg: PromotionConfig) -> GateResult:
    """The lower bound of the win rate against SFT must exceed the threshold."""
    low = _number(tags, "eval/win_rate_vs_sft_low")
    if low is None:
        return GateResult("win_rate_vs_sft", False, "no eval/win_rate_vs_sft_low tag: re-run the evaluate stage")
    verdict = ">" if low > cfg.min_win_rate_vs_sft_low else "<="
    return GateResult(
        "win_rate_vs_sft",
        low > cfg.min_win_rate_vs_sft_low,
        f"lower bound {low:.3f} {verdict} {cfg.min_win_rate_vs_sft_low:.3f}",
    )


def gate_kl(tags: dict[str, str], cfg: PromotionConfig) -> GateResult:
    """The held-out KL to SFT must be within the budget."""
    kl = _number(tags, "eval/kl_mean")
    if kl is None:
        return GateResult("kl_budget", False, "no eval/kl_mean tag: re-run the evaluate stage")
    limit = cfg.max_kl if cfg.max_kl is not None else _number(tags, "eval/kl_budget")
    if limit is None:
        return GateResult(
            "kl_budget",
            False,
            "the version has no eval/kl_budget tag (trained without ppo.kl_budget): set promotion.max_kl",
        )
    verdict = "<=" if kl <= limit else ">"
    return GateResult("kl_budget", kl <= limit, f"KL {kl:.3f} {verdict} {limit:g} nats")


def gate_violation_rate(tags: dict[str, str], champion: str | None, cfg: PromotionConfig) -> GateResult:
    """The policy-violation rate must not exceed the one of the model it replaces (the champion's, measured on
    the same prompts; SFT's while there is no champion) by more than ``max_violation_increase``."""
    name = "violation_rate"
    rate, n = _number(tags, "eval/violation_rate"), _number(tags, "eval/num_samples")
    if rate is None or n is None:
        return GateResult(name, False, "no eval/violation_rate tag: re-run the evaluate stage")
    key, who = (
        ("eval/champion_violation_rate", f"champion v{champion}") if champion else ("eval/sft_violation_rate", "SFT")
    )
    baseline = _number(tags, key)
    if baseline is None:
        return GateResult(name, False, f"no {key} tag: re-evaluate this version against the current champion")
    low, high = wilson_interval(rate * n, int(n))
    limit = baseline + cfg.max_violation_increase
    verdict = "<=" if rate <= limit else ">"
    return GateResult(
        name,
        rate <= limit,
        f"{rate:.3f} (95% CI {low:.3f}-{high:.3f}) {verdict} {who}'s {baseline:.3f}"
        + (f" + {cfg.max_violation_increase:g}" if cfg.max_violation_increase else ""),
    )


def gate_no_hacking(tags: dict[str, str], cfg: PromotionConfig) -> GateResult:
    """No reward-hacking flag on the version (and, if configured, on its PPO run)."""
    keys = [f"hacking.{f}" for f in HACKING_FLAGS]
    if cfg.block_on_run_flags:
        keys += [f"hacking.run.{f}" for f in HACKING_FLAGS]
    if not any(k in tags for k in keys):
        return GateResult(
            "no_hacking", False, "no hacking.* tags: evaluate this version with the pipeline's evaluate stage"
        )
    raised = [k for k in keys if tags.get(k) == "true"]
    return GateResult("no_hacking", not raised, f"flagged: {', '.join(raised)}" if raised else "no flag raised")


def gate_validation(tags: dict[str, str], cfg: PromotionConfig) -> GateResult:
    """The pipeline run's data validation must have passed."""
    value = tags.get("validation.success")
    if not cfg.require_validation:
        return GateResult("validation", True, "not required")
    if value is None:
        return GateResult(
            "validation",
            False,
            "no validation.success tag: register versions through the pipeline, which validates the data first",
        )
    return GateResult("validation", value == "true", f"validation.success={value}")


def evaluate_gates(tags: dict[str, str], champion: str | None, cfg: PromotionConfig) -> list[GateResult]:
    """Every gate's verdict on a version's tags, given the current champion."""
    return [
        gate_validation(tags, cfg),
        gate_win_rate_vs_sft(tags, cfg),
        gate_win_rate_vs_champion(tags, champion, cfg),
        gate_kl(tags, cfg),
        gate_violation_rate(tags, champion, cfg),
        gate_no_hacking(tags, cfg),
    ]


# --------------------------------------------------------------------------------------- lock
def lock_path(registry_uri: str, model_name: str, lock_dir: str | None = None, purpose: str = "promote") -> Path:
    """The lock file for promotions (or, with purpose="register", registrations) of one model: in lock_dir,
    else beside a local store."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
    if lock_dir is not None:
        return Path(lock_dir) / f"{safe}.{purpose}.lock"
    parsed = urlparse(registry_uri)
    if parsed.scheme == "sqlite":
        store = Path(unquote(registry_uri.removeprefix("sqlite:///")))  # sqlite:////abs or sqlite:///relative
        return store.resolve().parent / f"{store.name}.{safe}.{purpose}.lock"
    if parsed.scheme in ("", "file"):
        folder = Path(unquote(parsed.path if parsed.scheme == "file" else registry_uri))
        return folder.resolve() / f"{safe}.{purpose}.lock"
    raise PromotionError(
        f"the registry {registry_uri!r} is remote, so no local lock file can guard it: set the promotion "
        "config's lock_dir to a folder every promoter shares, or run promotions only through the Prefect "
        "deployment with concurrency_limit: 1"
    )


def promotion_lock(path: Path, timeout_s: float) -> AbstractContextManager[None]:
    """The lock of promotions and rollbacks of one model (see registry_lock)."""
    return registry_lock(path, timeout_s, "promotion or rollback")


@contextmanager
def registry_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on path (across processes); the OS frees it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PromotionError(
                        f"another {what} holds {path} for more than {timeout_s:g} s: wait for it "
                        "to finish (the lock is released when its process exits) or raise lock_timeout_s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- registry
def registry_aliases(client, model_name: str) -> dict[str, str]:
    """alias -> version of a registered model; empty when the model is not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


def resolve_version(client, model_name: str, version: str) -> str:
    """The version number itself, or the newest version for 'latest'."""
    if version != "latest":
        return str(version)
    versions = client.search_model_versions(f"name = '{model_name}'")
    if not versions:
        raise PromotionError(
            f"{model_name} has no registered versions: run the training pipeline first (`rlhf run`, or make demo)"
        )
    return str(max(int(v.version) for v in versions))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _set_tags(client, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _reject(client, name: str, version: str, reasons: list[str], aliases: dict[str, str]) -> PromotionOutcome:
    """Tag the version rejected with its reasons; drop the challenger alias if it is ours."""
    if aliases.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    _set_tags(
        client,
        name,
        version,
        {
            "promotion.status": "rejected",
            "promotion.reasons": "; ".join(reasons),
            "promotion.decided_at": _now(),
        },
    )
    return PromotionOutcome(
        name, version, False, "rejected", tuple(reasons), aliases.get(CHAMPION), aliases.get(PREVIOUS_CHAMPION)
    )


def _crown(client, name: str, version: str, champion: str | None, approved_by: str) -> PromotionOutcome:
    """Move champion to the version and previous-champion to the old champion."""
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion)
        _set_tags(client, name, champion, {"promotion.status": "retired"})
    client.set_registered_model_alias(name, CHAMPION, version)
    if registry_aliases(client, name).get(CHALLENGER) == version:  # another version awaiting approval keeps it
        client.delete_registered_model_alias(name, CHALLENGER)
    _set_tags(
        client,
        name,
        version,
        {
            "promotion.status": "champion",
            "promotion.previous_champion": champion or "none",
            "promotion.decided_at": _now(),
            "promotion.approved_by": approved_by,
            "promotion.reasons": "",
        },
    )
    return PromotionOutcome(name, version, True, "champion", (), version, champion)


def promote_version(
    client,
    model_name: str,
    version: str,
    cfg: PromotionConfig,
    lock: Path,
    approve: Callable[[str], Approval] | None = None,
) -> PromotionOutcome:
    """Gate a version; on pass make it challenger, then (after approve, if given) champion."""
    version = str(version)
    # 1. Under the lock: check the gates against the champion of now; reject or make challenger.
    with promotion_lock(lock, cfg.lock_timeout_s):
        tags = dict(client.get_model_version(model_name, version).tags)
        aliases = registry_aliases(client, model_name)
        champion = aliases.get(CHAMPION)
        if champion == version:
            return PromotionOutcome(
                model_name,
                version,
                False,
                "champion",
                ("already the champion",),
                champion,
                aliases.get(PREVIOUS_CHAMPION),
            )
        gates = evaluate_gates(tags, champion, cfg)
        _set_tags(client, model_name, version, {f"gate.{g.name}": g.tag() for g in gates})
        failed = [f"{g.name}: {g.detail}" for g in gates if not g.passed]
        if failed:
            return replace(_reject(client, model_name, version, failed, aliases), gates=tuple(gates))
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        _set_tags(client, model_name, version, {"promotion.status": "challenger"})
        if approve is None:
            return replace(_crown(client, model_name, version, champion, approved_by="gates"), gates=tuple(gates))

    # 2. Outside the lock: a reviewer may take hours, and other promotions must not wait on them.
    decision = approve(version)

    # 3. Under the lock again: the champion must not have moved while we waited.
    with promotion_lock(lock, cfg.lock_timeout_s):
        aliases = registry_aliases(client, model_name)
        reviewer = decision.reviewer.strip()
        if decision.approved and not reviewer:
            outcome = _reject(
                client,
                model_name,
                version,
                ["approval: approved without a reviewer's name: the reviewer must give their name to approve"],
                aliases,
            )
        elif not decision.approved:
            who = reviewer or "the reviewer"
            outcome = _reject(
                client,
                model_name,
                version,
                [f"approval: not approved by {who}: {decision.comment or 'no comment'}"],
                aliases,
            )
        elif aliases.get(CHAMPION) != champion:
            moved = f"the champion moved from {champion or 'none'} to {aliases.get(CHAMPION) or 'none'} while awaiting approval"
            outcome = _reject(
                client,
                model_name,
                version,
                [f"win_rate_vs_champion: {moved}: re-evaluate against the new champion"],
                aliases,
            )
        else:
            outcome = _crown(client, model_name, version, champion, approved_by=reviewer)
        return replace(outcome, gates=tuple(gates))


def rollback_champion(client, model_name: str, lock: Path, lock_timeout_s: float) -> RollbackOutcome:
    """Move champion back to previous-champion; previous-champion steps one further back."""
    with promotion_lock(lock, lock_timeout_s):
        aliases = registry_aliases(client, model_name)
        current, target = aliases.get(CHAMPION), aliases.get(PREVIOUS_CHAMPION)
        if current is None:
            raise PromotionError(f"{model_name} has no champion to roll back: promote a version first")
        if target is None:
            raise PromotionError(
                f"{model_name} has no previous champion recorded: promote the version you want back with the promote flow"
            )
        client.set_registered_model_alias(model_name, CHAMPION, target)
        _set_tags(client, model_name, current, {"promotion.status": "rolled_back", "promotion.rolled_back_at": _now()})
        _set_tags(client, model_name, target, {"promotion.status": "champion"})
        older = client.get_model_version(model_name, target).tags.get("promotion.previous_champion", "none")
        if older in ("none", current):
            client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
            older = None
        else:
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, older)
        return RollbackOutcome(model_name, current, target, older)
