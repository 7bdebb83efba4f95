"""Evaluation: choose the PPO checkpoint honestly, diagnose reward hacking, judge it on held-out prompts.

The held-out prompts are cut in two (``DiagnosticsConfig.selection_fraction``):

1. selection split: SFT (step 0) and every logged PPO checkpoint are sampled and
   scored by the proxy (the reward model PPO optimised) and by the selection
   judge; the judge is the gold judge where the data has one (the built-in task),
   else a held-out reward model if one is given, else the reward model itself
   (then the choice rests on the proxy, and the tag ``eval.judge`` says so).
   Gold and proxy against sqrt(KL) go to ``eval/overoptimization.png``; the
   checkpoint with the best judge score within the KL budget is chosen, not the last;
2. test split, untouched by the choice: the chosen checkpoint against SFT and
   against the current champion (``models:/<registered_model>@champion``, if any):
   proxy and judge scores, KL, win rates with Wilson intervals, length,
   distinct-n and the number of distinct responses, end-of-sequence, violation
   (overall and per kind) and refusal rates, intent accuracy (built-in task:
   the response answers the customer's intent and no other; overall and per
   intent), the breakdown table ``eval/breakdown.json`` and a side-by-side
   sample table ``eval/samples.json``.

Reward-hacking flags (rlhf/evaluation/hacking.py) of the chosen checkpoint become tags
``hacking.<flag>``; flags raised at any checkpoint become ``hacking.run.<flag>``.
KL is the sequence-level k1 estimate of KL(pi || pi_sft) on the policy's own
samples at the training temperature.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.reward import score_texts
from rlhf.builtin.task import task_knowledge
from rlhf.config import PipelineConfig
from rlhf.data.loading import load_split
from rlhf.evaluation.hacking import (
    FLAGS,
    CheckpointStats,
    DiagnosticsConfig,
    hacking_flags,
    select_checkpoint,
    split_for_selection,
)
from rlhf.evaluation.sampling import Samples, sample_with_kl
from rlhf.evaluation.stats import (
    distinct_count,
    distinct_n,
    group_rates,
    mean_and_se,
    pearson,
    wilson_interval,
    win_count,
)
from rlhf.evaluation.task import TaskKnowledge
from rlhf.evaluation.violations import VIOLATION_KINDS, is_refusal, kind_rates, violations
from rlhf.infra.distributed import device as distributed_device
from rlhf.infra.progress import in_prefect_run
from rlhf.infra.security import redact_columns
from rlhf.infra.tracking import checkpoint_model_id, download, stage_run
from rlhf.registry.promotion import CHAMPION, registry_aliases
from tasks.common import EVALUATE, JUDGE_METRIC, Checkpoint, Evaluation, JudgeKind, PPOResult


@dataclass(frozen=True)
class Judge:
    """Scores (prompts, responses) for checkpoint selection and win rates."""

    kind: JudgeKind
    score: Callable[[list[str], list[str]], list[float]]


@dataclass
class Scored:
    """One policy's samples on a prompt list with proxy and judge scores."""

    samples: Samples
    proxy: list[float]
    judge: list[float]


def load_policy(path: str, device: str, trust_remote_code: bool = False):
    """A causal LM checkpoint on the device, in eval mode."""
    return load_causal_lm(path, trust_remote_code=trust_remote_code).to(device).eval()


def make_judge(task: TaskKnowledge | None, heldout_rm, reward_model, tokenizer) -> Judge:
    """The task's gold judge where it has one, else the held-out reward model, else the reward model."""
    if task is not None and (gold := task.gold_score) is not None:
        return Judge("gold", lambda ps, rs: [gold(p, r) for p, r in zip(ps, rs)])
    model, kind = (heldout_rm, "heldout_reward_model") if heldout_rm is not None else (reward_model, "reward_model")
    return Judge(kind, lambda ps, rs: score_texts(model, tokenizer, ps, rs).tolist())


