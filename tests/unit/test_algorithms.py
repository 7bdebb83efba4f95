"""DPO, RLOO and GRPO without training: their config sections and GPU presets, the metric names TRL's logs map to,
and the comparison's table and winner on hand-worked numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from rlhf.config import ALGORITHMS, ConfigError, PipelineConfig, load_config
from rlhf.evaluation.comparison import AlgorithmRun, format_comparison, summarise, winner

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ config
def test_ppo_stays_the_default_and_each_algorithm_is_an_option() -> None:
    assert PipelineConfig().algorithm == "ppo"
    assert ALGORITHMS == ("ppo", "dpo", "rloo", "grpo")
    for algorithm in ALGORITHMS:
        assert load_config(None, [f"algorithm={algorithm}"]).algorithm == algorithm


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm=trpo"], "'ppo', 'dpo', 'rloo' or 'grpo'"),
        (["rloo.batch_size=30"], r"rloo.batch_size \(30\) must be a multiple of rloo.num_generations \(4\)"),
        (["grpo.num_generations=5"], r"grpo.batch_size \(32\) must be a multiple of grpo.num_generations \(5\)"),
        (["grpo.num_generations=1"], "grpo.num_generations"),
        (["dpo.label_smoothing=0.1"], "set dpo.loss=robust or dpo.label_smoothing=0"),
        (["dpo.loss=kto"], "'sigmoid', 'ipo', 'hinge' or 'robust'"),
        (["grpo.loss_type=ppo"], "grpo.loss_type"),
        (["dpo.beta=0"], "dpo.beta"),
        (["algorithm=rloo", "distributed.num_processes=2"], "set distributed.num_processes=1"),
    ],
)
def test_bad_algorithm_options_name_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_other_sections_are_checked_whichever_algorithm_runs() -> None:
    # a bad rloo section is refused even when PPO trains: one file serves every algorithm of a comparison
    with pytest.raises(ConfigError, match="rloo.batch_size"):
        load_config(None, ["algorithm=ppo", "rloo.batch_size=6"])
    assert load_config(None, ["algorithm=ppo", "distributed.num_processes=2"]).distributed.num_processes == 2


@pytest.mark.parametrize("algorithm", ["dpo", "rloo", "grpo"])
def test_gpu_preset_of_each_algorithm_loads_and_keeps_gpu_yaml_stages(algorithm: str) -> None:
    path = ROOT / "configs" / f"gpu-{algorithm}.yaml"
    cfg = load_config(path)
    base = load_config(ROOT / "configs" / "gpu.yaml")
    assert cfg.algorithm == algorithm
    # the shared stages are gpu.yaml's, so a comparison trains them once for every preset
    for section in ("model", "sft", "reward", "eval", "data"):
        assert getattr(cfg, section) == getattr(base, section), section
    # every value the preset sets for its algorithm is what the run gets
    raw = yaml.safe_load(path.read_text())[algorithm]
    assert raw and {k: getattr(getattr(cfg, algorithm), k) for k in raw} == raw


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_gpu_presets_sample_as_long_as_evaluation_does(algorithm: str) -> None:
    cfg = load_config(ROOT / "configs" / f"gpu-{algorithm}.yaml")
    assert getattr(cfg, algorithm).max_new_tokens == cfg.eval.max_new_tokens == 256
    assert getattr(cfg, algorithm).temperature == cfg.eval.temperature


# ------------------------------------------------------------------------------------ metric names
def test_trl_logs_are_logged_under_our_names(monkeypatch) -> None:
    import types

    import mlflow

    from tasks.policy import TRLMetrics

    logged: dict[str, float] = {}
    monkeypatch.setattr(mlflow, "log_metrics", lambda metrics, step: logged.update(metrics))
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=3)
    logs = {
        "loss": 0.5,
        "reward": 1.25,
        "rewards/gold/mean": 0.75,
        "rewards/reward_model/mean": 1.25,
        "kl": 0.02,
        "clip_ratio/region_mean": 0.1,
        "completions/clipped_ratio": 0.25,
        "reward_std": 0.3,
        "train_runtime": 9.0,
    }
    TRLMetrics("grpo").on_log(None, state, None, logs)
    assert logged == {
        "loss/policy_avg": 0.5,
        "objective/scores": 1.25,
        "objective/gold_scores": 0.75,
        "objective/kl_token_k3": 0.02,
        "policy/clipfrac_avg": 0.1,
        "response/eos_rate": 0.75,  # 1 - the share cut at max_new_tokens
        "grpo/completions/clipped_ratio": 0.25,
        "grpo/rewards/reward_model/mean": 1.25,
        "grpo/reward_std": 0.3,
    }  # train_* summaries are not per-step metrics
    logged.clear()
    TRLMetrics("dpo").on_log(None, state, None, {"loss": 0.69, "rewards/margins": 0.1, "learning_rate": 1e-4})
    assert logged == {"dpo/loss": 0.69, "dpo/rewards_margin": 0.1, "dpo/learning_rate": 1e-4}


# ------------------------------------------------------------------------------------ comparison
def run(algorithm: str, seed: int, judge: float, kl: float, within: bool = True, wall: float = 10.0) -> AlgorithmRun:
    metrics = {
        "eval/kl_mean": kl,
        "eval/win_rate_vs_sft": 0.5 + judge / 10,
        "eval/intent_accuracy": 0.8,
        "eval/violation_rate": 0.1,
        "eval/distinct_2": 0.4,
    }
    return AlgorithmRun(algorithm, seed, judge, within, metrics, wall_s=wall, units=320.0, unit="episodes")


def test_summary_averages_seeds_and_the_winner_stays_within_budget() -> None:
    runs = [
        run("ppo", 0, judge=1.0, kl=4.0),
        run("ppo", 1, judge=0.6, kl=6.0, wall=30.0),
        run("dpo", 0, judge=1.5, kl=9.0, within=False),  # best score, but one seed over the budget
        run("dpo", 1, judge=1.3, kl=3.0),
        run("grpo", 0, judge=0.7, kl=2.0),
        run("grpo", 1, judge=0.9, kl=2.0),
    ]
    rows = summarise(runs)
    assert [r.algorithm for r in rows] == ["ppo", "dpo", "grpo"]
    ppo = rows[0]
    # judge (1.0 + 0.6) / 2 = 0.8; KL (4 + 6) / 2 = 5; wall (10 + 30) / 2 = 20 s; 320 episodes / 20 s = 16/s
    assert ppo.seeds == 2 and ppo.judge == pytest.approx(0.8) and (ppo.judge_min, ppo.judge_max) == (0.6, 1.0)
    assert ppo.columns["kl"] == pytest.approx(5.0) and ppo.columns["win_rate_vs_sft"] == pytest.approx(0.58)
    assert ppo.wall_s == pytest.approx(20.0) and ppo.throughput == pytest.approx(16.0)
    assert not rows[1].within_budget and rows[2].within_budget
    # dpo (1.4) is out; grpo (0.8) ties ppo (0.8) on the judge and wins on the lower KL (2 < 5)
    assert winner(rows) == "grpo"
    assert winner(summarise([r for r in runs if r.algorithm != "grpo"])) == "ppo"
    assert winner(summarise([run("dpo", 0, 1.0, 9.0, within=False)])) is None


def test_comparison_markdown_names_the_winner_and_the_budget() -> None:
    rows = summarise([run("rloo", 0, judge=0.25, kl=1.5), run("dpo", 0, judge=0.5, kl=2.5)])
    text = format_comparison(rows, "gold", 12.0, winner(rows))
    assert "| dpo (winner) | 1 | 0.500 [0.500, 0.500] | yes | 2.50 |" in text
    assert "| rloo | 1 | 0.250" in text and "32.0 episodes/s" in text
    assert text.endswith("Winner within the KL budget of 12 nats: **dpo**")
    none = format_comparison(summarise([run("dpo", 0, 0.5, 20.0, within=False)]), "gold", 12.0, None)
    assert none.endswith("stayed within the KL budget of 12 nats in every seed: no winner")
    assert format_comparison(rows, "gold", None, "dpo").endswith("Winner (no KL budget): **dpo**")
    assert math.isnan(summarise([AlgorithmRun("ppo", 0, 0.1, True, {})])[0].throughput)


# ------------------------------------------------------------------------------------ command line
def test_compare_command_parses_and_refuses_with_the_fix(capsys) -> None:
    from rlhf.cli import ALGORITHM_CHOICES, main, parse_compare

    assert ALGORITHM_CHOICES == ALGORITHMS
    assert parse_compare("ppo, dpo,grpo", "0,1") == (("ppo", "dpo", "grpo"), (0, 1))
    for algorithms, seeds in (
        ("ppo,trpo", "0"),
        ("ppo,ppo", "0"),
        ("", "0"),
        ("dpo", "0,x"),
        ("dpo", "1,1"),
        ("dpo", "-1"),
    ):
        assert main(["compare", "--algorithms", algorithms, "--seeds", seeds]) == 2
        assert "e.g. --" in capsys.readouterr().err
    # every candidate's config is checked before anything trains: DPO trains in one process only
    assert main(["compare", "--algorithms", "ppo,dpo", "--set", "distributed.num_processes=2"]) == 2
    assert "algorithm=dpo trains in one process here" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ wiring
@pytest.mark.parametrize(
    ("algorithm", "data_args"),
    [("ppo", ["prompts"]), ("dpo", ["preferences", "prompts"]), ("rloo", ["prompts"]), ("grpo", ["prompts"])],
)
def test_the_pipeline_trains_the_policy_with_the_configured_algorithm(algorithm, data_args, monkeypatch) -> None:
    import flows.pipeline as pipeline
    from tasks.common import Checkpoint
    from tasks.validate import ValidatedData

    calls = []
    monkeypatch.setattr(
        pipeline, "call_stage", lambda task, cfg, *args: calls.append((task.name, args)) or (None, False)
    )
    data = ValidatedData({"prompts": "p.jsonl", "preferences": "prefs.jsonl", "sft": "s.jsonl"}, {})
    sft, reward = Checkpoint("s", "uri-s"), Checkpoint("r", "uri-r")
    pipeline.train_policy(load_config(None, [f"algorithm={algorithm}"]), sft, reward, data, "parent")
    paths = {"prompts": "p.jsonl", "preferences": "prefs.jsonl"}
    assert calls == [(algorithm, (sft, reward, *[paths[name] for name in data_args], "parent"))]
