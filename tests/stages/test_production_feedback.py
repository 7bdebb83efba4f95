"""The monitor turns a traffic window's thumbs up/down into a validated batch of preference pairs."""

from __future__ import annotations

import json

import pandas as pd

from rlhf.feedback.batches import PAIRS_FILE, read_manifest
from tasks.monitor import TrafficWindow, collect_production_feedback


def test_thumbs_on_equivalent_prompts_become_a_validated_batch(tmp_path):
    rows = pd.DataFrame(
        {
            "timestamp": [
                "2026-01-01T00:00:00+00:00",
                "2026-01-01T00:01:00+00:00",
                "2026-01-01T00:02:00+00:00",
                "2026-01-01T00:03:00+00:00",
                "2026-01-01T00:04:00+00:00",
            ],
            "prompt": [
                "Customer: Where is my lamp?\nAgent:",
                "Customer: where is my lamp\nAgent:",
                "Customer: Where is my lamp?\nAgent:",
                "Customer: I forgot my password.\nAgent:",
                "Customer: I forgot my password.\nAgent:",
            ],
            "response": [
                " It will arrive in two days.",
                " Please contact ann@example.com.",
                " No.",
                " I sent a reset link.",
                " Whatever.",
            ],
            "model_version": ["3", "3", "3", "3", "3"],
            "feedback": [1.0, 0.0, None, 1.0, 0.0],
        }
    )
    window = TrafficWindow(str(tmp_path / "window_0007.jsonl"), 7)
    folder = collect_production_feedback(rows, window, str(tmp_path / "feedback"))
    assert folder is not None and folder.name.startswith("production-window_0007-")
    manifest = read_manifest(folder)
    assert manifest.validated, manifest.failures
    assert (manifest.pairs, manifest.source, manifest.model_version) == (2, "production", "3")
    pairs = [json.loads(line) for line in (folder / PAIRS_FILE).read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (" It will arrive in two days.", " Please contact [EMAIL]."),  # redacted before it is written
        (" I sent a reset link.", " Whatever."),
    ]
    assert collect_production_feedback(rows.assign(feedback=None), window, str(tmp_path / "other")) is None
    assert collect_production_feedback(rows, window, None) is None