def score_policy(
    model, ref, tokenizer, prompts: list[str], reward_model, rm_tokenizer, judge: Judge, cfg: PipelineConfig
) -> Scored:
    """Sample (seeded with cfg.seed, so every policy meets the same random numbers) and score."""
    torch.manual_seed(cfg.seed)
    samples = sample_with_kl(model, ref, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.temperature)
    proxy = score_texts(reward_model, rm_tokenizer, prompts, samples.responses).tolist()
    return Scored(samples, proxy, judge.score(prompts, samples.responses))


def checkpoint_stats(step: int, scored: Scored) -> CheckpointStats:
    """Summary of one checkpoint's selection-split samples for rlhf/evaluation/hacking.py."""
    proxy, proxy_se = mean_and_se(scored.proxy)
    judge, judge_se = mean_and_se(scored.judge)
    lengths = [float(n) for n in scored.samples.lengths]
    corr = pearson(scored.proxy, lengths) if len(lengths) > 1 else 0.0
    return CheckpointStats(
        step=step,
        kl=sum(scored.samples.kl) / len(lengths),
        proxy=proxy,
        proxy_se=proxy_se,
        judge=judge,
        judge_se=judge_se,
        length=sum(lengths) / len(lengths),
        reward_length_corr=corr,
        distinct_2=distinct_n(scored.samples.responses, 2),
        n=len(lengths),
    )


def champion_policy_dir(model_name: str, into: str | Path) -> tuple[str, Path] | None:
    """(version, local policy checkpoint under ``into``) of the registered champion, or None when there is none."""
    version = registry_aliases(mlflow.MlflowClient(), model_name).get(CHAMPION)
    if version is None:
        return None
    model_dir = download(f"models:/{model_name}/{version}", into)
    return version, model_dir / "artifacts" / "policy"


