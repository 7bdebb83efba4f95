"""Stage `feedback-data` (and the feedback flow's start): the champion to continue from, and the preference data
merged with the feedback batches it has not learned from yet.

- ``champion_start``: the registered champion's policy checkpoint (the new run starts there and is KL-held to it),
  its reference checkpoint (the reward model's trunk) and the batches its lineage says it learned from
  (tag ``lineage.feedback_batches``).
- ``run_feedback_data``: every validated batch under ``feedback.dir`` (or those ``feedback.batches`` names) plus
  those the champion learned, their pairs deduplicated (against each other and the base preference data) and
  stripped of held-out prompts (evaluation must stay unseen), written as ``feedback_pairs.jsonl`` (with provenance)
  and merged into ``preferences.jsonl`` for the validate stage. The stage run logs each batch and the merged file
  as dataset inputs, the counts and the raters' agreement (``feedback/*``) and the batch names as tags.
- ``run_replay``: after the validation gate, the feedback pairs of the validated preference data repeated
  ``feedback.replay`` times in all (the gate refuses repeats, so this comes after it), for the reward model: it then
  draws the on-policy pairs that many times as often as the off-policy ones (``feedback/replay``,
  ``feedback/train_share`` on the flow's parent run).
- ``run_start``: the champion's policy (with its value head) logged as the checkpoint of this run's ``sft`` stage
  run, so the new version's lineage (reference = the policy it was held to) reads as every other version's.
- ``continued_config``: the configuration of the policy stage that continues from the champion (``feedback.ent_coef``
  as PPO's entropy bonus).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.drift.lineage import resolve_lineage
from rlhf.feedback.batches import PAIRS_FILE, agreement_metrics, list_batches, read_jsonl, read_manifest, read_rankings
from rlhf.feedback.pairs import pair_key, prompt_key, replay_pairs
from rlhf.infra.integrity import MANIFEST, fingerprint_path
from rlhf.infra.tracking import download, log_checkpoint, log_dataset_input, stage_run
from rlhf.ppo.trainer import OPTIMIZER_FILE, RNG_FILE, STATE_FILE
from rlhf.registry.promotion import CHAMPION
from tasks.common import SFT, Checkpoint

FEEDBACK_DATA = "feedback-data"
FEEDBACK_BATCHES_TAG = "lineage.feedback_batches"
"""Model-version tag: the feedback batches (comma-separated) the version learned from, its champion's included."""
TRAINING_ONLY = (OPTIMIZER_FILE, RNG_FILE, STATE_FILE, MANIFEST, "training_args.bin")
"""Files of a policy checkpoint that resume its training: the continued run starts a fresh optimizer, but keeps the
champion's value head (a fresh one gives the first updates advantages from a zero baseline; carried, the continued
run ended higher in gold in the measurement of docs/feedback.md)."""


class NoNewFeedback(RuntimeError):
    """No validated feedback batch that the champion has not learned from; the message says how to get one."""


@dataclass(frozen=True)
class ChampionStart:
    """The version the feedback run continues from."""

    model_uri: str
    """``models:/<name>/<version>``."""
    policy_uri: str
    reference: Checkpoint
    """Its reference policy (SFT, or the policy an earlier feedback run continued from): the reward model's trunk."""
    learned_batches: tuple[str, ...]


@dataclass(frozen=True)
class FeedbackData:
    """The merged preference data and what went into it."""

    preferences_path: str
    """Base preference pairs + every learned feedback pair (TRL columns), for the validate stage."""
    feedback_path: str
    """The feedback pairs alone, with provenance."""
    batches: tuple[str, ...]
    """Every batch merged (the champion's and the new ones): the new version's ``lineage.feedback_batches``."""
    new_batches: tuple[str, ...]
    metrics: dict[str, float]


def champion_start(cfg: PipelineConfig) -> ChampionStart:
    """The champion of ``cfg.registered_model`` and its lineage; LineageError naming the fix when there is none."""
    client = MlflowClient()
    lineage = resolve_lineage(client, cfg.registered_model, alias=CHAMPION)
    tags = client.get_model_version(lineage.model_name, lineage.version).tags or {}
    learned = tuple(b for b in tags.get(FEEDBACK_BATCHES_TAG, "").split(",") if b)
    return ChampionStart(
        f"models:/{lineage.model_name}/{lineage.version}",
        lineage.policy_uri,
        Checkpoint(lineage.stage_runs[SFT], lineage.reference_uri),
        learned,
    )


