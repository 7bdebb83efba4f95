"""Nonsense configuration ends in one line naming the key and the fix, exit status 2, before anything starts."""

from __future__ import annotations

import pytest

from rlhf.config import ConfigError, PipelineConfig, load_config

NONSENSE = [
    (
        "ppo.learning_rate=inf",
        "bad value 'inf' for 'ppo.learning_rate': Input should be a finite number. "
        "Fix: set ppo.learning_rate to a finite number",
    ),
    ("sft.learning_rate=.nan", "for 'sft.learning_rate': Input should be a finite number"),
    ("reward.learning_rate=5", "Fix: set reward.learning_rate to at most 1"),
    (
        "ppo.steps=true",
        "bad value True for 'ppo.steps': got the boolean true, but this option is a number. "
        "Fix: set ppo.steps to a number",
    ),
    ("ppo.kl_budget=false", "for 'ppo.kl_budget': got the boolean false, but this option is a number"),
    ("seed=-5", "bad value -5 for 'seed': Input should be greater than or equal to 0. Fix: set seed to at least 0"),
    ("seed=99999999999", "Fix: set seed to at most 4294967295"),
    ("monitor.seed=-1", "Fix: set monitor.seed to at least 0"),
    (
        "ppo.temperature=1e9",
        "for 'ppo.temperature': Input should be less than or equal to 10. Fix: set ppo.temperature to at most 10",
    ),
    ("eval.temperature=1000.0", "Fix: set eval.temperature to at most 10"),
    ("data.max_heldout_prompts=1", "bad value 1 for 'data.max_heldout_prompts'"),
    (
        "ppo.batch_size=10",
        "bad configuration in 'ppo': ppo.batch_size (10) must be a multiple of "
        "ppo.mini_batch_size (16): change one of them",
    ),
    ("ppo.typo=1", "unknown option 'ppo.typo': valid options here are steps, "),
    (
        "monitor.retrain_cooldown_h=12",
        "bad configuration in 'monitor': retrain_cooldown_h: the monitor no longer starts retraining; the "
        "retrain-on-drift deployment's trigger in prefect.yaml does",
    ),
    ("monitor.trigger_deployment=x/y", "Fix: remove trigger_deployment from the monitor options"),
]


@pytest.mark.parametrize("override,expected", NONSENSE, ids=[c[0] for c in NONSENSE])
def test_nonsense_config_names_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message and ("Fix: " in message or "change one of them" in message)


def test_sensible_values_still_load():
    cfg = load_config(None, ["ppo.learning_rate=1e-5", "seed=4294967295", "ppo.temperature=0.7", "ppo.kl_budget=null"])
    assert cfg.ppo.learning_rate == 1e-5 and cfg.seed == 2**32 - 1 and cfg.ppo.kl_budget is None
    assert load_config(None, ["data.max_heldout_prompts=2"]).data.max_heldout_prompts == 2
    assert PipelineConfig.model_validate({"ppo": {"whiten_advantages": False}}).ppo.whiten_advantages is False


def test_cli_exits_2_before_anything_starts(capsys, monkeypatch):
    from rlhf import cli

    def no_flow(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the pipeline started")

    monkeypatch.setattr("rlhf.infra.tracking.check_tracking_store", no_flow)
    assert cli.main(["run", "--set", "ppo.steps=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: error: bad value True for 'ppo.steps'") and err.count("\n") == 1


def test_reward_accuracy_may_be_measured_on_fewer_held_out_pairs(tmp_path):
    from rlhf.builtin.dataset import write_builtin_dataset
    from tasks.reward import heldout_pairs

    path = str(write_builtin_dataset(tmp_path, 0)["preferences_heldout"])
    assert load_config(None, []).reward.max_heldout_pairs is None
    assert len(heldout_pairs(path, None, 0)) == len(heldout_pairs(path, 10_000, 0)) == 500  # all of them
    drawn = heldout_pairs(path, 20, seed=0)
    assert len(drawn) == 20 and drawn["chosen"] == heldout_pairs(path, 20, seed=0)["chosen"]  # the seed's draw
    assert drawn["chosen"] != heldout_pairs(path, 20, seed=1)["chosen"]
    with pytest.raises(ConfigError, match="reward.max_heldout_pairs"):
        load_config(None, ["reward.max_heldout_pairs=0"])