def run_evaluate(
    cfg: PipelineConfig,
    sft: Checkpoint,
    reward: Checkpoint,
    ppo: PPOResult,
    heldout_prompts_path: str,
    parent_run_id: str,
    diagnostics: DiagnosticsConfig | None = None,
    heldout_reward: Checkpoint | None = None,
) -> Evaluation:
    """Choose the best PPO checkpoint on the selection split, flag hacking, judge it on the test split."""
    diagnostics = diagnostics or cfg.diagnostics
    task = task_knowledge(cfg.data)
    with (
        stage_run(
            parent_run_id, EVALUATE, {"eval.ppo_run_id": ppo.final.run_id}, {"heldout_prompts": heldout_prompts_path}
        ) as run,
        tempfile.TemporaryDirectory(prefix="rlhf-evaluate-") as scratch,  # every checkpoint downloaded, removed after
    ):
        device = distributed_device()
        sft_dir, rm_dir = str(download(sft.uri, scratch)), str(download(reward.uri, scratch))
        trust = cfg.model.trust_remote_code
        tokenizer = load_tokenizer(sft_dir, trust)
        sft_model = load_policy(sft_dir, device, trust)
        reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id, trust_remote_code=trust).to(device)
        heldout_rm = (
            load_reward_model(
                str(download(heldout_reward.uri, scratch)), tokenizer.pad_token_id, trust_remote_code=trust
            ).to(device)
            if heldout_reward
            else None
        )
        judge = make_judge(task, heldout_rm, reward_model, tokenizer)
        heldout = list(load_split(heldout_prompts_path)["prompt"])[: cfg.data.max_heldout_prompts]
        selection_prompts, test_prompts = split_for_selection(heldout, diagnostics.selection_fraction, cfg.seed)
        mlflow.log_params(
            {
                "eval.selection_prompts": len(selection_prompts),
                "eval.test_prompts": len(test_prompts),
                **{f"eval.{k}": v for k, v in diagnostics.model_dump().items()},
            }
        )

        # 1. Selection split: SFT (step 0) and every checkpoint, proxy and judge against KL.
        repeat = cfg.eval.samples_per_prompt
        prompts = [p for p in selection_prompts for _ in range(repeat)]
        series = [
            checkpoint_stats(0, score_policy(sft_model, None, tokenizer, prompts, reward_model, tokenizer, judge, cfg))
        ]
        for step, uri in sorted(ppo.checkpoints.items()):
            if step == 0:
                continue  # PPO's step-0 checkpoint is the SFT policy, measured above
            model = load_policy(str(download(uri, scratch)), device, trust)
            series.append(
                checkpoint_stats(
                    step, score_policy(model, sft_model, tokenizer, prompts, reward_model, tokenizer, judge, cfg)
                )
            )
            del model
        flags = hacking_flags(series, diagnostics, judge_is_proxy=judge.kind == "reward_model")
        measured = {0: (sft.uri, sft.run_id), **{s: (u, ppo.final.run_id) for s, u in ppo.checkpoints.items()}}
        for point in series:  # each checkpoint's metrics linked to its LoggedModel
            model_id = checkpoint_model_id(*measured[point.step])
            mlflow.log_metrics(selection_metrics(point, flags[point.step]), step=point.step, model_id=model_id)

        # 2. Choose on the judge within the KL budget; plot gold/proxy against sqrt(KL).
        # SFT competes only where PPO logged it as its step-0 checkpoint: then "no PPO step helped" can win.
        kl_budget = diagnostics.kl_budget if diagnostics.kl_budget is not None else cfg.ppo.kl_budget
        flagged = frozenset(step for step, raised in flags.items() if any(raised.values()))
        choice = select_checkpoint([p for p in series if p.step in ppo.checkpoints], kl_budget, flagged)
        chosen = Checkpoint(ppo.final.run_id, ppo.checkpoints[choice.step])
        mlflow.log_figure(
            plot_overoptimization(series, flags, choice.step, judge.kind, kl_budget), "eval/overoptimization.png"
        )
        mlflow.log_table(checkpoint_table(series, flags, choice.step), artifact_file="eval/checkpoints.json")

        # 3. Test split: the chosen checkpoint against SFT and the champion.
        prompts = [p for p in test_prompts for _ in range(repeat)]
        policy = load_policy(str(download(chosen.uri, scratch)), device, trust)
        ours = score_policy(policy, sft_model, tokenizer, prompts, reward_model, tokenizer, judge, cfg)
        base = score_policy(sft_model, None, tokenizer, prompts, reward_model, tokenizer, judge, cfg)
        champion = champion_policy_dir(cfg.registered_model, scratch)
        theirs = None
        if champion is not None:
            champion_model = load_policy(str(champion[1]), device, trust)
            theirs = score_policy(
                champion_model,
                None,
                load_tokenizer(str(champion[1]), trust),
                prompts,
                reward_model,
                tokenizer,
                judge,
                cfg,
            )

        metrics = heldout_metrics(prompts, ours, base, theirs, judge.kind, task)
        chosen_flags, run_flags = flags[choice.step], run_level_flags(flags)
        metrics.update(
            {
                "eval/best_checkpoint_step": float(choice.step),
                "eval/kl_within_budget": float(choice.within_budget),
                **({"eval/kl_budget": float(kl_budget)} if kl_budget is not None else {}),
                **{f"eval/hacking/{name}": float(raised) for name, raised in chosen_flags.items()},
            }
        )
        tags = {
            "eval.judge": judge.kind,
            "eval.checkpoint_uri": chosen.uri,
            "eval.champion_version": champion[0] if champion else "none",
            **flag_tags(chosen_flags, run_flags),
        }
        mlflow.log_metrics(metrics, model_id=checkpoint_model_id(chosen.uri, chosen.run_id))
        mlflow.set_tags(tags)
        table = redact_columns(sample_table(prompts, ours, base, theirs, task))  # no PII in logged samples
        mlflow.log_table(table, artifact_file="eval/samples.json")
        mlflow.log_table(breakdown_table(prompts, metrics, task), artifact_file="eval/breakdown.json")
        if in_prefect_run():
            markdown = (
                format_table(metrics, cfg.ppo.kl_target) + "\n\n" + format_checkpoints(series, flags, choice.step)
            )
            create_markdown_artifact(
                markdown, key="evaluation", description="Held-out evaluation and checkpoint selection"
            )
        return Evaluation(run.info.run_id, metrics, chosen, choice.step, tags)