def select_batches(cfg: PipelineConfig, learned: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """(batch folders to merge, names of batches refused by the validation gate and so left out)."""
    root = Path(cfg.feedback.dir)
    found = {p.name: p for p in list_batches(root)}
    wanted = list(cfg.feedback.batches) if cfg.feedback.batches is not None else list(found)
    missing = [b for b in [*learned, *wanted] if b not in found]
    if missing:
        raise FileNotFoundError(
            f"feedback batches {missing} are not in {root}: point feedback.dir at the folder that holds them "
            "(`rlhf label` and `rlhf monitor` write there), or name existing batches in feedback.batches"
        )
    chosen, refused = [], []
    for name in dict.fromkeys([*learned, *wanted]):
        manifest = read_manifest(found[name])
        if manifest.validated:
            chosen.append(found[name])
        elif name in learned:
            raise ValueError(f"batch {name}, which the champion learned from, no longer passes validation: restore it")
        else:
            refused.append(name)
    return chosen, refused


def run_feedback_data(
    cfg: PipelineConfig,
    start: ChampionStart,
    base_preferences: str,
    heldout_paths: list[str],
    out_dir: str,
    parent_run_id: str,
) -> FeedbackData:
    """Merge the feedback batches into the preference data; raise NoNewFeedback when none is new."""
    with stage_run(parent_run_id, FEEDBACK_DATA, {"continued_from": start.model_uri, "feedback.dir": cfg.feedback.dir}):
        # 1. the batches: the champion's and every validated new one
        folders, refused = select_batches(cfg, start.learned_batches)
        names = tuple(f.name for f in folders)
        new = tuple(n for n in names if n not in start.learned_batches)
        mlflow.log_metric("feedback/batches_refused", len(refused))
        if not new:
            raise NoNewFeedback(
                f"no validated feedback batch in {cfg.feedback.dir} that {start.model_uri} has not learned from "
                f"(it learned {len(start.learned_batches)}; refused by validation: {refused or 'none'}): rank samples "
                "with `rlhf label` and press Validate, or monitor traffic with feedback (`rlhf monitor`), then run again"
            )
        # 2. their pairs, less held-out prompts and repeats (of each other and of the base data)
        heldout = {prompt_key(p) for path in heldout_paths for p in load_split(path)["prompt"]}
        base = [dict(r) for r in load_split(base_preferences)]
        seen = {pair_key(r["prompt"], r["chosen"], r["rejected"]) for r in base}
        rows, dropped_heldout, dropped_repeat = [], 0, 0
        for folder in folders:
            log_dataset_input(folder / PAIRS_FILE, folder.name, read_manifest(folder).fingerprint or None)
            for row in read_jsonl(folder / PAIRS_FILE):
                key = pair_key(row["prompt"], row["chosen"], row["rejected"])
                if prompt_key(row["prompt"]) in heldout:
                    dropped_heldout += 1
                elif key in seen:
                    dropped_repeat += 1
                else:
                    seen.add(key)
                    rows.append(row)
        # 3. the feedback pairs with provenance, and the merged training pairs
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        feedback_path, merged_path = out / "feedback_pairs.jsonl", out / "preferences.jsonl"
        feedback_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        merged = [*base, *({k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows)]
        merged_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged), encoding="utf-8")
        log_dataset_input(feedback_path, "feedback", fingerprint_path(feedback_path))
        # 4. counts, agreement, lineage
        new_rows = sum(1 for r in rows if r["batch"] in new)
        rankings = [r for f in folders for r in read_rankings(f)]
        metrics = {
            "feedback/batches": float(len(names)),
            "feedback/new_batches": float(len(new)),
            "feedback/pairs": float(len(rows)),
            "feedback/new_pairs": float(new_rows),
            "feedback/ranking_pairs": float(sum(1 for r in rows if r["source"] == "ranking")),
            "feedback/production_pairs": float(sum(1 for r in rows if r["source"] == "production")),
            "feedback/heldout_dropped": float(dropped_heldout),
            "feedback/duplicates_dropped": float(dropped_repeat),
            **agreement_metrics(rankings),
        }
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"feedback.batches": ",".join(names), "feedback.new_batches": ",".join(new)})
        return FeedbackData(str(merged_path), str(feedback_path), names, new, metrics)


