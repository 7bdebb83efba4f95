"""Evaluation on held-out prompts: the PPO policy against the SFT policy it started from.

Judged by the gold judge where the data has one (the built-in task), else by the
reward model. KL is the sequence-level k1 estimate of KL(pi || pi_sft) on the
policy's own samples, at the sampling temperature used in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from models.generation import decode_responses, sample
from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.policy import position_ids_from_mask
from models.reward import score_texts
from rlhf.config import PipelineConfig
from rlhf.data.judge import GoldJudge
from rlhf.data.loading import load_split
from rlhf.rl.losses import logprobs_from_logits
from rlhf.stats import distinct_n, wilson_interval
from rlhf.tracking import download, stage_run
from tasks.common import Checkpoint, in_flow_run
from tasks.ppo import PPOResult

BATCH = 64


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    metrics: dict[str, float]


@dataclass
class Samples:
    responses: list[str]
    lengths: list[int]
    ended: list[bool]
    kl: list[float]


@torch.no_grad()
def sample_with_kl(policy, ref, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float) -> Samples:
    """Sample responses in batches; per-response sequence KL(policy || ref) by k1."""
    out = Samples([], [], [], [])
    for i in range(0, len(prompts), BATCH):
        rollout = sample(policy, tokenizer, prompts[i : i + BATCH], max_new_tokens, temperature)
        query_len = rollout.query_ids.shape[1]
        mask = rollout.attention_mask
        kwargs = dict(input_ids=rollout.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        logprobs = [
            logprobs_from_logits(m(**kwargs).logits[:, query_len - 1 : -1] / temperature, rollout.response_ids)
            for m in (policy, ref)
        ]
        kl = ((logprobs[0] - logprobs[1]) * rollout.response_mask).sum(1)
        out.responses += decode_responses(tokenizer, rollout)
        out.lengths += rollout.lengths.tolist()
        out.ended += rollout.ended.tolist()
        out.kl += kl.tolist()
    return out


def run_evaluate(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, ppo: PPOResult, heldout_prompts_path: str,
    parent_run_id: str, use_gold_judge: bool,
) -> Evaluation:
    """Compare the final PPO policy with SFT on held-out prompts; log ``eval/*`` and a sample table."""
    with stage_run(parent_run_id, "evaluate", {"eval.policy_uri": ppo.final.uri}) as run:
        torch.manual_seed(cfg.seed)
        sft_dir, policy_dir, rm_dir = (str(download(c.uri)) for c in (sft, ppo.final, reward))
        tokenizer = load_tokenizer(sft_dir)
        sft_model, policy = load_causal_lm(sft_dir).eval(), load_causal_lm(policy_dir).eval()
        reward_model = load_reward_model(rm_dir, tokenizer.pad_token_id)
        heldout = list(load_split(heldout_prompts_path)["prompt"])[: cfg.data.max_heldout_prompts]
        prompts = [p for p in heldout for _ in range(cfg.eval.samples_per_prompt)]

        ppo_out = sample_with_kl(policy, sft_model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.temperature)
        sft_out = sample_with_kl(sft_model, sft_model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.temperature)
        rm_ppo = score_texts(reward_model, tokenizer, prompts, ppo_out.responses)
        rm_sft = score_texts(reward_model, tokenizer, prompts, sft_out.responses)

        n = len(prompts)
        metrics = {
            "eval/rm_score_mean": rm_ppo.mean().item(),
            "eval/sft_rm_score_mean": rm_sft.mean().item(),
            "eval/kl_mean": sum(ppo_out.kl) / n,
            "eval/response_length_mean": sum(ppo_out.lengths) / n,
            "eval/sft_response_length_mean": sum(sft_out.lengths) / n,
            "eval/eos_rate": sum(ppo_out.ended) / n,
            "eval/distinct_2": distinct_n(ppo_out.responses, 2),
            "eval/num_samples": float(n),
        }
        if use_gold_judge:
            judge = GoldJudge()
            gold_ppo = [judge.score(p, r) for p, r in zip(prompts, ppo_out.responses)]
            gold_sft = [judge.score(p, r) for p, r in zip(prompts, sft_out.responses)]
            wins = sum(judge.prefers(p, a, b) for p, a, b in zip(prompts, ppo_out.responses, sft_out.responses))
            metrics["eval/gold_reward_mean"] = sum(gold_ppo) / n
            metrics["eval/sft_gold_reward_mean"] = sum(gold_sft) / n
        else:
            gold_ppo = gold_sft = [float("nan")] * n
            wins = float((rm_ppo > rm_sft).sum() + 0.5 * (rm_ppo == rm_sft).sum())
        low, high = wilson_interval(wins, n)
        metrics.update({"eval/win_rate_vs_sft": wins / n, "eval/win_rate_vs_sft_low": low, "eval/win_rate_vs_sft_high": high})
        mlflow.log_metrics(metrics)
        mlflow.set_tag("eval.judge", "gold" if use_gold_judge else "reward_model")
        mlflow.log_table(
            {
                "prompt": prompts, "sft_response": sft_out.responses, "ppo_response": ppo_out.responses,
                "sft_gold": gold_sft, "ppo_gold": gold_ppo, "sft_rm": rm_sft.tolist(), "ppo_rm": rm_ppo.tolist(),
            },
            artifact_file="eval/samples.json",
        )
        if in_flow_run():
            create_markdown_artifact(format_table(metrics, cfg.ppo.kl_target), key="evaluation", description="Held-out evaluation")
        return Evaluation(run.info.run_id, metrics)


def format_table(metrics: dict[str, float], kl_target: float) -> str:
    """Markdown table of the evaluation, PPO beside SFT."""
    def row(name: str, ppo_key: str, sft_key: str | None) -> str:
        sft = f"{metrics[sft_key]:.3f}" if sft_key and sft_key in metrics else ""
        return f"| {name} | {metrics[ppo_key]:.3f} | {sft} |" if ppo_key in metrics else ""

    lines = [
        "| metric | PPO | SFT |",
        "|---|---|---|",
        row("gold reward (mean)", "eval/gold_reward_mean", "eval/sft_gold_reward_mean"),
        row("reward-model score (mean)", "eval/rm_score_mean", "eval/sft_rm_score_mean"),
        row("response length (tokens)", "eval/response_length_mean", "eval/sft_response_length_mean"),
        row("win rate vs SFT", "eval/win_rate_vs_sft", None),
        f"| win rate 95% CI | {metrics['eval/win_rate_vs_sft_low']:.3f} - {metrics['eval/win_rate_vs_sft_high']:.3f} | |",
        f"| KL to SFT (nats, target {kl_target:g}) | {metrics['eval/kl_mean']:.3f} | 0 |",
        row("EOS rate", "eval/eos_rate", None),
    ]
    return "\n".join(line for line in lines if line)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: PipelineConfig, sft: Checkpoint, reward: Checkpoint, ppo: PPOResult, heldout_prompts_path: str,
    parent_run_id: str, use_gold_judge: bool,
) -> Evaluation:
    """Held-out evaluation against SFT."""
    return run_evaluate(cfg, sft, reward, ppo, heldout_prompts_path, parent_run_id, use_gold_judge)