def selection_metrics(point: CheckpointStats, flags: dict[str, bool]) -> dict[str, float]:
    """The per-checkpoint metrics of the selection split (logged with step = PPO step)."""
    return {
        "eval/selection/judge_score_mean": point.judge,
        "eval/selection/rm_score_mean": point.proxy,
        "eval/selection/kl_mean": point.kl,
        "eval/selection/response_length_mean": point.length,
        "eval/selection/reward_length_corr": point.reward_length_corr,
        "eval/selection/distinct_2": point.distinct_2,
        **{f"eval/selection/hacking_{name}": float(raised) for name, raised in flags.items()},
    }


def run_level_flags(flags: dict[int, dict[str, bool]]) -> dict[str, list[int]]:
    """flag -> steps of the checkpoints that raised it (only flags that were computed)."""
    names = {name for per_step in flags.values() for name in per_step}
    return {name: [step for step, f in sorted(flags.items()) if f.get(name)] for name in sorted(names)}


def flag_tags(chosen: dict[str, bool], run: dict[str, list[int]]) -> dict[str, str]:
    """hacking.<flag> for the chosen checkpoint, hacking.run.<flag> for any checkpoint; n/a if not computed."""
    tags = {}
    for name in FLAGS:
        tags[f"hacking.{name}"] = str(chosen[name]).lower() if name in chosen else "n/a"
        tags[f"hacking.run.{name}"] = ("true" if run[name] else "false") if name in run else "n/a"
    tags["hacking.run.flagged_steps"] = (
        ",".join(str(s) for s in sorted({s for steps in run.values() for s in steps})) or "none"
    )
    return tags


def heldout_metrics(
    prompts: list[str],
    ours: Scored,
    base: Scored,
    theirs: Scored | None,
    judge_kind: JudgeKind,
    task: TaskKnowledge | None,
) -> dict[str, float]:
    """eval/* on the test split: the chosen policy, SFT, and the champion when there is one."""
    n = len(prompts)
    metrics = {
        "eval/num_samples": float(n),
        "eval/kl_mean": sum(ours.samples.kl) / n,
    }
    compared = [("eval/", ours), ("eval/sft_", base)] + ([("eval/champion_", theirs)] if theirs is not None else [])
    for prefix, scored in compared:
        metrics[f"{prefix}distinct_1"] = distinct_n(scored.samples.responses, 1)
        metrics[f"{prefix}distinct_2"] = distinct_n(scored.samples.responses, 2)
        metrics[f"{prefix}distinct_responses"] = float(distinct_count(scored.samples.responses))
        metrics[f"{prefix}rm_score_mean"] = sum(scored.proxy) / n
        if JUDGE_METRIC[judge_kind]:
            metrics[f"{prefix}{JUDGE_METRIC[judge_kind]}"] = sum(scored.judge) / n
        metrics[f"{prefix}response_length_mean"] = sum(scored.samples.lengths) / n
        metrics[f"{prefix}eos_rate"] = sum(scored.samples.ended) / n
        found = violations(prompts, scored.samples.responses, task)
        metrics[f"{prefix}violation_rate"] = sum(bool(v) for v in found) / n
        metrics.update({f"{prefix}violation_rate/{kind}": rate for kind, rate in kind_rates(found).items()})
        if task is not None:
            metrics[f"{prefix}refusal_rate"] = sum(is_refusal(r, task) for r in scored.samples.responses) / n
            # A task that knows each prompt's intent: does the response answer it and no other?
            hits = [task.answers_intent(p, r) for p, r in zip(prompts, scored.samples.responses)]
            metrics[f"{prefix}intent_accuracy"] = sum(hits) / n
            by_intent = group_rates([task.classify_intent(p) for p in prompts], hits)
            metrics.update({f"{prefix}intent_accuracy/{intent}": rate for intent, (_, rate) in by_intent.items()})
    others = [("sft", base)] + ([("champion", theirs)] if theirs is not None else [])
    for name, other in others:
        wins = win_count(ours.judge, other.judge)
        low, high = wilson_interval(wins, n)
        metrics.update(
            {
                f"eval/win_rate_vs_{name}": wins / n,
                f"eval/win_rate_vs_{name}_low": low,
                f"eval/win_rate_vs_{name}_high": high,
            }
        )
    return metrics