def run_replay(cfg: PipelineConfig, preferences_path: str, feedback_path: str, out_dir: str, parent_run_id: str) -> str:
    """The reward model's training pairs: the validated preferences with their feedback pairs replayed
    ``feedback.replay`` times in all; the path written (the validated file itself when replay is 1)."""
    rows = read_jsonl(Path(preferences_path))
    train, feedback_rows = replay_pairs(rows, read_jsonl(Path(feedback_path)), cfg.feedback.replay)
    MlflowClient().log_batch(
        parent_run_id,
        metrics=[
            Metric("feedback/replay", float(cfg.feedback.replay), int(time.time() * 1000), 0),
            Metric("feedback/train_share", feedback_rows / len(train) if train else 0.0, int(time.time() * 1000), 0),
        ],
    )
    if cfg.feedback.replay == 1:
        return preferences_path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "preferences.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
    return str(path)


def run_start(start: ChampionStart, parent_run_id: str) -> Checkpoint:
    """Log the champion's policy (weights and tokenizer, no training state) as this run's ``sft`` checkpoint: the
    policy the new run starts from and is KL-held to."""
    with stage_run(parent_run_id, SFT, {"continued_from": start.model_uri, "policy_uri": start.policy_uri}) as run:
        mlflow.set_tag("rlhf.continued_from", start.model_uri)
        with tempfile.TemporaryDirectory(prefix="rlhf-feedback-start-") as scratch:
            policy = Path(download(start.policy_uri, scratch))
            clean = Path(scratch) / "checkpoint"
            shutil.copytree(policy, clean, ignore=shutil.ignore_patterns(*TRAINING_ONLY))
            return Checkpoint(run.info.run_id, log_checkpoint(clean, "checkpoint"))


def continued_config(cfg: PipelineConfig) -> PipelineConfig:
    """The configuration of the policy stage that continues from the champion: ``feedback.ent_coef`` is PPO's
    entropy bonus (``ppo.ent_coef`` is for a run from SFT)."""
    return cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"ent_coef": cfg.feedback.ent_coef})})


def tag_feedback_lineage(model_name: str, version: str, batches: tuple[str, ...]) -> None:
    """Name on the version every feedback batch it learned from."""
    MlflowClient().set_model_version_tag(model_name, version, FEEDBACK_BATCHES_TAG, ",".join(batches))


@task(name="champion-start", cache_policy=NO_CACHE)
def champion_start_task(cfg: PipelineConfig) -> ChampionStart:
    """The champion to continue from."""
    return champion_start(cfg)


@task(name=FEEDBACK_DATA, cache_policy=NO_CACHE)
def feedback_data_task(
    cfg: PipelineConfig,
    start: ChampionStart,
    base_preferences: str,
    heldout_paths: list[str],
    out_dir: str,
    parent_run_id: str,
) -> FeedbackData:
    """Merge new feedback batches into the preference data."""
    return run_feedback_data(cfg, start, base_preferences, heldout_paths, out_dir, parent_run_id)


@task(name="feedback-replay", cache_policy=NO_CACHE)
def replay_task(
    cfg: PipelineConfig, preferences_path: str, feedback_path: str, out_dir: str, parent_run_id: str
) -> str:
    """The reward model's training pairs, feedback pairs replayed."""
    return run_replay(cfg, preferences_path, feedback_path, out_dir, parent_run_id)


@task(name="feedback-start", cache_policy=NO_CACHE)
def start_task(start: ChampionStart, parent_run_id: str) -> Checkpoint:
    """The champion's policy as this run's starting checkpoint."""
    return run_start(start, parent_run_id)


@task(name="feedback-lineage", cache_policy=NO_CACHE)
def feedback_lineage_task(model_name: str, version: str, batches: tuple[str, ...]) -> None:
    """Tag the new version with its feedback batches."""
    tag_feedback_lineage(model_name, version, batches)
