"""Progress of long stages: a tqdm bar in the terminal and a Prefect progress artifact in the UI.

``StageProgress`` wraps tqdm; inside a Prefect flow or task run it also keeps a
progress artifact (key ``<stage>-progress``) at the same percentage, so the flow
run's Artifacts tab in the Prefect UI shows how far each stage is. Outside a run
it is a plain tqdm bar. ``TrainerProgress`` does the same for a Hugging Face
Trainer (SFT, reward model) as a callback.

    with StageProgress("ppo", total=cfg.ppo.steps) as progress:
        for _ in range(cfg.ppo.steps):
            metrics = trainer.step()
            progress.update(1, kl=f"{metrics['objective/kl']:.2f}")
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from uuid import UUID

from tqdm.auto import tqdm
from transformers import TrainerCallback

log = logging.getLogger(__name__)

MIN_ARTIFACT_INTERVAL_S = 2.0


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (artifacts need one)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(stage: str) -> str:
    """Prefect artifact key for a stage: lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-")
    if not slug:
        raise ValueError(f"stage name {stage!r} has no letters or digits: name the stage, e.g. 'ppo'")
    return f"{slug}-progress"


class StageProgress:
    """A tqdm bar over ``total`` units that mirrors its percentage to a Prefect progress artifact."""

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "step",
        initial: int = 0,
        min_interval_s: float = MIN_ARTIFACT_INTERVAL_S,
    ):
        if total < 1:
            raise ValueError(f"StageProgress({stage!r}) needs total >= 1, got {total}: pass the number of steps")
        self.stage, self.total, self.unit = stage, total, unit
        self.min_interval_s = min_interval_s
        self.bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, dynamic_ncols=True)
        self.artifact_id: UUID | None = None
        self._last_push = float("-inf")
        if in_prefect_run():
            self._push(force=True)

    @property
    def n(self) -> int:
        """Units done so far."""
        return int(self.bar.n)

    @property
    def percent(self) -> float:
        """Share done, 0-100, as the progress artifact shows it."""
        return min(100.0, 100.0 * self.n / self.total)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` units; keyword arguments appear after the bar (e.g. kl=0.12)."""
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)
        self._push()

    def close(self) -> None:
        """Close the bar and write the final percentage to the artifact."""
        self._push(force=True)
        self.bar.close()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _description(self) -> str:
        postfix = f" ({self.bar.postfix})" if self.bar.postfix else ""
        return f"{self.stage}: {self.n}/{self.total} {self.unit}s{postfix}"

    def _push(self, force: bool = False) -> None:
        """Create or update the artifact, at most every ``min_interval_s`` seconds unless forced."""
        if not in_prefect_run():
            return
        now = time.monotonic()
        if not force and now - self._last_push < self.min_interval_s:
            return
        self._last_push = now
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        # The artifact is a view of the bar: an API hiccup must not fail hours of training, so a
        # failed update is logged once and the bar carries on without the artifact.
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    self.percent, key=artifact_key(self.stage), description=self._description()
                )
            else:
                update_progress_artifact(self.artifact_id, self.percent, description=self._description())
        except Exception as e:  # noqa: BLE001 - see the comment above
            log.warning("progress artifact for %s disabled after an API error: %s", self.stage, e)
            self.min_interval_s = float("inf")


class TrainerProgress(TrainerCallback):
    """Hugging Face Trainer callback: a StageProgress over the optimizer steps, with the latest loss.

    Use it instead of the Trainer's own bar:
    ``trainer.remove_callback(transformers.trainer_callback.ProgressCallback)`` then
    ``trainer.add_callback(TrainerProgress("sft"))`` (or pass it in ``callbacks=[...]``).
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.progress: StageProgress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = StageProgress(self.stage, total=state.max_steps, initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step - self.progress.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()
            self.progress = None
