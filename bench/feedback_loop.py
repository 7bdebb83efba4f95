"""Measurement: does one round of human feedback improve the model? (docs/feedback.md)

    PYTHONPATH=.:bench .venv/bin/python bench/feedback_loop.py [--prompts 200] [--k 4] [--config FILE] [--set K=V ...]

1. champion: `rlhf run` (the pipeline) in a fresh store under outputs/bench/feedback-<time>/; if its gates refuse
   the version, it is made champion by hand (said in the result) so the loop has a version to start from;
2. labelling: the simulated raters (rlhf.builtin.judge.NoisyRater: noisy, length-biased, the raters of the built-in
   preference data) rank k samples of the champion on N training prompts, a second rater on every fourth prompt
   (for the agreement figure); the rankings go through the same code as the page's (add_ranking, validate_batch);
3. before/after: the champion's own outputs on the held-out prompts (k samples each), every two with different gold
   scores ordered by the gold judge; the reward model's accuracy on those pairs, the champion's reward model
   against the one the feedback flow retrains;
4. the feedback flow, then its evaluation of the new version against the old champion under the gold judge.

Writes bench/results/feedback-loop-<time>.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import ROOT, WORK, git_commit, loadavg, machine


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return (c - h, c + h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="N prompts ranked (default 200)")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt (default 4)")
    parser.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts for RM accuracy (default 128)")
    parser.add_argument("--config", help="YAML preset for both runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", help="folder of the run (default outputs/bench/feedback-<time>); reused if it exists")
    args = parser.parse_args()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(args.work) if args.work else WORK / f"feedback-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.environ.setdefault("PREFECT_HOME", str(work / ".prefect"))
    os.chdir(work)

    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from models.reward import score_texts
    from rlhf.builtin.judge import GoldJudge, NoisyRater
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.config import load_config
    from rlhf.drift.features import sample_responses
    from rlhf.drift.lineage import resolve_lineage
    from rlhf.feedback.batches import (
        BatchManifest,
        add_ranking,
        agreement_metrics,
        batch_name,
        read_rankings,
        validate_batch,
    )
    from rlhf.feedback.pairs import Ranking
    from rlhf.infra.env import quiet_defaults
    from rlhf.infra.tracking import download
    from rlhf.registry.promotion import CHAMPION, registry_aliases
    from tasks.label import label_prompts, sample_items

    quiet_defaults()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    overrides = [
        *args.overrides,
        f"feedback.dir={work / 'feedback'}",
        f"feedback.k={args.k}",
        f"output_dir={work / 'outputs'}",
    ]
    cfg = load_config(args.config, overrides)
    client = MlflowClient()
    result: dict = {"commit": git_commit(), "machine": machine(), "loadavg_start": loadavg(), "args": vars(args)}
    timings: dict[str, float] = {}

    # 1. the champion
    t0 = time.monotonic()
    aliases = registry_aliases(client, cfg.registered_model)
    if CHAMPION not in aliases:
        from flows.pipeline import rlhf_pipeline

        first = rlhf_pipeline(cfg)
        result["pipeline_promoted"] = bool(first.promotion.promoted)
        if not first.promotion.promoted:
            version = first.model_uri.rsplit("/", 1)[-1]
            client.set_registered_model_alias(cfg.registered_model, CHAMPION, version)
        timings["pipeline_s"] = time.monotonic() - t0
    champion = resolve_lineage(client, cfg.registered_model, alias=CHAMPION)
    result["champion"] = f"models:/{champion.model_name}/{champion.version}"
    paths = resolve_data_paths(cfg.data, work / "data", cfg.seed)

    with tempfile.TemporaryDirectory() as scratch:
        policy_dir = str(download(champion.policy_uri, scratch + "/p"))
        tokenizer = load_tokenizer(policy_dir)
        old_rm = load_reward_model(
            str(download(champion.reward_model_uri, scratch + "/r")), tokenizer.pad_token_id
        ).eval()

        # 2. simulated raters rank k samples of the champion on N training prompts
        t0 = time.monotonic()
        prompts = label_prompts(paths["prompts"], args.prompts, cfg.seed)
        items = sample_items(
            policy_dir, prompts, args.k, cfg.feedback.max_new_tokens, cfg.feedback.temperature, cfg.seed
        )
        now = datetime.now(UTC)
        name = batch_name("label", result["champion"], now)
        folder = work / "feedback" / name
        manifest = BatchManifest(name, "ranking", result["champion"], now.isoformat(), origin="simulated raters")
        rng = random.Random(cfg.seed)
        rater = NoisyRater()
        for j, item in enumerate(items):
            for who in ("rater-a", "rater-b") if j % 4 == 0 else ("rater-a",):
                ranking = Ranking(
                    item.prompt_id,
                    item.prompt,
                    item.responses,
                    rater.rank(item.prompt, item.responses, rng),
                    who,
                    datetime.now(UTC).isoformat(),
                    result["champion"],
                    name,
                )
                manifest = add_ranking(folder, manifest, ranking)
        manifest = validate_batch(folder, manifest, cfg.validation)
        timings["labelling_s"] = time.monotonic() - t0
        result["batch"] = {
            "name": name,
            "rankings": manifest.rankings,
            "pairs": manifest.pairs,
            "duplicates_dropped": manifest.duplicates_dropped,
            "validated": manifest.validated,
            **agreement_metrics(read_rankings(folder)),
        }
        if not manifest.validated:
            raise SystemExit(f"the simulated batch failed validation: {manifest.failures}")

        # 3. the champion's own outputs on held-out prompts, ordered by the gold judge
        heldout = label_prompts(paths["heldout_prompts"], args.eval_prompts, cfg.seed + 1)
        policy = load_causal_lm(policy_dir).eval()
        torch.manual_seed(cfg.seed + 1)
        flat = [p for p in heldout for _ in range(args.k)]
        outs = sample_responses(policy, tokenizer, flat, cfg.feedback.max_new_tokens, cfg.feedback.temperature)
        judge = GoldJudge()
        pairs = []
        for j, p in enumerate(heldout):
            group = outs[j * args.k : (j + 1) * args.k]
            for a in range(args.k):
                for b in range(a + 1, args.k):
                    ga, gb = judge.score(p, group[a]), judge.score(p, group[b])
                    if ga != gb:
                        pairs.append((p, group[a], group[b]) if ga > gb else (p, group[b], group[a]))

        def accuracy(rm) -> tuple[int, int]:
            chosen = score_texts(rm, tokenizer, [x[0] for x in pairs], [x[1] for x in pairs])
            rejected = score_texts(rm, tokenizer, [x[0] for x in pairs], [x[2] for x in pairs])
            return int((chosen > rejected).sum()), len(pairs)

        before = accuracy(old_rm)

        # 4. the feedback flow
        from flows.feedback import rlhf_feedback

        t0 = time.monotonic()
        out = rlhf_feedback(cfg)
        timings["feedback_flow_s"] = time.monotonic() - t0
        new = resolve_lineage(client, cfg.registered_model, version=out.model_uri.rsplit("/", 1)[-1])
        new_rm = load_reward_model(str(download(new.reward_model_uri, scratch + "/n")), tokenizer.pad_token_id).eval()
        after = accuracy(new_rm)

    m = out.metrics
    result.update(
        {
            "new_version": out.model_uri,
            "promoted": bool(out.promotion.promoted),
            "rm_accuracy_on_champion_outputs": {
                "pairs": before[1],
                "before": before[0] / before[1],
                "before_ci95": wilson(*before),
                "after": after[0] / after[1],
                "after_ci95": wilson(*after),
            },
            "eval": {
                k: m[k] for k in sorted(m) if k.startswith(("eval/win_rate", "eval/gold", "eval/sft_gold", "eval/kl"))
            },
            "timings_s": timings,
            "loadavg_end": loadavg(),
        }
    )
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    path = ROOT / "bench" / "results" / f"feedback-loop-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
