"""The built-in support task's knowledge (intents, rudeness, gold judge) and the data it implies.

The stages ask ``task_knowledge(cfg.data)`` once and pass the result down; the library
below never checks which task it runs on.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.builtin import support
from rlhf.builtin.dataset import write_builtin_dataset
from rlhf.builtin.judge import GoldJudge, feedback_probability
from rlhf.config import DataConfig
from rlhf.data.loading import user_data_paths
from rlhf.evaluation.task import TaskKnowledge

SUPPORT_TASK = TaskKnowledge(
    name="support",
    classify_intent=support.classify_intent,
    answered_intents=support.answered_intents,
    rude_markers=support.RUDE_MARKERS,
    gold_score=GoldJudge().score,
    feedback_probability=feedback_probability,
)


def task_knowledge(data: DataConfig) -> TaskKnowledge | None:
    """The built-in task's knowledge when the data is the built-in data set, else None."""
    return SUPPORT_TASK if data.is_builtin else None


def resolve_data_paths(data: DataConfig, out_dir: str | Path, seed: int) -> dict[str, str]:
    """Split name -> file path (or Hub name) of every split: the built-in data set written under
    ``out_dir/data``, or the user's folder and per-split paths (``rlhf.data.loading.user_data_paths``)."""
    written = write_builtin_dataset(Path(out_dir) / "data", seed) if data.is_builtin else None
    return user_data_paths(data, {k: str(v) for k, v in written.items()} if written else None)
