"""The baseline profile stored with each model version: what the champion's traffic looked like at registration.

A profile is a JSON document (``profile.json``) plus the prompt-embedding sample
(``embeddings.npz``). It keeps raw per-sample values where a two-sample test needs
them (reward scores, lengths, NLL, KL, gold) and counts where a divergence needs
them (tokens, intents). No MLflow here: tasks/baseline.py logs and loads it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rlhf.drift import stats
from rlhf.drift.features import PromptFeatures, ResponseFeatures
from rlhf.infra.tracking import download

SCHEMA_VERSION = 1
PROFILE_FILE = "profile.json"
EMBEDDINGS_FILE = "embeddings.npz"
EMBEDDING_METHOD = "reference-model mean-pooled last hidden state"


@dataclass
class Baseline:
    """A baseline profile (JSON-serialisable) and its prompt-embedding sample (M, H)."""

    profile: dict
    embeddings: np.ndarray

    def save(self, out_dir: str | Path) -> Path:
        """Write profile.json and embeddings.npz into out_dir; returns the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / PROFILE_FILE).write_text(json.dumps(self.profile, indent=1))
        np.savez_compressed(out / EMBEDDINGS_FILE, embeddings=self.embeddings.astype(np.float32))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Baseline:
        """Read a folder written by save(); raises naming the fix when it is not a baseline."""
        folder = Path(folder)
        if not (folder / PROFILE_FILE).is_file() or not (folder / EMBEDDINGS_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} holds no {PROFILE_FILE} and {EMBEDDINGS_FILE}: compute the baseline at registration "
                "(tasks/baseline.py run_baseline) or point baseline.uri at its folder"
            )
        profile = json.loads((folder / PROFILE_FILE).read_text())
        if profile.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"baseline schema {profile.get('schema_version')} is not {SCHEMA_VERSION}: recompute it with run_baseline"
            )
        with np.load(folder / EMBEDDINGS_FILE) as data:
            embeddings = data["embeddings"].astype(np.float64)
        return cls(profile, embeddings)

    def array(self, section: str, key: str) -> np.ndarray:
        """A stored per-sample list as a float array (nan kept)."""
        return np.asarray(self.profile[section][key], dtype=np.float64)


def _summary(values: np.ndarray) -> dict[str, float]:
    """Mean, std and quartiles of the finite values."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return {
            "mean": float("nan"),
            "std": float("nan"),
            "p25": float("nan"),
            "p50": float("nan"),
            "p75": float("nan"),
        }
    q = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "p25": float(q[0]),
        "p50": float(q[1]),
        "p75": float(q[2]),
    }


def _floats(values: np.ndarray) -> list[float | None]:
    """A float array as a JSON list (nan -> None)."""
    return [float(x) if np.isfinite(x) else None for x in values]


def build_profile(
    prompts: PromptFeatures,
    embeddings: np.ndarray,
    responses: ResponseFeatures,
    kl: np.ndarray,
    models: dict[str, str],
    generation: dict[str, float],
    feedback_probability: Callable[[float], float] | None = None,
) -> Baseline:
    """Assemble the profile from features of the baseline prompts and the champion's sampled responses.

    ``feedback_probability`` (the task's simulated users: gold reward -> P(thumbs up))
    gives the expected positive-feedback rate of the champion's answers.
    """
    if len(embeddings) < 2:
        raise ValueError("a baseline needs at least two embedded prompts: pass more prompts")
    n = len(responses.rm_scores)
    gold = responses.gold
    profile = {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "models": dict(models),
        "generation": dict(generation),
        "prompts": {
            "n": len(prompts.intents),
            "token_counts": prompts.token_counts,
            "token_ids": prompts.token_ids,
            "intent_counts": {i: prompts.intents.count(i) for i in sorted(set(prompts.intents))},
            "lengths": _floats(prompts.lengths),
            "length": _summary(prompts.lengths),
        },
        "embeddings": {
            "method": EMBEDDING_METHOD,
            "n": int(len(embeddings)),
            "dim": int(embeddings.shape[1]),
            "bandwidth": stats.median_bandwidth(embeddings),
            "mean_norm": float(np.linalg.norm(embeddings.mean(0))),
        },
        "responses": {
            "n": n,
            "rm_scores": _floats(responses.rm_scores),
            "rm_score": _summary(responses.rm_scores),
            "lengths": _floats(responses.lengths),
            "length": _summary(responses.lengths),
            "nll": _floats(responses.nll),
            "nll_summary": _summary(responses.nll),
            "refusals": int(responses.refusal.sum()),
            "refusal_rate": float(responses.refusal.mean()),
            "violations": int(responses.violation.sum()),
            "violation_rate": float(responses.violation.mean()),
            "gold": None if gold is None else _floats(gold),
            "gold_summary": None if gold is None else _summary(gold),
            "feedback_positive_rate": (
                None
                if gold is None or feedback_probability is None
                else float(np.mean([feedback_probability(g) for g in gold]))
            ),
        },
        "kl": {"values": _floats(kl), **_summary(kl)},
    }
    return Baseline(profile, np.asarray(embeddings, dtype=np.float64))


def load_baseline(uri: str) -> Baseline:
    """The baseline at a ``runs:/<run>/baseline`` (or any artifact) URI."""
    with tempfile.TemporaryDirectory(prefix="rlhf-baseline-") as scratch:
        return Baseline.load(download(uri, scratch))
