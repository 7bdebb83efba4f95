"""PPO stage: KL control, monitoring with actions, resume; on the tiny stack (SFT + reward model).

The fast tests check the pure pieces (checkpoint choice, last-good snapshots,
config errors); the slow ones run the trainer or the whole stage on the tiny stack.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import rlhf.ppo.resume as ppo_resume
import rlhf.ppo.trainer as ppo_trainer
import tasks.ppo as ppo_stage
from models.generation import sample
from models.loading import load_causal_lm, load_reward_model, load_tokenizer
from models.lora import add_adapters, has_adapters, lora_config
from models.policy import ADAPTER_DIR, PolicyWithValueHead, position_ids_from_mask
from models.reward import score_token_ids
from rlhf.config import ConfigError, PPOConfig, load_config
from rlhf.data.loading import load_split
from rlhf.infra.tracking import download
from rlhf.ppo.trainer import LastGoodState, PPOTrainer, best_checkpoint_step, learning_rate_at, require_bf16
from rlhf.rl.losses import entropy_from_logits
from rlhf.rl.normalize import RunningMoments
from tasks.common import Checkpoint, PPOResult

SMALL = {"batch_size": 8, "mini_batch_size": 4, "max_new_tokens": 16, "kl_horizon": 8}
"""The smallest iteration that exercises every part: 8 episodes of up to 16 tokens, 2 minibatches."""


# ------------------------------------------------------------------------------ pure pieces
def test_best_checkpoint_is_the_highest_reward_measured_within_budget() -> None:
    # Checkpoint s is judged by history[s + 1] = (kl, rlhf_reward); budget 4:
    #   s=0 -> (0.0, 0.1) ok ; s=2 -> (2.0, 0.5) ok ; s=4 -> (3.5, 0.9) ok, best ; s=6 -> (5.0, 1.2) over budget
    #   s=8 -> not measured yet (no history[9])
    history = {1: (0.0, 0.1), 3: (2.0, 0.5), 5: (3.5, 0.9), 7: (5.0, 1.2)}
    assert best_checkpoint_step([0, 2, 4, 6, 8], history, kl_budget=4.0) == 4
    # with a tighter budget of 2 only s=0 and s=2 remain: s=2 (0.5 > 0.1)
    assert best_checkpoint_step([0, 2, 4, 6, 8], history, kl_budget=2.0) == 2
    # a non-finite measurement (the NaN guard's step) never wins; ties go to the later checkpoint
    history = {1: (0.0, 0.3), 2: (float("nan"), 5.0), 3: (1.0, 0.3)}
    assert best_checkpoint_step([0, 1, 2], history, kl_budget=4.0) == 2
    with pytest.raises(ValueError, match="step-0 checkpoint"):
        best_checkpoint_step([6], history={7: (5.0, 1.0)}, kl_budget=4.0)


def test_learning_rate_schedule() -> None:
    # linear over 4 iterations from 0.4: 0.4 * (1 - (step - 1) / 4) = 0.4, 0.3, 0.2, 0.1; constant: 0.4 throughout
    linear = PPOConfig(learning_rate=0.4, steps=4, lr_schedule="linear")
    assert [learning_rate_at(linear, s) for s in (1, 2, 3, 4)] == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-12)
    constant = PPOConfig(learning_rate=0.4, steps=4, lr_schedule="constant")
    assert [learning_rate_at(constant, s) for s in (1, 4)] == [0.4, 0.4]


def test_last_good_state_restores_weights_optimizer_and_normaliser() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    moments = RunningMoments()
    snapshot = LastGoodState(list(model.parameters()), optimizer, moments)

    def train_step() -> None:
        optimizer.zero_grad()
        model(torch.ones(4, 3)).pow(2).sum().backward()
        optimizer.step()

    train_step()
    moments.update(torch.tensor([1.0, 3.0]))
    snapshot.save()
    good_params = [p.detach().clone() for p in model.parameters()]
    good_optimizer = copy.deepcopy(optimizer.state_dict())
    good_moments = moments.state_dict()

    # two more steps and a poisoned weight, then restore: everything is back, bit for bit
    train_step()
    train_step()
    moments.update(torch.tensor([100.0]))
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    snapshot.restore()
    for param, good in zip(model.parameters(), good_params):
        assert torch.equal(param, good)
    restored = optimizer.state_dict()["state"]
    for i, state in good_optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(restored[i][key], value), key
    assert moments.state_dict() == good_moments
    # and the optimizer continues from the restored moments (step count 1 -> 2)
    train_step()
    assert optimizer.state_dict()["state"][0]["step"].item() == 2.0


def test_ppo_config_rejects_settings_the_controller_cannot_honour() -> None:
    with pytest.raises(ConfigError, match="raise kl_horizon"):
        load_config(None, ["ppo.batch_size=32", "ppo.kl_horizon=16"])
    with pytest.raises(ConfigError, match="raise kl_budget"):
        load_config(None, ["ppo.kl_target=6", "ppo.kl_budget=5"])
    # a fixed coefficient has no target to steer into the budget
    assert load_config(None, ["ppo.kl_control=fixed", "ppo.kl_budget=1"]).ppo.kl_budget == 1.0


# --------------------------------------------------------------------------- on the tiny stack
@pytest.fixture(scope="module")
def stack_dirs(tiny_stack, tmp_path_factory) -> tuple[str, str]:
    """Local copies of the tiny stack's SFT and reward-model checkpoints."""
    into = tmp_path_factory.mktemp("stack_dirs")
    return str(download(tiny_stack.sft.uri, into)), str(download(tiny_stack.reward.uri, into))