def breakdown_table(prompts: list[str], metrics: dict[str, float], task: TaskKnowledge | None) -> dict[str, list]:
    """Per-intent accuracy (a task with intents) and per-violation-kind rates of the policy beside SFT's, one row each."""
    table: dict[str, list] = {"measure": [], "slice": [], "n": [], "policy": [], "sft": []}
    counts = group_rates([task.classify_intent(p) for p in prompts], [True] * len(prompts)) if task else {}
    rows = [("intent_accuracy", intent, n) for intent, (n, _) in counts.items()]
    rows += [("violation_rate", kind, len(prompts)) for kind in VIOLATION_KINDS]
    for measure, name, n in rows:
        table["measure"].append(measure)
        table["slice"].append(name)
        table["n"].append(n)
        table["policy"].append(metrics[f"eval/{measure}/{name}"])
        table["sft"].append(metrics[f"eval/sft_{measure}/{name}"])
    return table


def sample_table(
    prompts: list[str], ours: Scored, base: Scored, theirs: Scored | None, task: TaskKnowledge | None
) -> dict[str, list]:
    """Side-by-side responses of SFT, champion (if any) and the chosen policy with their scores."""
    table: dict[str, list] = {"prompt": prompts, "sft_response": base.samples.responses}
    if theirs is not None:
        table["champion_response"] = theirs.samples.responses
    table["policy_response"] = ours.samples.responses
    table["sft_judge"] = base.judge
    if theirs is not None:
        table["champion_judge"] = theirs.judge
    table.update(
        {
            "policy_judge": ours.judge,
            "sft_rm": base.proxy,
            "policy_rm": ours.proxy,
            "policy_violations": [",".join(v) for v in violations(prompts, ours.samples.responses, task)],
        }
    )
    return table


def checkpoint_table(series: list[CheckpointStats], flags: dict[int, dict[str, bool]], chosen: int) -> dict[str, list]:
    """One row per checkpoint (step 0 = SFT): the numbers behind the over-optimisation plot."""
    return {
        "step": [p.step for p in series],
        "kl": [p.kl for p in series],
        "sqrt_kl": [math.sqrt(max(p.kl, 0.0)) for p in series],
        "judge": [p.judge for p in series],
        "rm_score": [p.proxy for p in series],
        "length": [p.length for p in series],
        "reward_length_corr": [p.reward_length_corr for p in series],
        "distinct_2": [p.distinct_2 for p in series],
        "flags": [",".join(k for k, v in flags[p.step].items() if v) for p in series],
        "chosen": [p.step == chosen for p in series],
    }


