"""PPO for a causal LM against a learned reward model, with a KL penalty to a frozen reference.

RL view (docs/notation.md): the state is the prompt plus the tokens so far, an
action is the next token, an episode is one response. The reward model scores the
whole response once, at its last token; every token also pays the KL penalty
``-beta * (log pi(a|s) - log pi_ref(a|s))``. Advantages come from GAE over the
value head's per-token estimates (a head on the policy's trunk: see models/policy.py).

One call of ``PPOTrainer.step`` is one iteration, written as numbered steps:
1. sample prompts and generate responses (KV cache; the policy's log-probs and values come
from the same pass), 2. log-probs of the reference, 3. score with the reward model, 4. monitor (non-finite
guard, KL budget, negative KL), 5. per-token rewards, 6. GAE and whitening,
7. clipped PPO updates over minibatches, 8. KL controller.

Several processes (DDP, rlhf/infra/distributed.py): every process draws the same global batch
of prompts and samples responses for its own shard; the rollouts are gathered, each
process scores its shard and the numbers are gathered again, so steps 4-6 and 8 (monitor,
reward normaliser, GAE, whitening, KL controller) run on the whole batch and every
process holds the same state. In step 7 each process takes its share of every global
minibatch, weights its loss by its share of the minibatch's tokens, and DDP averages the
gradients: the update is the single-process update of the same global batch.

Monitoring acts, it does not only log: a non-finite score, loss, gradient or
parameter restores the last good state (policy, value head, optimizer, reward
normaliser) and skips the update; a minibatch whose probability ratio explodes is
skipped; a KL above the budget warns, stops, or asks the caller to roll back.

Precision and memory: with ``ppo.bf16`` every model forward (sampling, reference, reward model,
update) runs under bf16 autocast while log-probs, values, advantages, losses and the optimizer stay
fp32. With LoRA (the policy's LM wrapped with peft adapters) only the adapters and the value head
train, and the reference is the same LM with its adapters disabled: the SFT weights are held once.

This module knows nothing of MLflow or Prefect: ``step`` returns metrics and
``Alert`` records, checkpoints go to a folder; tasks/ppo.py logs and publishes them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.generation import Rollout, decode_responses, sample
from models.loading import require_safetensors
from models.lora import has_adapters, load_adapters
from models.policy import ADAPTER_DIR, PolicyWithValueHead, position_ids_from_mask
from models.reward import score_token_ids
from rlhf.config import PPOConfig
from rlhf.infra.distributed import Shard, all_gather_rows, all_reduce_sum, check_divisible
from rlhf.rl.advantages import compute_gae, masked_mean, masked_whiten
from rlhf.rl.kl import kl_mean_upper_bound, kl_per_token, make_kl_controller
from rlhf.rl.losses import (
    entropy_from_logits,
    entropy_shortfall,
    explained_variance,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from rlhf.rl.normalize import RunningMoments, normalize_scores

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
CHECKPOINT_FILES = ("config.json", "value_head.safetensors", OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
"""Files every complete checkpoint has (besides the weights and the tokenizer)."""
NEGATIVE_KL_TOLERANCE = 1e-3
"""Nats: a KL estimate this far below 0 (after two standard errors) cannot be sampling noise."""
SCORING_CHUNKS = 2
"""Length-sorted chunks the frozen models score a rollout in (``PPOTrainer._score_frozen``)."""

AlertKind = Literal["kl_budget", "kl_negative", "nonfinite", "ratio_explosion"]
ALERT_KINDS: tuple[AlertKind, ...] = ("kl_budget", "kl_negative", "nonfinite", "ratio_explosion")
GoldScorer = Callable[[str, str], float]


@dataclass(frozen=True)
class Alert:
    """Something the monitor saw at a step, and what the trainer did about it."""

    step: int
    kind: AlertKind
    action: Literal["warn", "stop", "rollback", "skip_update", "skip_minibatch"]
    message: str


@dataclass
class StepResult:
    """One iteration's metrics (docs/metrics.md), alerts and sample responses."""

    metrics: dict[str, float]
    alerts: list[Alert] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False
    """True when the KL budget asked to end the run (action stop or rollback); the update was not applied."""