def make_trainer(stack_dirs: tuple[str, str], tiny_stack, lora_r: int = 0, **ppo) -> PPOTrainer:
    """A trainer on the tiny stack with SMALL settings plus `ppo` overrides (seed 0); LoRA adapters of rank
    `lora_r` on every linear layer (then no reference model: the policy with its adapters disabled)."""
    sft_dir, rm_dir = stack_dirs
    torch.manual_seed(0)
    tokenizer = load_tokenizer(sft_dir)
    adapters = lora_config(lora_r, 16, 0.0, "all-linear", "causal_lm")
    return PPOTrainer(
        PPOConfig(**{**SMALL, **ppo}),
        PolicyWithValueHead(add_adapters(load_causal_lm(sft_dir), adapters)),
        None if adapters else load_causal_lm(sft_dir),
        load_reward_model(rm_dir, tokenizer.pad_token_id),
        tokenizer,
        list(load_split(tiny_stack.paths["prompts"])["prompt"]),
        seed=0,
    )


def params_of(trainer: PPOTrainer) -> list[torch.Tensor]:
    """Copies of the policy's parameters (LM and value head)."""
    return [p.detach().clone() for p in trainer.policy.parameters()]


def eos_only_model():
    """A tiny GPT-2 whose every next-token distribution puts ~all its mass on EOS, and its tokenizer."""
    from models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(["Customer: I forgot my password.\nAgent: I sent a reset link."] * 4, vocab_size=300)
    model = build_model(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    with torch.no_grad():  # only EOS has a (tied) embedding and ln_f outputs it: logit 50 for EOS, 0 for the rest
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[tokenizer.eos_token_id, 0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 50.0
    return model, tokenizer


def test_sampling_does_not_block_eos_that_the_logprobs_allow() -> None:
    # Sampling must draw from the distribution whose log-probs PPO uses. An EOS block at the first
    # position (min_new_tokens=1) would force a non-EOS token whose log-prob is ~-inf here.
    model, tokenizer = eos_only_model()
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, ["Customer: hi\nAgent:"] * 4, max_new_tokens=8)
    assert rollout.response_ids[:, 0].tolist() == [tokenizer.eos_token_id] * 4
    assert rollout.lengths.tolist() == [1] * 4 and rollout.ended.all()


def test_value_head_starts_at_zero() -> None:
    # Zero-initialised (Huang et al. 2022, "The N implementation details of RLHF with PPO"): the first
    # advantages are the rewards themselves, not rewards minus a random value per token.
    model, tokenizer = eos_only_model()
    policy = PolicyWithValueHead(model)
    enc = tokenizer(["Customer: hi\nAgent:"], return_tensors="pt")
    _, values = policy(enc.input_ids, enc.attention_mask)
    assert values.abs().max().item() == 0.0


def test_value_head_can_start_as_the_reward_models_score_head(tmp_path) -> None:
    # On the trunk the reward model was trained from, the copied head's value at each position is the reward
    # model's score of the sequence cut there; here the two share the trunk exactly, so they agree to rounding.
    from models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(["Customer: I forgot my password.\nAgent: I sent a reset link."] * 4, vocab_size=300)
    torch.manual_seed(0)
    lm = build_model(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    lm.save_pretrained(tmp_path)
    reward_model = load_reward_model(str(tmp_path), tokenizer.pad_token_id)  # the same trunk, a random score head
    assert reward_model.score.weight.abs().max() > 0
    policy = PolicyWithValueHead(lm)
    assert policy.init_value_head_from(reward_model)
    enc = tokenizer(["Customer: I forgot my password.\nAgent: I sent"], return_tensors="pt")
    _, values = policy(enc.input_ids, enc.attention_mask)
    for cut in range(1, enc.input_ids.shape[1] + 1):
        ids, mask = enc.input_ids[:, :cut], enc.attention_mask[:, :cut]
        expected = score_token_ids(reward_model, ids, mask, tokenizer.pad_token_id)
        torch.testing.assert_close(values[:, cut - 1], expected, rtol=0, atol=1e-6)

    # A reward model of another hidden size (or without a `score` head) leaves the head as it was: zeros.
    other = build_model(tokenizer, n_layer=1, n_embd=8, n_head=2, n_positions=64)
    other.save_pretrained(tmp_path / "other")
    fresh = PolicyWithValueHead(build_model(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=64))
    assert not fresh.init_value_head_from(load_reward_model(str(tmp_path / "other"), tokenizer.pad_token_id))
    assert not fresh.init_value_head_from(lm)
    assert fresh.value_head.weight.abs().max() == 0 and fresh.value_head.bias.abs().max() == 0


@pytest.mark.slow
def test_adaptive_controller_keeps_kl_near_target(stack_dirs, tiny_stack) -> None:
    # Target 2 nats; horizon = one batch, so beta moves by the clipped error itself (up to 20%) each
    # iteration. beta starts high (2.0) so that its decay while KL is still below target (warm-up)
    # lands near what holds KL at 2 at this learning rate. Started at 1.0 or 0.5 it decays too far and
    # KL overshoots: rolling mean up to 4.2 or 5.1 x target (measured on the stack before issue 21's
    # model change, seed 0). Which tokens a run samples moves with every change of float rounding (the
    # sampler, the threads, the batch shapes), and the 20%-a-step controller lets single trajectories
    # drift: after warm-up the rolling mean of 5 stayed within 0.77-1.46 x target on one, 0.87-1.77 x,
    # 0.85-2.03 x, 0.83-1.89 x and 0.63-2.80 x on others (the last with beta at its fastest rise for the
    # last 12 steps; one thread, as under `make test`). The mean over steps 9-25 of the last three was
    # 1.58, 1.46 and 1.78 x target: that mean is held to 0.5-2 x target.
    target, horizon, batch = 2.0, 16, 16
    trainer = make_trainer(
        stack_dirs,
        tiny_stack,
        batch_size=batch,
        mini_batch_size=8,
        kl_target=target,
        kl_horizon=horizon,
        kl_coef=2.0,
        kl_budget=None,
        ent_coef=0.0,  # the entropy bonus pushes KL up (rolling mean to 2-4x target on this stack)
        lr_schedule="constant",  # as measured above; a decaying rate moves the policy, and the KL, less each step
    )
    kls, betas = [], []
    for _ in range(25):
        metrics = trainer.step().metrics
        kls.append(metrics["objective/kl"])
        betas.append(metrics["objective/kl_coef"])
    warm_up = 8
    held = kls[warm_up:]
    assert 0.5 * target <= sum(held) / len(held) <= 2.0 * target, (kls, betas)
    # The controller is what holds it: each iteration's beta follows Ziegler's rule from the KL logged
    # the iteration before, beta_{t+1} = beta_t * (1 + clip(KL_t / target - 1, -0.2, 0.2) * batch / horizon).
    for t in range(len(kls) - 1):
        error = min(max(kls[t] / target - 1.0, -0.2), 0.2)
        assert betas[t + 1] == pytest.approx(betas[t] * (1.0 + error * batch / horizon), rel=1e-12), t


@pytest.mark.slow
def test_reference_entropy_is_the_reference_models_own(stack_dirs, tiny_stack) -> None:
    # The floor of the entropy bonus (ppo.entropy_floor) is the reference's entropy at each response position,
    # at the sampling temperature, 0 after a response's end: the chunked, trimmed scoring pass must give what
    # one forward of the whole padded batch gives.
    trainer = make_trainer(stack_dirs, tiny_stack, temperature=0.7)
    rollout = trainer.generate(trainer.next_prompts())
    _, ref_entropy, _ = trainer._score_frozen(rollout, slice(None))
    with torch.no_grad():
        logits = trainer.ref_model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids_from_mask(rollout.attention_mask),
        ).logits
    r = rollout.response_ids.shape[1]
    expected = entropy_from_logits(logits[:, -r - 1 : -1] / 0.7) * rollout.response_mask
    torch.testing.assert_close(ref_entropy, expected, atol=1e-5, rtol=0)
    assert (ref_entropy[rollout.response_mask.bool()] > 0).all()
    # ...and the update logs how far the policy's entropy fell below it.
    shortfall = trainer.step().metrics["policy/entropy_shortfall_avg"]
    assert math.isfinite(shortfall) and shortfall >= 0


@pytest.mark.slow
def test_nan_guard_restores_last_good_state(stack_dirs, tiny_stack, monkeypatch) -> None:
    trainer = make_trainer(stack_dirs, tiny_stack)
    assert not trainer.step().alerts  # 0. one good iteration
    good_params = params_of(trainer)
    good_optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    good_moments, good_beta = trainer.moments.state_dict(), trainer.kl_ctl.value

    def assert_state_is_last_good() -> None:
        for param, good in zip(trainer.policy.parameters(), good_params):
            assert torch.equal(param, good)
        state = trainer.optimizer.state_dict()["state"]
        for i, entry in good_optimizer["state"].items():
            assert all(torch.equal(state[i][k], v) for k, v in entry.items())
        assert trainer.moments.state_dict() == good_moments
        assert trainer.kl_ctl.value == good_beta

    # 1. NaN in the second minibatch's loss, after the first minibatch's update was applied.
    real_value_loss, calls, optimizer_steps = ppo_trainer.value_loss, [], []
    real_optimizer_step = trainer.optimizer.step

    def nan_on_second_call(*args, **kwargs):
        loss, stats = real_value_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 2 else (loss, stats)

    monkeypatch.setattr(ppo_trainer, "value_loss", nan_on_second_call)
    monkeypatch.setattr(trainer.optimizer, "step", lambda: optimizer_steps.append(1) or real_optimizer_step())
    result = trainer.step()
    assert len(calls) == 2 and len(optimizer_steps) == 1  # the weights had moved before the NaN
    assert [(a.kind, a.action) for a in result.alerts] == [("nonfinite", "skip_update")]
    assert result.metrics["policy/nan_skips"] == 1.0
    assert "loss/policy_avg" not in result.metrics
    assert_state_is_last_good()
    monkeypatch.undo()

    # 2. NaN scores from the reward model: caught before they reach the running normaliser.
    nan_scores = lambda model, ids, *a: torch.full((ids.shape[0],), float("nan"))  # noqa: E731
    monkeypatch.setattr(ppo_trainer, "score_token_ids", nan_scores)
    result = trainer.step()
    assert [(a.kind, a.action) for a in result.alerts] == [("nonfinite", "skip_update")]
    assert result.metrics["policy/nan_skips"] == 2.0 and math.isnan(result.metrics["objective/scores"])
    assert_state_is_last_good()
    monkeypatch.undo()

    # 3. The state is usable: the next iteration updates normally.
    result = trainer.step()
    assert not result.alerts and result.metrics["policy/nan_skips"] == 2.0
    assert all(math.isfinite(v) for k, v in result.metrics.items() if k != "value/explained_variance")
    assert any(not torch.equal(p, g) for p, g in zip(trainer.policy.parameters(), good_params))


@pytest.mark.slow
@pytest.mark.parametrize("action", ["warn", "stop"])
def test_kl_budget_warns_or_stops(stack_dirs, tiny_stack, action) -> None:
    # Fixed beta 0 and a high learning rate: step 1 measures the SFT policy (KL 0), step 2 is far past 0.05.
    # The ratio guard is out of the way (its own test is below): at this learning rate, with a zero-initialised
    # value head, step 1's second epoch can reach a mean ratio above 10 and would add a second alert.
    trainer = make_trainer(
        stack_dirs,
        tiny_stack,
        kl_control="fixed",
        kl_coef=0.0,
        learning_rate=1e-3,
        kl_budget=0.05,
        kl_budget_action=action,
        ratio_skip_threshold=1e6,
    )
    first = trainer.step()
    assert first.metrics["objective/kl"] == pytest.approx(0.0, abs=1e-4) and not first.alerts
    before = params_of(trainer)
    result = trainer.step()
    assert result.metrics["objective/kl"] > 0.05
    assert [(a.kind, a.action) for a in result.alerts] == [("kl_budget", action)]
    assert "kl_budget 0.05" in result.alerts[0].message
    moved = any(not torch.equal(p, b) for p, b in zip(trainer.policy.parameters(), before))
    if action == "warn":  # warned, and trained on
        assert not result.stop and moved and "loss/policy_avg" in result.metrics
    else:  # asked to stop, and left the measured policy as it was
        assert result.stop and not moved and "loss/policy_avg" not in result.metrics


@pytest.mark.slow
def test_negative_kl_estimate_raises_a_warning(stack_dirs, tiny_stack, monkeypatch) -> None:
    # The classic bug: log-probs of a distribution other than the one that sampled. Here the
    # responses come from the reference while the policy differs from it, so the k1 estimate
    # is E_ref[log pi - log ref] = -KL(ref || pi) < 0.
    trainer = make_trainer(stack_dirs, tiny_stack, kl_budget=None)
    with torch.no_grad():
        for param in trainer.policy.lm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    # Without the sampling pass's own log-probs (as from generate(), for architectures our decode loop does not
    # serve) the trainer recomputes them with the policy: the path where this bug can happen.
    monkeypatch.setattr(
        ppo_trainer,
        "sample",
        lambda model, *a, **k: dataclasses.replace(sample(trainer.ref_model, *a, **k), logprobs=None, values=None),
    )
    result = trainer.step()
    assert result.metrics["objective/kl"] < 0
    assert ("kl_negative", "warn") in [(a.kind, a.action) for a in result.alerts]


@pytest.mark.slow
def test_exploding_ratio_skips_the_minibatch(stack_dirs, tiny_stack, monkeypatch) -> None:
    # Every token's advantage +1 at the default learning rate, so each gradient step raises the probability
    # of the sampled tokens and the mean ratio of the minibatches after the first climbs above 1. With a
    # threshold just above 1 the first minibatch (ratio exactly 1) trains and later ones are skipped. With
    # the batch's own advantages, or a step as large as lr 1e-2 (approx KL 21, mean ratio 0.38), the mean
    # ratio can as well fall below 1 (measured: nothing skipped).
    monkeypatch.setattr(ppo_trainer, "compute_gae", lambda rewards, values, mask, *_: (mask.clone(), values))
    trainer = make_trainer(
        stack_dirs,
        tiny_stack,
        ratio_skip_threshold=1.0001,
        kl_budget=None,
        whiten_advantages=False,
        ent_coef=0.0,
    )
    result = trainer.step()
    assert 1 <= result.metrics["policy/skipped_minibatches"] < 4  # 2 epochs x 2 minibatches
    assert "loss/policy_avg" in result.metrics
    assert ("ratio_explosion", "skip_minibatch") in [(a.kind, a.action) for a in result.alerts]


# ------------------------------------------------------------------------- the whole stage
def run_stage(tiny_stack, parent_run_id: str, overrides: list[str], **kwargs) -> PPOResult:
    """tasks.ppo.run_ppo on the tiny stack with SMALL settings plus overrides."""
    cfg = load_config(None, [f"ppo.{k}={v}" for k, v in SMALL.items()] + overrides)
    return ppo_stage.run_ppo(
        cfg, tiny_stack.sft, tiny_stack.reward, tiny_stack.paths["prompts"], parent_run_id, **kwargs
    )


def metric_histories(run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of a run except timings and system metrics: name -> {step: value}."""
    client = MlflowClient()
    return {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in client.get_run(run_id).data.metrics
        if not key.startswith(("timing/", "system/"))  # machine measurements, not results
    }


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.lora_r=4", "ppo.bf16=true"]], ids=["fp32", "lora-bf16"])
def test_resume_matches_the_uninterrupted_run(tiny_stack, mlflow_store, monkeypatch, extra) -> None:
    overrides = ["ppo.steps=6", "ppo.checkpoint_every=4", "ppo.sample_every=100", *extra]
    with mlflow.start_run() as parent:
        # 1. The uninterrupted run.
        full = run_stage(tiny_stack, parent.info.run_id, overrides)
        assert sorted(full.checkpoints) == [0, 4, 6]

        # 2. The same run, crashing as step 6 starts: checkpoints 0 and 4, metrics up to step 5.
        real_step, crashed = PPOTrainer.step, []

        def crash_at_step_6(self):
            if self.step_count == 5:
                crashed.append(mlflow.active_run().info.run_id)
                raise RuntimeError("injected crash")
            return real_step(self)

        monkeypatch.setattr(PPOTrainer, "step", crash_at_step_6)
        with pytest.raises(RuntimeError, match="injected crash"):
            run_stage(tiny_stack, parent.info.run_id, overrides)
        monkeypatch.undo()
        assert max(metric_histories(crashed[0])["objective/kl"]) == 5

        # 3. Resume by run id: the latest complete checkpoint is step 4; steps 5 and 6 are redone.
        #    Against another SFT run it refuses: that would be a different run.
        assert ppo_resume.resolve_resume_uri(crashed[0]).endswith("checkpoints/step_00004")
        other_sft = Checkpoint("0" * 32, tiny_stack.sft.uri)
        with pytest.raises(ValueError, match="same SFT and reward checkpoints"):
            ppo_stage.run_ppo(
                load_config(None, []),
                other_sft,
                tiny_stack.reward,
                tiny_stack.paths["prompts"],
                parent.info.run_id,
                resume_from=crashed[0],
            )
        resumed = run_stage(tiny_stack, parent.info.run_id, overrides, resume_from=crashed[0])

    tags = MlflowClient().get_run(resumed.final.run_id).data.tags
    assert tags["ppo.resumed_at_step"] == "4" and tags["ppo.resumed_from_run"] == crashed[0]
    assert sorted(resumed.checkpoints) == [0, 4, 6]
    expected, actual = metric_histories(full.final.run_id), metric_histories(resumed.final.run_id)
    assert set(actual) == set(expected)
    for key, by_step in expected.items():
        assert sorted(actual[key]) == sorted(by_step), key
        for step, value in by_step.items():
            assert actual[key][step] == pytest.approx(value, abs=1e-5, nan_ok=True), (key, step)


@pytest.mark.slow
def test_kl_budget_rollback_and_alerts_reach_mlflow_and_prefect(
    tiny_stack, stack_dirs, mlflow_store, monkeypatch, tmp_path
):
    # NaN reward-model scores at step 2 (non-finite alert), then KL past the budget: roll back and stop.
    real_score, calls = ppo_trainer.score_token_ids, []

    def nan_at_step_2(model, ids, *args):
        calls.append(1)
        step = (len(calls) - 1) // ppo_trainer.SCORING_CHUNKS + 1  # each step scores its rollout in chunks
        return torch.full((ids.shape[0],), float("nan")) if step == 2 else real_score(model, ids, *args)

    artifacts: dict[str, object] = {}
    monkeypatch.setattr(ppo_trainer, "score_token_ids", nan_at_step_2)
    monkeypatch.setattr(ppo_stage, "in_prefect_run", lambda: True)
    monkeypatch.setattr(ppo_stage, "create_markdown_artifact", lambda md, key, **kw: artifacts.setdefault(key, md))
    monkeypatch.setattr(ppo_stage, "create_table_artifact", lambda rows, key, **kw: artifacts.setdefault(key, rows))
    budget = 2.0
    overrides = [
        "ppo.steps=12",
        "ppo.checkpoint_every=1",
        "ppo.sample_every=100",
        "ppo.kl_control=fixed",
        "ppo.kl_coef=0.0",
        f"ppo.kl_budget={budget}",
        "ppo.kl_budget_action=rollback",
    ]
    with mlflow.start_run() as parent:
        result = run_stage(tiny_stack, parent.info.run_id, overrides)

    # 1. The run stopped at the first step whose KL passed the budget.
    history = metric_histories(result.final.run_id)
    kl = history["objective/kl"]
    stop = result.stopped_at
    assert stop is not None and stop == max(kl) and kl[stop] > budget
    assert all(kl[s] <= budget for s in range(1, stop))
    # 2. It rolled back to the checkpoint with the best rlhf reward among those measured within budget;
    #    checkpoint 1 was measured at the NaN step, so it is not one of them.
    reward = history["objective/rlhf_reward"]
    assert math.isnan(reward[2])
    eligible = {s for s in result.checkpoints if s + 1 in kl and kl[s + 1] <= budget and math.isfinite(reward[s + 1])}
    assert result.rolled_back_to in eligible
    assert all(reward[result.rolled_back_to + 1] >= reward[s + 1] for s in eligible)
    assert result.final.uri == result.checkpoints[result.rolled_back_to]
    # 3. Every alert is a metric, a tag and a Prefect artifact.
    assert history["alerts/nonfinite"][2] == 1.0 and history["policy/nan_skips"][2] == 1.0
    assert history["alerts/kl_budget"][stop] == 1.0 and history["alerts/kl_budget"][stop - 1] == 0.0
    tags = MlflowClient().get_run(result.final.run_id).data.tags
    assert tags["ppo.alert.kl_budget"].startswith(f"step {stop}: objective/kl")
    assert tags["ppo.alert.nonfinite"].startswith("step 2: non-finite")
    assert tags["ppo.rolled_back_to_step"] == str(result.rolled_back_to)
    assert tags["ppo.final_checkpoint"] == result.final.uri
    assert {"ppo-alert-kl-budget", "ppo-alert-nonfinite", "ppo-alerts", "ppo-summary"} <= set(artifacts)
    assert [row["kind"] for row in artifacts["ppo-alerts"]] == ["nonfinite", "kl_budget"]
    # 4. The rolled-back checkpoint is a usable state: it loads and trains on.
    monkeypatch.undo()
    trainer = make_trainer(stack_dirs, tiny_stack)
    with pytest.raises(ValueError, match="set ppo.kl_control=fixed"):
        trainer.load_checkpoint(download(result.final.uri, tmp_path))
    trainer = make_trainer(stack_dirs, tiny_stack, kl_control="fixed", kl_coef=0.0)
    trainer.load_checkpoint(download(result.final.uri, tmp_path))
    assert trainer.step_count == result.rolled_back_to
    step = trainer.step()
    assert trainer.step_count == result.rolled_back_to + 1 and math.isfinite(step.metrics["loss/policy_avg"])


# ----------------------------------------------------------------------------- LoRA and bf16
def base_weights(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a peft-wrapped LM without its adapters, under the plain model's names."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): value
        for name, value in lm.state_dict().items()
        if "lora_" not in name
    }


def lm_logits(lm: torch.nn.Module, enc) -> torch.Tensor:
    with torch.no_grad():
        return lm(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=position_ids_from_mask(enc.attention_mask),
        ).logits


@pytest.mark.slow
def test_lora_trains_adapters_over_the_untouched_sft_weights(stack_dirs, tiny_stack, tmp_path) -> None:
    sft = load_causal_lm(stack_dirs[0])
    trainer = make_trainer(stack_dirs, tiny_stack, lora_r=4, learning_rate=1e-2)
    assert trainer.ref_model is None  # the reference is the policy with its adapters disabled: no second copy
    trained = {id(p) for p in trainer.trained}
    assert all(
        ("lora_" in name or name.startswith("value_head.")) == (id(p) in trained)
        for name, p in trainer.policy.named_parameters()
    )
    for _ in range(2):
        metrics = trainer.step().metrics
        assert math.isfinite(metrics["loss/policy_avg"]) and math.isfinite(metrics["loss/value_avg"])

    # 1. Only the adapters and the value head moved; the SFT weights under them are bit for bit the same.
    def assert_base_untouched() -> None:
        wrapped = base_weights(trainer.policy.lm)
        assert set(wrapped) == set(sft.state_dict())
        for name, value in sft.state_dict().items():
            assert torch.equal(wrapped[name], value), name

    assert_base_untouched()
    lora_b = [p for name, p in trainer.policy.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # peft starts B at 0
    assert trainer.policy.value_head.weight.abs().max() > 0  # zero-initialised, trained in full

    # 2. The reference log-probs are the untouched SFT model's; the adapters are back on afterwards.
    enc = trainer.tokenizer(
        trainer.prompts[:4], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    expected = lm_logits(sft, enc)
    with trainer.reference() as ref:
        torch.testing.assert_close(lm_logits(ref, enc), expected, atol=1e-6, rtol=0)
    adapted = lm_logits(trainer.policy.lm, enc)
    assert (adapted - expected).abs().max() > 1e-2

    # 3. The checkpoint is a plain Hugging Face model with the adapters merged; the trainer keeps its adapters.
    ckpt = trainer.save_checkpoint(tmp_path / "ckpt")
    assert not (ckpt / "adapter_config.json").exists() and (ckpt / ADAPTER_DIR / "adapter_config.json").exists()
    plain = load_causal_lm(str(ckpt))
    assert type(plain) is type(sft) and not any("lora" in name for name in plain.state_dict())
    torch.testing.assert_close(lm_logits(plain, enc), adapted, atol=1e-4, rtol=0)
    name = "transformer.h.0.attn.c_attn.weight"
    assert (plain.state_dict()[name] - sft.state_dict()[name]).abs().max() > 1e-4
    assert has_adapters(trainer.policy.lm)
    assert_base_untouched()
    torch.testing.assert_close(lm_logits(trainer.policy.lm, enc), adapted, atol=0, rtol=0)


@pytest.mark.slow
def test_a_policy_continued_from_a_ppo_checkpoint_keeps_its_value_head(
    stack_dirs, tiny_stack, tmp_path, monkeypatch, caplog
) -> None:
    # The feedback flow starts PPO from the champion's checkpoint: its trained value head comes along; from SFT
    # (no value head in the checkpoint) the head starts as the reward model's score head, or at zero.
    champion = make_trainer(stack_dirs, tiny_stack)
    champion.step()
    assert champion.policy.value_head.weight.abs().max() > 0
    ckpt = champion.save_checkpoint(tmp_path / "champion")
    monkeypatch.setattr(ppo_stage, "download", lambda uri, into: Path(uri))
    cfg = load_config(None, [f"ppo.{k}={v}" for k, v in SMALL.items()])
    reward, prompts = Checkpoint("rm", stack_dirs[1]), tiny_stack.paths["prompts"]

    continued = ppo_stage.build_trainer(cfg, Checkpoint("champion", str(ckpt)), reward, prompts)
    torch.testing.assert_close(continued.policy.value_head.state_dict(), champion.policy.value_head.state_dict())
    fresh = ppo_stage.build_trainer(cfg, Checkpoint("sft", stack_dirs[0]), reward, prompts)
    torch.testing.assert_close(fresh.policy.value_head.weight, fresh.reward_model.score.weight, rtol=0, atol=0)
    assert fresh.policy.value_head.bias.abs().max() == 0  # the score head has no bias
    cfg = load_config(None, [f"ppo.{k}={v}" for k, v in SMALL.items()] + ["ppo.value_head_init=zero"])
    zero = ppo_stage.build_trainer(cfg, Checkpoint("sft", stack_dirs[0]), reward, prompts)
    assert zero.policy.value_head.weight.abs().max() == 0 and zero.policy.value_head.bias.abs().max() == 0
    assert "value_head_init" not in caplog.text
    # A reward model whose head cannot be copied: zeros, and the user is told why.
    monkeypatch.setattr(PolicyWithValueHead, "init_value_head_from", lambda self, reward_model: False)
    cfg = load_config(None, [f"ppo.{k}={v}" for k, v in SMALL.items()])
    unfit = ppo_stage.build_trainer(cfg, Checkpoint("sft", stack_dirs[0]), reward, prompts)
    assert unfit.policy.value_head.weight.abs().max() == 0
    assert "no `score` head of the policy's hidden size" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("lora_r, bf16", [(4, False), (0, True), (4, True)])
def test_a_resumed_trainer_continues_exactly(stack_dirs, tiny_stack, tmp_path, lora_r, bf16) -> None:
    settings = {"lora_r": lora_r, "bf16": bf16, "learning_rate": 1e-2}
    trainer = make_trainer(stack_dirs, tiny_stack, **settings)
    trainer.step(), trainer.step()
    ckpt = trainer.save_checkpoint(tmp_path / "step_2")
    expected = [trainer.step().metrics for _ in range(2)]

    resumed = make_trainer(stack_dirs, tiny_stack, **settings)  # fresh adapters (B = 0), value head, optimizer
    resumed.load_checkpoint(ckpt)
    actual = [resumed.step().metrics for _ in range(2)]
    for want, got in zip(expected, actual):
        assert set(got) == set(want)
        for key in want:
            if not key.startswith("timing/"):
                assert got[key] == want[key], key
    for a, b in zip(trainer.trained, resumed.trained, strict=True):
        assert torch.equal(a, b)
    if lora_r:  # continuing it with other LoRA settings, or without LoRA, is refused before any weight loads
        with pytest.raises(ValueError, match="set model.lora_r=4 and model.lora_alpha=16"):
            make_trainer(stack_dirs, tiny_stack, lora_r=8, bf16=bf16).load_checkpoint(ckpt)
        with pytest.raises(ValueError, match="model.lora_r is 0"):
            make_trainer(stack_dirs, tiny_stack, bf16=bf16).load_checkpoint(ckpt)
    else:
        with pytest.raises(ValueError, match="set model.lora_r=0"):
            make_trainer(stack_dirs, tiny_stack, lora_r=4, bf16=bf16).load_checkpoint(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocasts_the_forwards_and_keeps_the_losses_in_fp32(stack_dirs, tiny_stack, monkeypatch, bf16) -> None:
    trainer = make_trainer(stack_dirs, tiny_stack, bf16=bf16)
    seen: dict[str, set[torch.dtype]] = {"policy": set(), "reference": set(), "reward": set(), "loss inputs": set()}
    for key, model in (
        ("policy", trainer.policy.lm),
        ("reference", trainer.ref_model),
        ("reward", trainer.reward_model),
    ):
        model.register_forward_hook(lambda module, args, out, key=key: seen[key].add(out.logits.dtype))
    real_policy_loss = ppo_trainer.policy_loss

    def recording_policy_loss(logprobs, old_logprobs, advantages, *args):
        seen["loss inputs"].update(t.dtype for t in (logprobs, old_logprobs, advantages))
        return real_policy_loss(logprobs, old_logprobs, advantages, *args)

    monkeypatch.setattr(ppo_trainer, "policy_loss", recording_policy_loss)
    metrics = trainer.step().metrics
    assert all(math.isfinite(value) for value in metrics.values())
    forward = torch.bfloat16 if bf16 else torch.float32
    assert seen == {"policy": {forward}, "reference": {forward}, "reward": {forward}, "loss inputs": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in trainer.trained)  # autocast leaves the weights fp32


def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"this GPU \(Tesla T4\) has no bf16.*set ppo.bf16=false"):
        require_bf16(torch.device("cuda", 0))
    require_bf16(torch.device("cpu"))  # the CPU has bf16 autocast


def test_lora_settings_are_part_of_the_resume_key(tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    sft, reward = Checkpoint("1" * 32, "runs:/1/sft"), Checkpoint("2" * 32, "runs:/2/rm")

    def key(*overrides: str) -> str:
        return ppo_stage.resume_key(load_config(None, list(overrides)), sft, reward, str(prompts))

    # LoRA changes the trajectory: its settings are in the key; while off they are not (earlier keys stand).
    assert key("model.lora_r=4") != key() != key("ppo.bf16=true")
    assert key("model.lora_r=4") != key("model.lora_r=4", "model.lora_alpha=8")
    assert key("model.lora_alpha=8") == key()
