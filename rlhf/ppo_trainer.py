"""PPO for a causal LM against a learned reward model, with a KL penalty to a frozen reference.

RL view (docs/notation.md): the state is the prompt plus the tokens so far, an
action is the next token, an episode is one response. The reward model scores the
whole response once, at its last token; every token also pays the KL penalty
``-beta * (log pi(a|s) - log pi_ref(a|s))``. Advantages come from GAE over the
value head's per-token estimates.

One call of ``PPOTrainer.step`` is one iteration, written as numbered steps:
1. sample prompts and generate responses (KV cache), 2. log-probs of policy and
reference and the values, 3. score with the reward model, 4. per-token rewards,
5. GAE and whitening, 6. clipped PPO updates over minibatches, 7. KL controller.

This module knows nothing of MLflow or Prefect: it returns metrics and writes
checkpoints to a folder; tasks/ppo.py logs them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.generation import Rollout, decode_responses, sample
from models.policy import PolicyWithValueHead, position_ids_from_mask
from models.reward import score_token_ids
from rlhf.config import PPOConfig
from rlhf.rl.advantages import compute_gae, masked_mean, masked_whiten
from rlhf.rl.kl import kl_per_token, make_kl_controller
from rlhf.rl.losses import entropy_from_logits, explained_variance, logprobs_from_logits, policy_loss, value_loss
from rlhf.rl.normalize import RunningMoments, normalize_scores

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
RATIO_SKIP_THRESHOLD = 10.0
"""A minibatch whose largest probability ratio exceeds this is skipped, not applied."""

GoldScorer = Callable[[str, str], float]


def response_logprobs(
    logits: torch.Tensor, rollout_ids: torch.Tensor, query_len: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, logits) of the response tokens: position t's logits predict token t+1."""
    response_logits = logits[:, query_len - 1 : -1] / temperature  # (B, R, V)
    return logprobs_from_logits(response_logits, rollout_ids), response_logits


