"""Measurement: does one round of human feedback improve the model? (docs/feedback.md)

    PYTHONPATH=.:bench .venv/bin/python bench/feedback_loop.py [--prompts 500] [--k 4] [--eval-k 8] [--win-k 8]
                                                               [--config FILE] [--set K=V ...] [--work DIR]

1. champion: `rlhf run` (the pipeline) in a fresh store under outputs/bench/feedback-<time>/; if its gates refuse
   the version, it is made champion by hand (said in the result) so the loop has a version to start from;
2. labelling: the simulated raters (rlhf.builtin.judge.NoisyRater: noisy, length-biased, the raters of the built-in
   preference data) rank k samples of the champion on N training prompts, a second rater on every fourth prompt
   (for the agreement figure); the rankings go through the same code as the page's (add_ranking, validate_batch);
3. before/after: the champion's own outputs on the held-out prompts (--eval-k samples each; none of them is a
   feedback prompt), every two with different gold scores ordered by the gold judge; the reward model's accuracy on
   those pairs, the champion's reward model against the one the feedback flow retrains (Wilson intervals, and a
   bootstrap over prompts of the paired difference: pairs of one prompt are not independent);
4. the feedback flow, then its evaluation of the new version against the old champion under the gold judge; and,
   with more samples than the flow's evaluation draws, the gold win rate of the new version against the old
   champion on the same test split (--win-k samples of each per prompt, paired by sample index; Wilson, and a
   bootstrap over prompts).

Writes bench/results/feedback-loop-<time>.json and prints the figures. With --reward-run RUN_ID (and --work on the
same store), only step 3, with the reward model of that run as "after": for a feedback flow that has trained its
reward model but is still running (the figures are the same as the full run's: the same seeds, the same pairs).
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


def prompt_bootstrap(groups: list[list[float]], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over all values, resampling whole groups (one per prompt) with
    replacement: values of one prompt are correlated, so intervals that treat them as independent are too narrow."""
    rng = random.Random(seed)
    groups = [g for g in groups if g]
    means = []
    for _ in range(reps):
        draw = [groups[rng.randrange(len(groups))] for _ in groups]
        means.append(sum(sum(g) for g in draw) / sum(len(g) for g in draw))
    means.sort()
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=500, help="N prompts ranked (default 500)")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt (default 4)")
    parser.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts for RM accuracy (default 128)")
    parser.add_argument("--eval-k", type=int, default=8, help="champion samples per held-out prompt (default 8)")
    parser.add_argument("--win-k", type=int, default=8, help="samples per test prompt for the win rate (default 8)")
    parser.add_argument("--config", help="YAML preset for both runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--reward-run",
        metavar="RUN_ID",
        help="only step 3: score the reward model of this run (a feedback run's `reward` stage run) against the "
        "champion's on the same pairs (no labelling, no flow); for a flow that has trained its reward model but "
        "not finished",
    )
    parser.add_argument("--work", help="folder of the run (default outputs/bench/feedback-<time>); reused if it exists")
    args = parser.parse_args()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    # absolute: the tracking URI below is a path, and the process then works inside the folder
    work = (Path(args.work) if args.work else WORK / f"feedback-{stamp}").resolve()
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
    from rlhf.data.loading import load_split
    from rlhf.drift.features import sample_responses
    from rlhf.drift.lineage import resolve_lineage
    from rlhf.evaluation.hacking import split_for_selection
    from rlhf.evaluation.stats import wilson_interval, win_count
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

        if args.reward_run is None:
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
        flat = [p for p in heldout for _ in range(args.eval_k)]
        outs = sample_responses(policy, tokenizer, flat, cfg.feedback.max_new_tokens, cfg.feedback.temperature)
        judge = GoldJudge()
        pairs, owner = [], []
        for j, p in enumerate(heldout):
            group = outs[j * args.eval_k : (j + 1) * args.eval_k]
            for a in range(args.eval_k):
                for b in range(a + 1, args.eval_k):
                    ga, gb = judge.score(p, group[a]), judge.score(p, group[b])
                    if ga != gb:
                        pairs.append((p, group[a], group[b]) if ga > gb else (p, group[b], group[a]))
                        owner.append(j)

        def accuracy(rm) -> list[bool]:
            chosen = score_texts(rm, tokenizer, [x[0] for x in pairs], [x[1] for x in pairs])
            rejected = score_texts(rm, tokenizer, [x[0] for x in pairs], [x[2] for x in pairs])
            return [bool(c > r) for c, r in zip(chosen.tolist(), rejected.tolist())]

        before = accuracy(old_rm)

        def rm_figures(after: list[bool]) -> dict:
            return {
                "held_out_prompts": len(heldout),
                "samples_per_prompt": args.eval_k,
                "pairs": len(pairs),
                "before": sum(before) / len(pairs),
                "before_ci95": wilson_interval(sum(before), len(pairs)),
                "after": sum(after) / len(pairs),
                "after_ci95": wilson_interval(sum(after), len(pairs)),
                "rise": (sum(after) - sum(before)) / len(pairs),
                "rise_ci95_prompt_bootstrap": prompt_bootstrap(
                    [
                        [float(after[i]) - float(before[i]) for i in range(len(pairs)) if owner[i] == j]
                        for j in range(len(heldout))
                    ]
                ),
                "pairs_only_after_right": sum(a and not b for a, b in zip(after, before)),
                "pairs_only_before_right": sum(b and not a for a, b in zip(after, before)),
            }

        if args.reward_run is not None:
            uri = f"runs:/{args.reward_run}/checkpoint"
            rm = load_reward_model(str(download(uri, scratch + "/n")), tokenizer.pad_token_id).eval()
            result.update({"reward_run": args.reward_run, "rm_accuracy_on_champion_outputs": rm_figures(accuracy(rm))})
            write(result, stamp)
            return

        # 4. the feedback flow
        from flows.feedback import rlhf_feedback

        t0 = time.monotonic()
        out = rlhf_feedback(cfg)
        timings["feedback_flow_s"] = time.monotonic() - t0
        new = resolve_lineage(client, cfg.registered_model, version=out.model_uri.rsplit("/", 1)[-1])
        new_rm = load_reward_model(str(download(new.reward_model_uri, scratch + "/n")), tokenizer.pad_token_id).eval()
        after = accuracy(new_rm)

        # 5. the new version against the old champion, gold judge, on the evaluation's test split
        _, test = split_for_selection(
            list(load_split(paths["heldout_prompts"])["prompt"])[: cfg.data.max_heldout_prompts],  # as evaluate
            cfg.diagnostics.selection_fraction,
            cfg.seed,
        )
        flat = [p for p in test for _ in range(args.win_k)]
        gold = {}
        for who, uri in (("old", champion.policy_uri), ("new", new.policy_uri)):
            model = load_causal_lm(str(download(uri, scratch + "/w-" + who))).eval()
            torch.manual_seed(cfg.seed + 2)
            texts = sample_responses(model, tokenizer, flat, cfg.eval.max_new_tokens, cfg.eval.temperature)
            gold[who] = [judge.score(p, r) for p, r in zip(flat, texts)]
        wins = [win_count([a], [b]) for a, b in zip(gold["new"], gold["old"])]

    m = out.metrics
    result.update(
        {
            "new_version": out.model_uri,
            "promoted": bool(out.promotion.promoted),
            "rm_accuracy_on_champion_outputs": rm_figures(after),
            "win_rate_vs_old_champion": {
                "test_prompts": len(test),
                "samples_per_prompt": args.win_k,
                "comparisons": len(wins),
                "win_rate": sum(wins) / len(wins),
                "ci95_wilson": wilson_interval(sum(wins), len(wins)),
                "ci95_prompt_bootstrap": prompt_bootstrap(
                    [wins[j * args.win_k : (j + 1) * args.win_k] for j in range(len(test))]
                ),
                "gold_new": sum(gold["new"]) / len(wins),
                "gold_old": sum(gold["old"]) / len(wins),
            },
            "eval": {
                k: m[k]
                for k in sorted(m)
                if k.startswith(
                    ("eval/win_rate", "eval/gold", "eval/sft_gold", "eval/champion_gold", "eval/kl", "feedback/")
                )
            },
            "feedback_run": {
                k: v for k, v in client.get_run(out.parent_run_id).data.metrics.items() if k.startswith("feedback/")
            },
            "timings_s": timings,
        }
    )
    write(result, stamp)


def write(result: dict, stamp: str) -> None:
    """bench/results/feedback-loop-<stamp>.json, and the figures on stdout."""
    result["loadavg_end"] = loadavg()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    path = ROOT / "bench" / "results" / f"feedback-loop-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