def response_logprobs(
    logits: torch.Tensor, response_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, logits at temperature) of the response tokens, from the logits of a sequence that ends with them
    (all positions, or only the last R + 1: ``logits_to_keep``): position t's logits predict token t+1.
    In fp32 whatever the logits' dtype (bf16 under autocast)."""
    response_logits = logits[:, -response_ids.shape[1] - 1 : -1].float()  # (B, R, V)
    if temperature != 1.0:
        response_logits = response_logits / temperature
    return logprobs_from_logits(response_logits, response_ids), response_logits


def learning_rate_at(cfg: PPOConfig, step: int) -> float:
    """The learning rate of iteration ``step`` (1-based) under ``cfg.lr_schedule``; a function of the step alone,
    so a resumed run continues the same schedule."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    return cfg.learning_rate * (1.0 - (step - 1) / cfg.steps)


def best_checkpoint_step(checkpoint_steps: list[int], history: dict[int, tuple[float, float]], kl_budget: float) -> int:
    """The checkpoint with the highest rlhf reward among those whose KL stayed within the budget.

    ``history[t] = (objective/kl, objective/rlhf_reward)`` measured at step t on the
    policy saved after step t - 1, so checkpoint s is judged by ``history[s + 1]``.
    Ties go to the later checkpoint.
    """
    judged = [
        (history[s + 1][1], s)
        for s in checkpoint_steps
        if s + 1 in history
        and math.isfinite(history[s + 1][0])
        and history[s + 1][0] <= kl_budget
        and math.isfinite(history[s + 1][1])
    ]
    if not judged:
        raise ValueError(
            f"no checkpoint among steps {sorted(checkpoint_steps)} was measured within kl_budget {kl_budget}: "
            "keep the step-0 checkpoint (tasks/ppo.py logs it) or use kl_budget_action='stop'"
        )
    return max(judged)[1]


class LastGoodState:
    """Copies of the trained parameters, the optimizer state and the reward normaliser, refreshed in place.

    ``save`` runs after each update that left finite weights, copying into buffers
    allocated once; ``restore`` puts them back. Costs one extra copy of the trained weights (with LoRA:
    the adapters and the value head) and of Adam's two moments, and one memory copy of each per iteration.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, moments: RunningMoments):
        self.params = params
        self.optimizer = optimizer
        self.moments = moments
        self.param_copies = [p.detach().clone() for p in self.params]
        self.optimizer_copies: dict[int, dict[str, Any]] = {}
        self.moments_state = moments.state_dict()

    @torch.no_grad()
    def save(self) -> None:
        """Remember the current state as the last good one."""
        for param, copy in zip(self.params, self.param_copies):
            copy.copy_(param)
        copies: dict[int, dict[str, Any]] = {}
        for i, param in enumerate(self.params):
            state = self.optimizer.state.get(param)
            if not state:
                continue
            old = self.optimizer_copies.get(i, {})
            copies[i] = {k: _copy_value(v, old.get(k)) for k, v in state.items()}
        self.optimizer_copies = copies
        self.moments_state = self.moments.state_dict()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the last good state back (parameters, optimizer moments and step counts, normaliser)."""
        for param, copy in zip(self.params, self.param_copies):
            param.copy_(copy)
        self.optimizer.state.clear()
        for i, state in self.optimizer_copies.items():
            self.optimizer.state[self.params[i]] = {k: _copy_value(v, None) for k, v in state.items()}
        self.moments.load_state_dict(self.moments_state)


def _copy_value(value: Any, buffer: Any) -> Any:
    """A copy of an optimizer-state entry, written into `buffer` when it fits."""
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(buffer, torch.Tensor) and buffer.shape == value.shape and buffer.dtype == value.dtype:
        return buffer.copy_(value)
    return value.detach().clone()


def require_bf16(device: torch.device) -> None:
    """Refuse bf16 autocast on a GPU without bf16 (the CPU has it)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"ppo.bf16 is true but this GPU ({torch.cuda.get_device_name(device)}) has no bf16 "
            "(it needs compute capability 8.0, Ampere, or later): set ppo.bf16=false"
        )


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class PPOTrainer:
    """Owns the policy, its optimizer, the KL controller, the reward normaliser, the data cursor and the monitor.

    ``ref_model`` is the frozen reference; None when the policy's LM has LoRA adapters, whose reference is
    the same LM with the adapters disabled (no second copy of the weights).
    """

    def __init__(
        self,
        cfg: PPOConfig,
        policy: PolicyWithValueHead,
        ref_model: PreTrainedModel | None,
        reward_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[str],
        seed: int,
        gold_scorer: GoldScorer | None = None,
    ):
        if not prompts:
            raise ValueError("PPO needs at least one prompt: check data.prompts_path")
        if (ref_model is None) != has_adapters(policy.lm):
            raise ValueError(
                "the reference is the policy with its LoRA adapters disabled, or else a separate model: pass "
                "ref_model=None exactly when the policy's LM has adapters (models.lora.add_adapters)"
            )
        self.device = next(policy.parameters()).device
        if cfg.bf16:
            require_bf16(self.device)
        self.cfg = cfg
        # Dropout stays off (eval mode) throughout, as in TRL's PPO: the ratio pi/pi_old must
        # compare one deterministic function before and after the update.
        self.policy = policy.eval()
        self.ref_model = None if ref_model is None else ref_model.eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.gold_scorer = gold_scorer
        self.trained = [p for p in policy.parameters() if p.requires_grad]
        """Every weight, or with LoRA the adapters and the value head: what the optimizer and the guards see."""
        # fused: one kernel for every tensor; torch's default on CPU is a Python loop over them (3.4x slower here)
        self.optimizer = torch.optim.AdamW(self.trained, lr=cfg.learning_rate, eps=1e-5, fused=True)
        self.kl_ctl = make_kl_controller(cfg.kl_control, cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.moments = RunningMoments()
        self.last_good = LastGoodState(self.trained, self.optimizer, self.moments)
        self.step_count = 0
        self.nan_skips = 0
        self.history: dict[int, tuple[float, float]] = {}
        """step -> (objective/kl, objective/rlhf_reward), for choosing a rollback checkpoint."""
        self.data_generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(prompts), generator=self.data_generator).tolist()
        self.cursor = 0
        self.seed = seed
        # This process's share of each batch; DDP averages the gradients when there are several.
        self.shard = Shard.of(cfg.batch_size, "ppo.batch_size")
        check_divisible("ppo.mini_batch_size", cfg.mini_batch_size, self.shard.world)
        self.minibatch_rows = Shard(self.shard.rank, self.shard.world, cfg.mini_batch_size).rows
        self.train_policy: torch.nn.Module = policy
        if self.shard.world > 1:
            self.train_policy = DistributedDataParallel(
                policy, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        torch.manual_seed(seed)

    # -- models ---------------------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        """bf16 autocast for a model forward when ppo.bf16, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The reference LM: the separate frozen model, or the policy's LM with its LoRA adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with self.policy.lm.disable_adapter():
            yield self.policy.lm

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
    def step(self) -> StepResult:
        """One PPO iteration: metrics (names as in docs/metrics.md), alerts, samples, stop request."""
        cfg = self.cfg
        beta = self.kl_ctl.value
        step = self.step_count + 1
        t0 = time.perf_counter()
        lr = learning_rate_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # 1. Generate one response per prompt with the current policy.
        prompts = self.next_prompts()
        with self.autocast():
            rollout = self.generate(prompts)
        texts = decode_responses(self.tokenizer, rollout)
        t1 = time.perf_counter()

        # 2. Log-probs under policy and reference (same temperature as sampling), and the values: the policy's
        #    from the sampling pass when our decode loop sampled (models/generation.py), else a forward pass.
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask  # (B, P+R)
        mask = rollout.response_mask.float()  # (B, R)
        real = mask.bool()
        mine = self.shard.rows  # this process's rows (every row on a single process)
        with torch.no_grad(), self.autocast():
            if rollout.logprobs is not None and rollout.values is not None:
                logprobs, values = rollout.logprobs[mine], rollout.values[mine] * mask[mine]
            else:
                keep = rollout.response_ids.shape[1] + 1  # the positions that predict response tokens, and the last
                logits, values = self.policy(input_ids[mine], attention_mask[mine], logits_to_keep=keep)
                logprobs, _ = response_logprobs(logits, rollout.response_ids[mine], cfg.temperature)
                values = values[:, :-1] * mask[mine]  # (B, R): V(s_t) before action t
            # 3. The reference's log-probs, and the reward model's score of each whole response; penalise
            #    responses that never end.
            ref_logprobs, ref_entropy, scores = self._score_frozen(rollout, mine)
            scores = scores - cfg.missing_eos_penalty * (~rollout.ended[mine]).float()  # (B,)
        # Several processes: each now holds the whole batch's numbers (identity on one process).
        logprobs, ref_logprobs, ref_entropy, values, scores = (
            all_gather_rows(t) for t in (logprobs, ref_logprobs, ref_entropy, values, scores)
        )
        t2 = time.perf_counter()

        kl = torch.where(real, logprobs - ref_logprobs, torch.zeros_like(logprobs))  # (B, R) k1
        seq_kl = kl.sum(1)  # (B,) sequence-level KL estimate, for logging, the controller and the budget
        kl_penalty = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, R)
        non_score_reward = -beta * kl_penalty  # (B, R)
        mean_kl = seq_kl.mean().item()
        rlhf_reward = (scores + non_score_reward.sum(1)).mean().item()
        self.history[step] = (mean_kl, rlhf_reward)

        # 4. Monitor: non-finite inputs, the KL budget, a negative KL estimate.
        finite = _all_finite(scores, logprobs[real], ref_logprobs[real], values[real])
        alerts, stop = self._monitor(step, finite, seq_kl)
        update = finite and not stop
        if not finite:
            self._restore_last_good()

        stats: dict[str, float] = {}
        if update:
            # 5. Per-token rewards: KL penalty on every token, the (normalised) score on the last one.
            self.moments.update(scores)
            rewards_at_end = normalize_scores(scores, self.moments, cfg.reward_clip) if cfg.normalize_reward else scores
            rewards = non_score_reward.clone()
            last = rollout.lengths - 1  # (B,) index of each response's final token
            rewards[torch.arange(len(last)), last] += rewards_at_end

            # 6. Advantages with GAE; whiten them over the batch.
            advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            stats["value/explained_variance"] = explained_variance(values, returns, mask)

            # 7. Several epochs of clipped PPO updates over minibatches.
            update_stats, skipped, peak_ratio, finite = self._update(
                rollout, logprobs, values, advantages, returns, mask, ref_entropy
            )
            finite = finite and _all_finite(*(p.detach() for p in self.trained))
            if not finite:
                self._restore_last_good()
                alerts.append(
                    Alert(
                        step,
                        "nonfinite",
                        "skip_update",
                        "non-finite loss, gradient or parameter during the update: last good state restored",
                    )
                )
                stats = {}
            else:
                stats.update(update_stats)
                self.last_good.save()  # finite weights after a full update: the new last good state
                # 8. Adapt the KL coefficient to the KL this batch actually had.
                self.kl_ctl.update(mean_kl, cfg.batch_size)
            stats["policy/skipped_minibatches"] = float(skipped)
            if skipped:
                alerts.append(
                    Alert(
                        step,
                        "ratio_explosion",
                        "skip_minibatch",
                        f"{skipped} minibatch(es) skipped: mean probability ratio up to {peak_ratio:.3g} "
                        f"> ratio_skip_threshold {cfg.ratio_skip_threshold:g}",
                    )
                )
        t3 = time.perf_counter()
        self.step_count = step

        metrics = {
            "objective/kl": mean_kl,
            "objective/kl_k2": (kl_per_token(logprobs, ref_logprobs, "k2") * mask).sum(1).mean().item(),
            "objective/kl_k3": (kl_per_token(logprobs, ref_logprobs, "k3") * mask).sum(1).mean().item(),
            "objective/kl_coef": beta,
            "policy/learning_rate": lr,
            "objective/entropy": (-logprobs * mask).sum(1).mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/non_score_reward": non_score_reward.sum(1).mean().item(),
            "objective/rlhf_reward": rlhf_reward,
            "response/length_mean": rollout.lengths.float().mean().item(),
            "response/eos_rate": rollout.ended.float().mean().item(),
            "policy/nan_skips": float(self.nan_skips),
            "timing/generation_s": t1 - t0,
            "timing/scoring_s": t2 - t1,
            "timing/update_s": t3 - t2,
            "timing/step_s": t3 - t0,
            **stats,
        }
        if self.gold_scorer is not None:
            gold = [self.gold_scorer(p, r) for p, r in zip(prompts, texts)]
            metrics["objective/gold_scores"] = sum(gold) / len(gold)
        samples = [
            {"step": step, "prompt": p, "response": r, "score": s, "kl": k}
            for p, r, s, k in zip(prompts, texts, scores.tolist(), seq_kl.tolist())
        ]
        return StepResult(metrics, alerts, samples, stop)

    def generate(self, prompts: list[str]) -> Rollout:
        """One response per prompt of the global batch; the same Rollout on every process.

        On one process: one ``sample`` call on the global RNG. On several, each samples its
        shard under a seed of (run seed, step, rank), so a resumed run samples the same,
        and the shards are gathered (prompts left-padded, responses right-padded).
        """
        cfg = self.cfg
        value_head = self.policy.value_head
        if self.shard.world == 1:
            return sample(self.policy.lm, self.tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, value_head)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(hash((self.seed, self.step_count, self.shard.rank)) & 0xFFFF_FFFF)
            local = sample(
                self.policy.lm,
                self.tokenizer,
                prompts[self.shard.rows],
                cfg.max_new_tokens,
                cfg.temperature,
                value_head,
            )
        pad = self.tokenizer.pad_token_id
        return Rollout(
            all_gather_rows(local.query_ids, pad, left=True),
            all_gather_rows(local.query_mask, 0, left=True),
            all_gather_rows(local.response_ids, pad),
            all_gather_rows(local.response_mask, 0),
            all_gather_rows(local.ended),
            None if local.logprobs is None else all_gather_rows(local.logprobs, 0.0),
            None if local.values is None else all_gather_rows(local.values, 0.0),
        )

    def _score_frozen(self, rollout: Rollout, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reference log-probs (n, R), reference entropies (n, R), reward-model scores (n,)) of the rollout's
        ``rows``, under no_grad; the entropy is the reference's over the whole vocabulary at each response position
        (at the sampling temperature), the floor of the policy's entropy bonus (``ppo.entropy_floor``).

        The rows go through both frozen models sorted by response length in ``SCORING_CHUNKS`` chunks, each
        trimmed to its longest response and to the left padding its prompts share: less padding computed than in
        one batch padded to the longest of all (docs/benchmarks.md), the same numbers up to float rounding.
        Log-probs and entropies after a response's end are 0.
        """
        query_len = rollout.query_ids.shape[1]
        index = torch.arange(len(rollout.lengths))[rows]
        lengths = rollout.lengths[index]
        leading_pad = (rollout.query_mask[index] == 0).long().cumprod(1).sum(1)  # (n,) left padding of each prompt
        ref_logprobs = torch.zeros(len(index), rollout.response_ids.shape[1], device=self.device)
        ref_entropy = torch.zeros_like(ref_logprobs)
        scores = torch.zeros(len(index), device=self.device)
        for chunk in torch.argsort(lengths).chunk(SCORING_CHUNKS):
            r, first = int(lengths[chunk].max()), int(leading_pad[chunk].min())
            ids = rollout.input_ids[index[chunk], first : query_len + r]
            mask = rollout.attention_mask[index[chunk], first : query_len + r]
            with self.reference() as ref_model:
                ref_logits = ref_model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                    logits_to_keep=r + 1,
                ).logits
            ref_logprobs[chunk, :r], response_logits = response_logprobs(
                ref_logits, rollout.response_ids[index[chunk], :r], self.cfg.temperature
            )
            ref_entropy[chunk, :r] = entropy_from_logits(response_logits) * rollout.response_mask[index[chunk], :r]
            scores[chunk] = score_token_ids(self.reward_model, ids, mask, self.tokenizer.pad_token_id)
        return ref_logprobs, ref_entropy, scores

    def _monitor(self, step: int, finite: bool, seq_kl: torch.Tensor) -> tuple[list[Alert], bool]:
        """Alerts for this iteration's rollout, and whether the KL budget asks to stop."""
        cfg = self.cfg
        mean_kl = seq_kl.mean().item()
        alerts: list[Alert] = []
        stop = False
        if not finite:
            alerts.append(
                Alert(
                    step,
                    "nonfinite",
                    "skip_update",
                    "non-finite reward-model score, log-prob or value: update skipped, last good state restored",
                )
            )
        if cfg.kl_budget is not None and mean_kl > cfg.kl_budget:
            action = cfg.kl_budget_action
            alerts.append(
                Alert(
                    step,
                    "kl_budget",
                    action,
                    f"objective/kl {mean_kl:.3f} > kl_budget {cfg.kl_budget:g} "
                    f"(policy after step {step - 1}): {action}",
                )
            )
            stop = action in ("stop", "rollback")
        if kl_mean_upper_bound(seq_kl) < -NEGATIVE_KL_TOLERANCE:
            alerts.append(
                Alert(
                    step,
                    "kl_negative",
                    "warn",
                    f"objective/kl {mean_kl:.4f} < 0 beyond sampling noise: the log-probs do not match "
                    "the sampling distribution (temperature, top-k/top-p, padding or position ids)",
                )
            )
        return alerts, stop

    def _restore_last_good(self) -> None:
        """Undo this iteration's changes to the weights, optimizer and normaliser; count the skip."""
        self.last_good.restore()
        self.nan_skips += 1

    def _update(
        self,
        rollout: Rollout,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
        ref_entropy: torch.Tensor,
    ) -> tuple[dict[str, float], int, float, bool]:
        """PPO epochs over minibatches: (mean statistics, skipped minibatches, largest mean ratio, all finite)."""
        cfg = self.cfg
        query_len = rollout.query_ids.shape[1]
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        leading_pad = (rollout.query_mask == 0).long().cumprod(1).sum(1)  # (B,) left padding of each prompt
        totals: dict[str, float] = {}
        applied = skipped = 0
        peak_ratio = 0.0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                # a. Forward the minibatch; losses against the rollout's log-probs and values.
                idx = order[start : start + cfg.mini_batch_size][self.minibatch_rows]  # this process's share
                # Padding trimmed: the minibatch's longest response, and the left padding all its prompts share.
                r = int(rollout.lengths[idx].max())
                first = int(leading_pad[idx].min())
                m = mask[idx, :r]
                with self.autocast():
                    logits, values = self.train_policy(
                        input_ids[idx, first : query_len + r],
                        attention_mask[idx, first : query_len + r],
                        logits_to_keep=r + 1,
                    )
                logprobs, response_logits = response_logprobs(logits, rollout.response_ids[idx, :r], cfg.temperature)
                values = values[:, :-1]
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx, :r], advantages[idx, :r], m, cfg.clip_range)
                vf_loss, vf_stats = value_loss(values, old_values[idx, :r], returns[idx, :r], m, cfg.clip_range_value)
                with torch.set_grad_enabled(cfg.ent_coef != 0):  # logged either way; a gradient only when it counts
                    token_entropy = entropy_from_logits(response_logits)  # (mb, r)
                    entropy = masked_mean(token_entropy, m)
                    shortfall = entropy_shortfall(token_entropy, ref_entropy[idx, :r], m)
                bonus = -shortfall if cfg.entropy_floor else entropy
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * bonus

                # b. Guards: a non-finite loss ends the update (the caller restores); an exploding ratio skips.
                # The mean ratio, as TRL's `ratio_threshold`: the max over tokens is routinely large on rare tokens.
                finite, batch_ratio, weight = self._global_minibatch(loss, pg_stats["ratio_mean"], m)
                if not finite:
                    return totals, skipped, peak_ratio, False
                peak_ratio = max(peak_ratio, batch_ratio)
                if batch_ratio > cfg.ratio_skip_threshold:
                    skipped += 1
                    continue

                # c. Clipped gradient step; a non-finite gradient norm would write NaN into the weights.
                self.optimizer.zero_grad(set_to_none=True)
                (loss * weight if self.shard.world > 1 else loss).backward()  # DDP averages the gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    return totals, skipped, peak_ratio, False
                self.optimizer.step()
                applied += 1
                for key, value in {
                    "loss/policy_avg": pg_loss.item(),
                    "loss/value_avg": vf_loss.item(),
                    "policy/approxkl_avg": pg_stats["approxkl"].item(),
                    "policy/clipfrac_avg": pg_stats["clipfrac"].item(),
                    "policy/entropy_avg": entropy.item(),
                    "policy/entropy_shortfall_avg": shortfall.item(),
                    "policy/ratio_avg": pg_stats["ratio_mean"].item(),
                    "value/clipfrac_avg": vf_stats["clipfrac"].item(),
                    "policy/grad_norm": grad_norm.item(),
                }.items():
                    totals[key] = totals.get(key, 0.0) + value * weight
        if self.shard.world > 1:  # token-weighted means over the processes: the global minibatch's statistics
            sums = all_reduce_sum(list(totals.values()), self.device)
            totals = {k: v / self.shard.world for k, v in zip(totals, sums)}
        out = {k: v / applied for k, v in totals.items()} if applied else {}
        return out, skipped, peak_ratio, True

    def _global_minibatch(
        self, loss: torch.Tensor, ratio_mean: torch.Tensor, mask: torch.Tensor
    ) -> tuple[bool, float, float]:
        """(loss finite everywhere, mean ratio over the global minibatch, loss weight of this process).

        Several processes agree on both guards, so all skip or step together. The weight is
        this process's share of the minibatch's tokens times the number of processes: DDP's
        mean of the weighted per-process token means is the token mean over the whole minibatch.
        """
        if self.shard.world == 1:
            return bool(torch.isfinite(loss)), ratio_mean.item(), 1.0
        tokens = mask.sum().item()
        finite, ratio_sum, total = all_reduce_sum(
            [float(torch.isfinite(loss)), ratio_mean.item() * tokens, tokens], self.device
        )
        return finite == self.shard.world, ratio_sum / total, tokens * self.shard.world / total

    # -- rollback -------------------------------------------------------------------------
    def best_checkpoint_step(self, checkpoint_steps: list[int]) -> int:
        """Among checkpoint_steps, the best one measured within the KL budget (see best_checkpoint_step)."""
        if self.cfg.kl_budget is None:
            raise ValueError("choosing a checkpoint within the KL budget needs ppo.kl_budget: set it")
        return best_checkpoint_step(checkpoint_steps, self.history, self.cfg.kl_budget)

    # -- several processes -----------------------------------------------------------------
    def sync_from_main(self) -> None:
        """Copy rank 0's whole state to the other processes (a no-op on one process).

        Weights, optimizer, KL controller, normaliser, data cursor, history and RNG: a run
        that resumed from a checkpoint loaded it on rank 0 only. Call it on every process
        before the first step.
        """
        if self.shard.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for param in self.trained:  # frozen weights are the SFT checkpoint's on every process
                dist.broadcast(param.data, src=0)
        state = [
            {
                "trainer": self.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": self.rng_state_dict(),
            }
            if self.shard.rank == 0
            else None
        ]
        dist.broadcast_object_list(state, src=0)
        if self.shard.rank != 0:
            self.load_state_dict(state[0]["trainer"])
            self.optimizer.load_state_dict(state[0]["optimizer"])
            self.load_rng_state_dict(state[0]["rng"])
        self.last_good.save()

    # -- state: defined once here, used by checkpoints and by sync_from_main ----------------
    def state_dict(self) -> dict[str, Any]:
        """The loop's state beside weights, optimizer and RNG (JSON-able): step, data cursor and
        order, KL controller, reward normaliser, NaN skips, per-checkpoint history."""
        return {
            "step": self.step_count,
            "cursor": self.cursor,
            "order": list(self.order),
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": self.moments.state_dict(),
            "nan_skips": self.nan_skips,
            "history": {str(k): list(v) for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a KL controller of another kind is refused."""
        self._require_kl_controller(state["kl_controller"]["kind"])
        self.step_count = int(state["step"])
        self.cursor = int(state["cursor"])
        self.order = list(state["order"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["reward_moments"])
        self.nan_skips = int(state["nan_skips"])
        self.history = {int(k): (float(v[0]), float(v[1])) for k, v in state["history"].items()}

    def _require_same_adapters(self, saved_with_adapters: bool) -> None:
        if saved_with_adapters and not has_adapters(self.policy.lm):
            raise ValueError(
                "the saved run trained LoRA adapters (its checkpoint has an adapter/ folder) but model.lora_r is 0: "
                "set model.lora_r (and lora_alpha, lora_target_modules) as in that run to continue it"
            )
        if not saved_with_adapters and has_adapters(self.policy.lm):
            raise ValueError(
                "the saved run trained every weight (its checkpoint has no adapter/ folder) but model.lora_r is "
                "set: set model.lora_r=0 to continue it"
            )

    def _require_kl_controller(self, kind: str) -> None:
        if kind != self.cfg.kl_control:
            raise ValueError(
                f"the saved run was trained with a {kind} KL controller but ppo.kl_control is {self.cfg.kl_control!r}: "
                f"set ppo.kl_control={kind} to continue it"
            )

    def rng_state_dict(self) -> dict[str, Any]:
        """The random generators: torch's (and CUDA's), and the prompt sampler's."""
        rng = {"torch": torch.get_rng_state(), "data": self.data_generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    def load_rng_state_dict(self, rng: dict[str, Any]) -> None:
        """Restore what ``rng_state_dict`` returned."""
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, out_dir: str | Path) -> Path:
        """Everything needed to resume: policy, value head, optimizer, KL controller, normaliser, RNG, cursor."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.policy.save(out)
        self.tokenizer.save_pretrained(out)
        torch.save(self.optimizer.state_dict(), out / OPTIMIZER_FILE)
        torch.save(self.rng_state_dict(), out / RNG_FILE)
        (out / STATE_FILE).write_text(json.dumps(self.state_dict()))
        return out

    def load_checkpoint(self, checkpoint_dir: str | Path) -> None:
        """Restore the full state written by save_checkpoint, weights included."""
        ckpt = Path(checkpoint_dir)
        missing = [name for name in CHECKPOINT_FILES if not (ckpt / name).exists()]
        if missing:
            raise ValueError(
                f"{ckpt} is not a complete PPO checkpoint (missing {', '.join(missing)}): "
                "resume from a folder logged as checkpoints/step_XXXXX by a PPO run"
            )
        state = json.loads((ckpt / STATE_FILE).read_text())
        self._require_kl_controller(state["kl_controller"]["kind"])  # refuse before loading any weights
        self._require_same_adapters((ckpt / ADAPTER_DIR).is_dir())
        if has_adapters(self.policy.lm):
            # Only the adapters trained: the base weights are the SFT checkpoint this trainer was built on
            # (the stage refuses to resume against another one), so they are not loaded again.
            load_adapters(self.policy.lm, ckpt / ADAPTER_DIR)
        else:
            # The policy's own class loads the weights: a model with remote code needs no trust_remote_code again.
            require_safetensors(str(ckpt))
            lm_class = type(self.policy.lm)
            self.policy.lm.load_state_dict(
                lm_class.from_pretrained(str(ckpt), dtype=torch.float32, use_safetensors=True).state_dict()
            )
        self.policy.load_value_head(ckpt)
        self.policy.to(self.device)
        self.load_state_dict(state)
        self.optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, map_location=self.device, weights_only=True))
        self.load_rng_state_dict(torch.load(ckpt / RNG_FILE, weights_only=True))
        self.last_good.save()