class PPOTrainer:
    """Owns the policy, its optimizer, the KL controller, the reward normaliser and the data cursor."""

    def __init__(
        self,
        cfg: PPOConfig,
        policy: PolicyWithValueHead,
        ref_model: PreTrainedModel,
        reward_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[str],
        seed: int,
        gold_scorer: GoldScorer | None = None,
    ):
        if not prompts:
            raise ValueError("PPO needs at least one prompt: check data.prompts_path")
        self.cfg = cfg
        self.policy = policy
        self.ref_model = ref_model.eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.gold_scorer = gold_scorer
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5)
        self.kl_ctl = make_kl_controller(cfg.kl_control, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.moments = RunningMoments()
        self.step_count = 0
        self.data_generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(prompts), generator=self.data_generator).tolist()
        self.cursor = 0
        self.last_samples: list[dict] = []
        torch.manual_seed(seed)

    # -- data ---------------------------------------------------------------------------
    def next_prompts(self) -> list[str]:
        """The next batch of prompts; reshuffles after each pass over the data."""
        batch = []
        while len(batch) < self.cfg.batch_size:
            if self.cursor == len(self.order):
                self.order = torch.randperm(len(self.prompts), generator=self.data_generator).tolist()
                self.cursor = 0
            batch.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return batch

    # -- one iteration ------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its metrics (names as in docs/metrics.md)."""
        cfg = self.cfg
        beta = self.kl_ctl.value
        t0 = time.perf_counter()

        # 1. Generate one response per prompt with the current policy.
        prompts = self.next_prompts()
        rollout = sample(self.policy.lm, self.tokenizer, prompts, cfg.max_new_tokens, cfg.temperature)
        texts = decode_responses(self.tokenizer, rollout)
        t1 = time.perf_counter()

        # 2. Log-probs under policy and reference, and the value estimates (no gradient).
        query_len = rollout.query_ids.shape[1]
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask  # (B, P+R)
        mask = rollout.response_mask.float()  # (B, R)
        with torch.no_grad():
            logits, values = self.policy(input_ids, attention_mask)
            logprobs, _ = response_logprobs(logits, rollout.response_ids, query_len, cfg.temperature)
            values = values[:, query_len - 1 : -1] * mask  # (B, R): V(s_t) before action t
            ref_logits = self.ref_model(
                input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
            ).logits
            ref_logprobs, _ = response_logprobs(ref_logits, rollout.response_ids, query_len, cfg.temperature)

            # 3. Score the whole response once; penalise responses that never end.
            scores = score_token_ids(self.reward_model, input_ids, attention_mask, self.tokenizer.pad_token_id)
            scores = scores - cfg.missing_eos_penalty * (~rollout.ended).float()  # (B,)
            self.moments.update(scores)
            rewards_at_end = normalize_scores(scores, self.moments, cfg.reward_clip) if cfg.normalize_reward else scores
        t2 = time.perf_counter()

        # 4. Per-token rewards: KL penalty on every token, the score on the last one.
        kl = (logprobs - ref_logprobs) * mask  # (B, R) k1, for logging and the controller
        kl_penalty = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, R)
        non_score_reward = -beta * kl_penalty  # (B, R)
        rewards = non_score_reward.clone()
        last = rollout.lengths - 1  # (B,) index of each response's final token
        rewards[torch.arange(len(last)), last] += rewards_at_end

        # 5. Advantages with GAE; whiten them over the batch.
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 6. Several epochs of clipped PPO updates over minibatches.
        stats = self._update(rollout, logprobs, values, advantages, returns, mask)
        t3 = time.perf_counter()

        # 7. Adapt the KL coefficient to the KL this batch actually had.
        seq_kl = kl.sum(1)  # (B,)
        self.kl_ctl.update(seq_kl.mean().item(), cfg.batch_size)
        self.step_count += 1

        metrics = {
            "objective/kl": seq_kl.mean().item(),
            "objective/kl_k2": (kl_per_token(logprobs, ref_logprobs, "k2") * mask).sum(1).mean().item(),
            "objective/kl_k3": (kl_per_token(logprobs, ref_logprobs, "k3") * mask).sum(1).mean().item(),
            "objective/kl_coef": beta,
            "objective/entropy": (-logprobs * mask).sum(1).mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/non_score_reward": non_score_reward.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean().item(),
            "value/explained_variance": explained_variance(values, returns, mask),
            "response_length/mean": rollout.lengths.float().mean().item(),
            "response/eos_rate": rollout.ended.float().mean().item(),
            "timing/generation_s": t1 - t0,
            "timing/scoring_s": t2 - t1,
            "timing/update_s": t3 - t2,
            "timing/step_s": t3 - t0,
            **stats,
        }
        if self.gold_scorer is not None:
            gold = [self.gold_scorer(p, r) for p, r in zip(prompts, texts)]
            metrics["objective/gold_scores"] = sum(gold) / len(gold)
        self.last_samples = [
            {"step": self.step_count, "prompt": p, "response": r, "score": s}
            for p, r, s in zip(prompts, texts, scores.tolist())
        ]
        return metrics

    def _update(
        self, rollout: Rollout, old_logprobs: torch.Tensor, old_values: torch.Tensor,
        advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    ) -> dict[str, float]:
        """PPO epochs over shuffled minibatches; returns averaged loss statistics."""
        cfg = self.cfg
        query_len = rollout.query_ids.shape[1]
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        totals: dict[str, float] = {}
        applied = skipped = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]
                m = mask[idx]
                logits, values = self.policy(input_ids[idx], attention_mask[idx])
                logprobs, response_logits = response_logprobs(
                    logits, rollout.response_ids[idx], query_len, cfg.temperature
                )
                values = values[:, query_len - 1 : -1]
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m, cfg.clip_range)
                vf_loss, vf_stats = value_loss(values, old_values[idx], returns[idx], m, cfg.clip_range_value)
                entropy = masked_mean(entropy_from_logits(response_logits), m)
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                # Guards: a non-finite loss or an exploding ratio would wreck the policy; skip that minibatch.
                if not torch.isfinite(loss) or pg_stats["ratio_max"].item() > RATIO_SKIP_THRESHOLD:
                    skipped += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                applied += 1
                for key, value in {
                    "loss/policy_avg": pg_loss.item(),
                    "loss/value_avg": vf_loss.item(),
                    "policy/approxkl_avg": pg_stats["approxkl"].item(),
                    "policy/clipfrac_avg": pg_stats["clipfrac"].item(),
                    "policy/entropy_avg": entropy.item(),
                    "policy/ratio_avg": pg_stats["ratio_mean"].item(),
                    "value/clipfrac_avg": vf_stats["clipfrac"].item(),
                    "policy/grad_norm": grad_norm.item(),
                }.items():
                    totals[key] = totals.get(key, 0.0) + value
        out = {k: v / applied for k, v in totals.items()} if applied else {}
        out["policy/skipped_minibatches"] = float(skipped)
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, out_dir: str | Path) -> Path:
        """Everything needed to resume: policy, value head, optimizer, KL controller, normaliser, RNG, cursor."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.policy.save(out)
        self.tokenizer.save_pretrained(out)
        torch.save(self.optimizer.state_dict(), out / OPTIMIZER_FILE)
        torch.save({"torch": torch.get_rng_state(), "data": self.data_generator.get_state()}, out / RNG_FILE)
        state = {
            "step": self.step_count,
            "cursor": self.cursor,
            "order": self.order,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": self.moments.state_dict(),
        }
        (out / STATE_FILE).write_text(json.dumps(state))
        return out

    def load_checkpoint(self, checkpoint_dir: str | Path) -> None:
        """Restore the state written by save_checkpoint (policy weights are loaded by the caller)."""
        ckpt = Path(checkpoint_dir)
        state = json.loads((ckpt / STATE_FILE).read_text())
        self.step_count = int(state["step"])
        self.cursor = int(state["cursor"])
        self.order = list(state["order"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["reward_moments"])
        self.optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True))
        rng = torch.load(ckpt / RNG_FILE, weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data"])


def is_finite(metrics: dict[str, float]) -> bool:
    """Whether every metric is a finite number."""
    return all(math.isfinite(v) for v in metrics.values())
