"""Evaluation: statistics and hacking rules on hand-worked numbers, then the stage on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from rlhf.builtin.task import SUPPORT_TASK
from rlhf.evaluation.hacking import (
    CheckpointStats,
    DiagnosticsConfig,
    hacking_flags,
    length_drift,
    mode_collapse,
    proxy_efficiency,
    proxy_gold_divergence,
    reward_length_correlation,
    select_checkpoint,
    split_for_selection,
)
from rlhf.evaluation.stats import distinct_count, group_rates, mean_and_se, pearson, wilson_interval, win_count
from rlhf.evaluation.violations import is_refusal, kind_rates, violations
from tasks.evaluate import breakdown_table, flag_tags, format_table, run_level_flags

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Customer: I forgot my password.\nAgent:"
REFUND = "Customer: Hi, I want a refund for my lamp. Thanks.\nAgent:"


def point(
    step: int,
    kl: float = 0.0,
    proxy: float = 0.0,
    judge: float = 0.0,
    length: float = 20.0,
    corr: float = 0.0,
    proxy_se: float = 0.1,
    judge_se: float = 0.1,
    distinct_2: float = 0.5,
    n: int = 100,
) -> CheckpointStats:
    return CheckpointStats(step, kl, proxy, proxy_se, judge, judge_se, length, corr, distinct_2, n)


# ------------------------------------------------------------------------------------ statistics
def test_wilson_interval_of_8_in_10():
    # p = 0.8, z^2 = 3.8416: centre = (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half = 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490157, abs=1e-6) and high == pytest.approx(0.943319, abs=1e-6)


def test_pearson_mean_se_and_win_count():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0, abs=1e-12)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    # dx = dy up to order: sxy = 2.25 - 0.25 - 0.25 + 2.25 = 4, sxx = syy = 5 -> 0.8.
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0
    # var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; se = sqrt(5/3 / 4) = 0.645497.
    mean, se = mean_and_se([1, 2, 3, 4])
    assert mean == 2.5 and se == pytest.approx(0.645497, abs=1e-6)
    assert win_count([1, 2, 3], [1, 1, 4]) == 1.5  # tie, win, loss


def test_violations_and_refusals_on_the_support_task():
    responses = [
        " I sent a reset link to your email and it works for one hour.",
        " That is not my problem. Your refund is approved.",
        " Write to me at jo.doe@example.com please.",
        " Please contact our support team.",
    ]
    assert violations([PASSWORD] * 4, responses, SUPPORT_TASK) == [(), ("rude", "wrong_intent"), ("pii",), ()]
    assert violations([PASSWORD] * 4, responses, None) == [(), (), ("pii",), ()]
    assert [is_refusal(r, SUPPORT_TASK) for r in responses] == [False, False, True, True]
    assert not any(is_refusal(r, None) for r in responses)  # no intents known: nothing is a refusal


def test_intent_accuracy_counts_the_right_answer_and_no_other():
    reset = " I am sorry for the trouble. I sent a reset link to your email and it works for one hour."
    refund = " Your refund is approved and will reach your card in five days."
    assert SUPPORT_TASK.answers_intent(PASSWORD, reset) and SUPPORT_TASK.answers_intent(REFUND, refund)
    assert not SUPPORT_TASK.answers_intent(PASSWORD, refund)  # the wrong intent
    assert not SUPPORT_TASK.answers_intent(REFUND, refund + reset)  # the right intent and another one
    assert not SUPPORT_TASK.answers_intent(PASSWORD, " Please contact our support team.")  # no answer at all
    assert not SUPPORT_TASK.answers_intent("Customer: What time is it?\nAgent:", refund)  # no intent to answer


def test_distinct_count_group_rates_and_kind_rates():
    assert distinct_count([" a b", "a b ", "a c", "a b"]) == 2  # surrounding whitespace does not count
    assert distinct_count([]) == 0
    # refund: 2 of 3 hits; password: 0 of 1; sorted by group.
    rates = group_rates(["refund", "password", "refund", "refund"], [True, False, False, True])
    assert list(rates) == ["password", "refund"]
    assert (
        rates["password"] == (1, 0.0)
        and rates["refund"][0] == 3
        and rates["refund"][1] == pytest.approx(2 / 3, abs=1e-12)
    )
    with pytest.raises(ValueError, match="one group per value"):
        group_rates(["a"], [])
    # 4 responses: rude in 1, wrong_intent in 2 (one of them also rude), pii in none.
    assert kind_rates([(), ("rude", "wrong_intent"), ("wrong_intent",), ()]) == {
        "pii": 0.0,
        "rude": 0.25,
        "wrong_intent": 0.5,
    }
    with pytest.raises(ValueError, match="at least one"):
        kind_rates([])


def test_breakdown_table_and_summary_show_each_intent_and_violation_kind():
    metrics = {
        "eval/intent_accuracy": 0.75,
        "eval/sft_intent_accuracy": 0.25,
        "eval/intent_accuracy/password": 1.0,
        "eval/sft_intent_accuracy/password": 0.5,
        "eval/intent_accuracy/refund": 0.5,
        "eval/sft_intent_accuracy/refund": 0.0,
        "eval/violation_rate": 0.25,
        "eval/sft_violation_rate": 0.5,
        **{f"eval/violation_rate/{k}": v for k, v in {"pii": 0.0, "rude": 0.0, "wrong_intent": 0.25}.items()},
        **{f"eval/sft_violation_rate/{k}": v for k, v in {"pii": 0.0, "rude": 0.25, "wrong_intent": 0.5}.items()},
        "eval/distinct_responses": 3.0,
        "eval/sft_distinct_responses": 4.0,
        "eval/kl_mean": 1.0,
    }
    table = breakdown_table([PASSWORD, REFUND, REFUND, PASSWORD], metrics, SUPPORT_TASK)
    assert table["slice"] == ["password", "refund", "pii", "rude", "wrong_intent"]
    assert table["n"] == [2, 2, 4, 4, 4] and table["policy"] == [1.0, 0.5, 0.0, 0.0, 0.25]
    assert table["sft"] == [0.5, 0.0, 0.0, 0.25, 0.5]
    assert breakdown_table([PASSWORD], metrics, None)["measure"] == ["violation_rate"] * 3
    summary = format_table(metrics, kl_target=6.0)
    assert "| - intent accuracy: refund | 0.500 | 0.000 |" in summary
    assert "| - violations: wrong_intent | 0.250 | 0.500 |" in summary
    assert "| distinct responses | 3.000 | 4.000 |" in summary


# ------------------------------------------------------------------------------- hacking rules
def test_divergence_needs_both_moves_beyond_z_standard_errors():
    # Both differences have standard error hypot(0.4, 0.3) = 0.5; proxy +1.0, judge -1.0.
    ref = point(10, proxy=1.0, judge=1.0, proxy_se=0.3, judge_se=0.4)
    now = point(20, proxy=2.0, judge=0.0, proxy_se=0.4, judge_se=0.3)
    assert not proxy_gold_divergence(now, [ref], z=2.0)  # threshold 1.0: not strictly above
    assert proxy_gold_divergence(now, [ref], z=1.9)  # threshold 0.95
    both_up = point(20, proxy=2.0, judge=2.0, proxy_se=0.4, judge_se=0.3)
    assert not proxy_gold_divergence(both_up, [ref], z=1.0)


def test_length_rules_against_sft():
    sft = point(0, proxy=0.5, length=20.0)
    assert not length_drift(point(10, length=30.0), sft, 1.5)  # exactly 1.5x is allowed
    assert length_drift(point(10, length=30.1), sft, 1.5)
    assert reward_length_correlation(point(10, proxy=0.6, corr=0.51), sft, 0.5)
    assert not reward_length_correlation(point(10, proxy=0.4, corr=0.9), sft, 0.5)  # no proxy gain
    assert not reward_length_correlation(point(10, proxy=0.6, corr=0.5), sft, 0.5)


def test_hacking_flags_over_a_run_that_overoptimises():
    cfg = DiagnosticsConfig(divergence_z=2.0, max_length_ratio=1.5, max_reward_length_corr=0.5)
    series = [
        point(0, proxy=0.0, judge=0.0, length=20),
        point(10, proxy=1.0, judge=1.0, length=18),  # both up: healthy
        point(20, proxy=2.0, judge=0.2, length=34, corr=0.7),  # proxy up, gold down 0.8 > 2*0.141
    ]
    flags = hacking_flags(series, cfg, judge_is_proxy=False)
    quiet = {
        "length_drift": False,
        "reward_length_correlation": False,
        "mode_collapse": False,
        "proxy_gold_divergence": False,
        "proxy_efficiency": False,
    }
    # step 20: proxy +2.0 SFT sds (sd = 0.1 x 10), judge +0.2 < 0.25 x 2.0: inefficient too
    assert flags == {
        0: quiet,
        10: quiet,
        20: {
            **quiet,
            "length_drift": True,
            "reward_length_correlation": True,
            "proxy_gold_divergence": True,
            "proxy_efficiency": True,
        },
    }
    assert run_level_flags(flags) == {
        "length_drift": [20],
        "mode_collapse": [],
        "proxy_efficiency": [20],
        "proxy_gold_divergence": [20],
        "reward_length_correlation": [20],
    }
    tags = flag_tags(flags[10], run_level_flags(flags))
    assert tags["hacking.proxy_gold_divergence"] == "false" and tags["hacking.run.proxy_gold_divergence"] == "true"
    assert tags["hacking.run.flagged_steps"] == "20"
    # With the reward model as its own judge, divergence cannot be seen: left out, tagged n/a.
    blind = hacking_flags(series, cfg, judge_is_proxy=True)
    assert "proxy_gold_divergence" not in blind[20] and "proxy_efficiency" not in blind[20]
    assert flag_tags(blind[10], run_level_flags(blind))["hacking.proxy_gold_divergence"] == "n/a"
    with pytest.raises(ValueError, match="SFT point"):
        hacking_flags(series[1:], cfg, judge_is_proxy=False)


def test_mode_collapse_against_sft_diversity():
    sft = point(0, distinct_2=0.30)
    assert not mode_collapse(point(10, distinct_2=0.18), sft, 0.6)  # exactly 0.6x is allowed
    assert mode_collapse(point(10, distinct_2=0.17), sft, 0.6)
    assert not mode_collapse(point(10, distinct_2=float("nan")), sft, 0.6)  # unmeasured: no flag


def test_proxy_efficiency_in_sft_standard_deviations():
    # SFT: proxy sd = 0.2 x sqrt(25) = 1.0, judge sd = 0.1 x 5 = 0.5.
    sft = point(0, proxy=-2.0, judge=0.0, proxy_se=0.2, judge_se=0.1, n=25)
    # proxy +3.0 (3 sd); judge +0.3 (0.6 sd) < 0.25 x 3 = 0.75 sd: flagged
    assert proxy_efficiency(point(10, proxy=1.0, judge=0.3), sft, 1.0, 0.25)
    # judge +0.4 (0.8 sd) >= 0.75 sd: efficient enough
    assert not proxy_efficiency(point(10, proxy=1.0, judge=0.4), sft, 1.0, 0.25)
    # proxy +0.9 sd is below the 1.0 sd the rule starts at, however flat the judge
    assert not proxy_efficiency(point(10, proxy=-1.1, judge=-1.0), sft, 1.0, 0.25)
    # an SFT with no spread cannot be measured against
    assert not proxy_efficiency(point(10, proxy=9.0), point(0, proxy_se=0.0), 1.0, 0.25)


def test_a_collapsed_policy_raises_both_flags_and_is_not_chosen():
    # What issue 15 found: proxy far up, gold barely, a few templates for every prompt.
    # SFT sds: proxy 0.2 x 8 = 1.6, judge 0.09 x 8 = 0.72. Collapsed: proxy +3.3 = 2.06 sd, judge +0.34 =
    # 0.47 sd < 0.25 x 2.06 = 0.52; distinct-2 0.04 < 0.6 x 0.20. Healthy: proxy +0.8 = 0.5 sd (< 1 sd: unchecked).
    cfg = DiagnosticsConfig()
    sft = point(0, proxy=-2.3, judge=0.0, proxy_se=0.2, judge_se=0.09, distinct_2=0.20, n=64)
    healthy = point(20, kl=3.0, proxy=-1.5, judge=0.30, proxy_se=0.2, judge_se=0.09, distinct_2=0.18, n=64)
    collapsed = point(60, kl=5.2, proxy=1.0, judge=0.34, proxy_se=0.1, judge_se=0.05, distinct_2=0.04, n=64)
    flags = hacking_flags([sft, healthy, collapsed], cfg, judge_is_proxy=False)
    assert flags[60]["mode_collapse"] and flags[60]["proxy_efficiency"]
    assert not any(flags[20].values())
    flagged = frozenset(step for step, raised in flags.items() if any(raised.values()))
    # the collapsed checkpoint has the higher judge score, but the unflagged one is chosen
    assert select_checkpoint([healthy, collapsed], 12.0).step == 60
    assert select_checkpoint([healthy, collapsed], 12.0, flagged).step == 20
    # when every candidate is flagged, the best of them is still chosen (promotion then refuses it)
    assert select_checkpoint([collapsed], 12.0, flagged).step == 60


def test_a_policy_that_gives_one_template_to_every_prompt_is_flagged_from_its_samples():
    """The collapse issue 15 found, reproduced from responses: SFT answers each intent (gold judge scores),
    the collapsed policy gives the password template to every prompt, which the reward model loves."""
    from rlhf.builtin import support
    from rlhf.builtin.dataset import build_builtin_rows
    from tasks.evaluate import Samples, Scored, checkpoint_stats

    rows = build_builtin_rows(0)["sft"][:64]
    prompts = [r["prompt"] for r in rows]
    template = " Sorry for the trouble! " + support.ANSWERS["password"][0].format(item="lamp") + " Have a nice day!"
    gold = SUPPORT_TASK.gold_score

    def scored(responses: list[str], proxy: list[float]) -> Scored:
        lengths = [len(r.split()) for r in responses]
        samples = Samples(responses, lengths, [True] * len(responses), [0.0] * len(responses))
        return Scored(samples, proxy, [gold(p, r) for p, r in zip(prompts, responses)])

    sft_responses = [r["completion"] for r in rows]
    sft_proxy = [(-2.0 if i % 2 else -2.6) for i in range(len(rows))]  # sd 0.3
    sft = checkpoint_stats(0, scored(sft_responses, sft_proxy))
    collapsed = checkpoint_stats(60, scored([template] * len(rows), [1.0] * len(rows)))
    flags = hacking_flags([sft, collapsed], DiagnosticsConfig(), judge_is_proxy=False)
    assert collapsed.distinct_2 < 0.6 * sft.distinct_2
    assert flags[60]["mode_collapse"] and flags[60]["proxy_efficiency"]
    assert not any(flags[0].values())


def test_selection_takes_the_best_judge_score_within_the_kl_budget_not_the_last():
    candidates = [
        point(10, kl=2.0, judge=0.5),
        point(20, kl=5.0, judge=1.2),
        point(30, kl=25.0, judge=1.5),
        point(40, kl=30.0, judge=0.2),
    ]
    assert select_checkpoint(candidates, kl_budget=20.0) == select_checkpoint(candidates[::-1], 20.0)
    assert select_checkpoint(candidates, kl_budget=20.0).step == 20  # 30 is better but over budget
    assert select_checkpoint(candidates, kl_budget=26.0).step == 30
    assert select_checkpoint(candidates, kl_budget=None).step == 30  # no budget
    tie = [point(10, kl=4.0, judge=1.0), point(20, kl=3.0, judge=1.0)]
    assert select_checkpoint(tie, 20.0).step == 20  # equal judge: less KL
    over = select_checkpoint(candidates, kl_budget=1.0)
    assert (over.step, over.within_budget) == (10, False)


def test_split_for_selection_is_seeded_disjoint_and_never_empty():
    prompts = [f"p{i}" for i in range(10)]
    selection, test = split_for_selection(prompts, 0.5, seed=0)
    assert len(selection) == len(test) == 5 and sorted(selection + test) == sorted(prompts)
    assert split_for_selection(prompts, 0.5, seed=0) == (selection, test)
    assert split_for_selection(prompts, 0.5, seed=1) != (selection, test)
    assert [len(s) for s in split_for_selection(prompts, 0.01, 0)] == [1, 9]
    assert [len(s) for s in split_for_selection(prompts, 0.99, 0)] == [9, 1]
    with pytest.raises(ValueError, match="raise data.max_heldout_prompts"):
        split_for_selection(["only"], 0.5, 0)


# --------------------------------------------------------------------------------- the stage
@pytest.mark.slow
def test_evaluate_chooses_on_gold_registers_the_choice_and_compares_with_the_champion(tiny_stack, mlflow_store):
    from rlhf.config import load_config
    from rlhf.infra.tracking import setup_experiment
    from rlhf.registry.promotion import CHAMPION
    from tasks.common import Checkpoint, PPOResult
    from tasks.evaluate import run_evaluate
    from tasks.register import register_reward_model, run_register

    cfg = load_config(ROOT / "configs" / "smoke.yaml")  # 16 held-out prompts: 8 select, 8 test
    sft, reward = tiny_stack.sft, tiny_stack.reward
    # Step 2 is the trained SFT policy, step 4 the untrained base model: the last is not the best.
    ppo = PPOResult(Checkpoint(sft.run_id, sft.uri), {2: sft.uri, 4: tiny_stack.base_model})
    heldout = tiny_stack.paths["heldout_prompts"]
    client = MlflowClient()
    with mlflow.start_run(experiment_id=setup_experiment("eval-test")) as parent:
        first = run_evaluate(cfg, sft, reward, ppo, heldout, parent.info.run_id)

        assert (first.step, first.checkpoint) == (2, Checkpoint(sft.run_id, sft.uri))
        m = first.metrics
        # The chosen policy is SFT itself and samples with SFT's seed: same responses, ties only.
        assert m["eval/kl_mean"] == 0.0 and m["eval/win_rate_vs_sft"] == 0.5
        assert m["eval/gold_reward_mean"] == m["eval/sft_gold_reward_mean"] and m["eval/num_samples"] == 8
        assert m["eval/best_checkpoint_step"] == 2.0 and "eval/win_rate_vs_champion" not in m
        for name in (
            "eval/rm_score_mean",
            "eval/response_length_mean",
            "eval/distinct_1",
            "eval/distinct_2",
            "eval/eos_rate",
            "eval/violation_rate",
            "eval/refusal_rate",
            "eval/hacking/length_drift",
            "eval/intent_accuracy",
            "eval/violation_rate/wrong_intent",
        ):
            assert math.isfinite(m[name]), name
        # Same responses as SFT: every twin metric equals its SFT counterpart.
        for name in ("distinct_2", "distinct_responses", "intent_accuracy"):
            assert m[f"eval/{name}"] == m[f"eval/sft_{name}"], name
        assert 1 <= m["eval/distinct_responses"] <= 8
        assert first.tags["eval.judge"] == "gold" and first.tags["eval.champion_version"] == "none"
        assert first.tags["hacking.length_drift"] == "false"
        kl = {int(x.step): x.value for x in client.get_metric_history(first.run_id, "eval/selection/kl_mean")}
        assert sorted(kl) == [0, 2, 4] and kl[0] == kl[2] == 0.0 and kl[4] > 1.0
        distinct = {int(x.step): x.value for x in client.get_metric_history(first.run_id, "eval/selection/distinct_2")}
        assert sorted(distinct) == [0, 2, 4] and distinct[2] == distinct[0]  # step 2 holds the SFT weights
        collapse = {
            int(x.step): x.value
            for x in client.get_metric_history(first.run_id, "eval/selection/hacking_mode_collapse")
        }
        for step in (2, 4):  # the flag is the logged distinct-2 against SFT's (step 0) at min_distinct_ratio
            assert collapse[step] == float(distinct[step] < cfg.diagnostics.min_distinct_ratio * distinct[0]), step
        files = {f.path for f in client.list_artifacts(first.run_id, "eval")}
        assert {
            "eval/overoptimization.png",
            "eval/samples.json",
            "eval/checkpoints.json",
            "eval/breakdown.json",
        } <= files
        png = Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="eval/overoptimization.png"))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        version = run_register(cfg, ppo, first, {"sft": "fp-sft"}, parent.info.run_id, reward)
        tags = client.get_model_version(cfg.registered_model, version.version).tags
        reward_version = client.get_model_version(cfg.registered_reward_model, "1")
        assert tags["lineage.reward_model"] == f"models:/{cfg.registered_reward_model}/1"
        assert reward_version.source == reward.uri and reward_version.tags["lineage.reward_run_id"] == reward.run_id
        assert register_reward_model(cfg.registered_reward_model, reward) == "1"  # registered once per checkpoint
        (heldout_input,) = client.get_run(first.run_id).inputs.dataset_inputs
        assert heldout_input.dataset.name == "heldout_prompts"
        assert tags["lineage.pipeline_run_id"] == parent.info.run_id and tags["lineage.checkpoint_step"] == "2"
        assert tags["lineage.data.sft"] == "fp-sft" and len(tags["lineage.config_hash"]) == 16
        assert tags["eval/win_rate_vs_sft"] == "0.5" and tags["hacking.length_drift"] == "false"
        assert tags["validation.success"] == "missing" and tags["promotion.status"] == "registered"
        model_dir = Path(mlflow.artifacts.download_artifacts(version.model_uri))
        shipped = {p.name for p in (model_dir / "artifacts" / "policy").iterdir()}
        assert "model.safetensors" in shipped and "training_args.bin" not in shipped  # training state stays behind

        client.set_registered_model_alias(cfg.registered_model, CHAMPION, version.version)
        second = run_evaluate(cfg, sft, reward, ppo, heldout, parent.info.run_id)
    assert second.tags["eval.champion_version"] == version.version
    # The champion is the same weights: identical samples, every comparison a tie.
    assert second.metrics["eval/win_rate_vs_champion"] == 0.5
    table = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=second.run_id, artifact_path="eval/samples.json")).read_text()
    )
    assert {"prompt", "sft_response", "champion_response", "policy_response", "policy_judge"} <= set(table["columns"])