def plot_overoptimization(
    series: list[CheckpointStats],
    flags: dict[int, dict[str, bool]],
    chosen: int,
    judge_kind: str,
    kl_budget: float | None,
):
    """Gold (judge) and proxy reward of every checkpoint against sqrt(KL), as in Gao et al. 2022."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot global state

    x = [math.sqrt(max(p.kl, 0.0)) for p in series]
    fig = Figure(figsize=(7, 5), dpi=100)
    ax = fig.add_subplot()
    proxy_ax = ax.twinx()
    ax.plot(x, [p.judge for p in series], "o-", color="tab:green", label=f"{judge_kind} (left)")
    proxy_ax.plot(x, [p.proxy for p in series], "s--", color="tab:blue", label="proxy reward model (right)")
    for xi, p in zip(x, series):
        ax.annotate(str(p.step), (xi, p.judge), textcoords="offset points", xytext=(3, 4), fontsize=7)
        if any(flags[p.step].values()):
            ax.plot([xi], [p.judge], "x", color="tab:red", markersize=10, mew=2)
    best = next(i for i, p in enumerate(series) if p.step == chosen)
    ax.plot(
        [x[best]],
        [series[best].judge],
        "*",
        color="gold",
        markeredgecolor="black",
        markersize=16,
        label=f"chosen (step {chosen})",
    )
    if kl_budget is not None:
        ax.axvline(math.sqrt(kl_budget), color="grey", linestyle=":", label="KL budget")
    ax.plot([], [], "x", color="tab:red", label="hacking flag")
    ax.set_xlabel("sqrt(KL(pi || pi_sft)) [sqrt nats]")
    ax.set_ylabel(f"{judge_kind} score")
    proxy_ax.set_ylabel("reward-model score")
    handles = ax.get_legend_handles_labels()[0] + proxy_ax.get_legend_handles_labels()[0]
    # Below the axes: inside, the twin axis's points would draw over it.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, fontsize=8, frameon=False)
    ax.set_title("Over-optimisation: judge and proxy by checkpoint (labels: PPO step)")
    fig.tight_layout()
    return fig


def format_table(metrics: dict[str, float], kl_target: float) -> str:
    """Markdown table of the evaluation: the chosen policy beside SFT."""

    def row(name: str, key: str) -> str:
        if key not in metrics:
            return ""
        sft_key = key.replace("eval/", "eval/sft_", 1)
        sft = f"{metrics[sft_key]:.3f}" if sft_key in metrics else ""
        return f"| {name} | {metrics[key]:.3f} | {sft} |"

    def win(name: str, who: str) -> str:
        key = f"eval/win_rate_vs_{who}"
        if key not in metrics:
            return ""
        return f"| {name} | {metrics[key]:.3f} ({metrics[key + '_low']:.3f} - {metrics[key + '_high']:.3f}) | |"

    lines = [
        "| metric | policy | SFT |",
        "|---|---|---|",
        f"| chosen checkpoint (PPO step) | {metrics['eval/best_checkpoint_step']:.0f} | |"
        if "eval/best_checkpoint_step" in metrics
        else "",
        row("gold reward (mean)", "eval/gold_reward_mean"),
        row("reward-model score (mean)", "eval/rm_score_mean"),
        row("response length (tokens)", "eval/response_length_mean"),
        win("win rate vs SFT (95% CI)", "sft"),
        win("win rate vs champion (95% CI)", "champion"),
        f"| KL to SFT (nats, target {kl_target:g}) | {metrics['eval/kl_mean']:.3f} | 0 |",
        row("EOS rate", "eval/eos_rate"),
        row("intent accuracy (answers the customer's intent only)", "eval/intent_accuracy"),
        *(
            row(f"- intent accuracy: {key.rsplit('/', 1)[1]}", key)
            for key in sorted(metrics)
            if key.startswith("eval/intent_accuracy/")
        ),
        row("violation rate", "eval/violation_rate"),
        *(
            row(f"- violations: {key.rsplit('/', 1)[1]}", key)
            for key in sorted(metrics)
            if key.startswith("eval/violation_rate/")
        ),
        row("refusal rate", "eval/refusal_rate"),
        row("distinct-2", "eval/distinct_2"),
        row("distinct responses", "eval/distinct_responses"),
    ]
    return "\n".join(line for line in lines if line)


def format_checkpoints(series: list[CheckpointStats], flags: dict[int, dict[str, bool]], chosen: int) -> str:
    """Markdown table of the selection split, one row per checkpoint."""
    lines = ["| step | KL | judge | proxy | length | flags |", "|---|---|---|---|---|---|"]
    for p in series:
        raised = ", ".join(k for k, v in flags[p.step].items() if v)
        mark = " (chosen)" if p.step == chosen else " (SFT)" if p.step == 0 else ""
        lines.append(f"| {p.step}{mark} | {p.kl:.2f} | {p.judge:.3f} | {p.proxy:.3f} | {p.length:.1f} | {raised} |")
    return "\n".join(lines)


@task(name=EVALUATE, cache_policy=NO_CACHE)
def evaluate_task(
    cfg: PipelineConfig,
    sft: Checkpoint,
    reward: Checkpoint,
    ppo: PPOResult,
    heldout_prompts_path: str,
    parent_run_id: str,
    diagnostics: DiagnosticsConfig | None = None,
    heldout_reward: Checkpoint | None = None,
) -> Evaluation:
    """Checkpoint selection, hacking diagnostics and held-out evaluation against SFT and the champion."""
    return run_evaluate(cfg, sft, reward, ppo, heldout_prompts_path, parent_run_id, diagnostics, heldout_reward)
