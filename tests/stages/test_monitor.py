"""Drift monitoring: the traffic contract, the baseline at registration, detection and diagnosis, the flow.

The champion is the tiny stack's SFT checkpoint (policy and reference at once, so
KL on live prompts is 0), registered in a store of this module with the lineage
tags tasks/register.py writes.
"""

from __future__ import annotations

import json
import os
import random
import types
from datetime import datetime

import numpy as np
import pytest

from rlhf.builtin import support, traffic
from rlhf.config import BaselineConfig, MonitorConfig

MODEL = "rlhf-policy"
SMALL = dict(embedding_rows=200, kl_prompts=16, min_rows=50)


def _hand_pools() -> traffic.ResponsePools:
    rng = random.Random(0)
    clean = [(traffic.clean_prompt(rng), " Your refund is approved.") for _ in range(50)]
    drifted = [(traffic.drifted_prompt("new_intent", rng), " Please contact our support team.") for _ in range(20)]
    return traffic.ResponsePools({"clean": clean, "new_intent": drifted})


def test_simulated_window_follows_the_traffic_contract(tmp_path):
    from rlhf.data.loading import load_standard

    rows = traffic.simulate_window("new_intent", 0.25, 200, seed=3, pools=_hand_pools(), model_version="7")
    assert len(rows) == 200
    assert sum(support.classify_intent(r["prompt"]) == "warranty" for r in rows) == 50  # round(0.25 * 200)
    assert {r["model_version"] for r in rows} == {"7"}
    times = [datetime.fromisoformat(r["timestamp"]) for r in rows]
    assert times == sorted(times)
    feedback = [r["feedback"] for r in rows if r["feedback"] is not None]
    assert set(feedback) <= {0.0, 1.0} and 30 <= len(feedback) <= 90  # feedback_rate 0.3 of 200
    assert traffic.simulate_window("new_intent", 0.25, 200, seed=3, pools=_hand_pools(), model_version="7") == rows
    frame = load_standard(str(traffic.write_jsonl(tmp_path / "w.jsonl", rows)), "traffic").frame
    assert list(frame.columns) == ["timestamp", "prompt", "response", "model_version", "feedback"]
    with pytest.raises(ValueError, match="use a value in"):
        traffic.simulate_window("clean", 1.5, 10, 0, _hand_pools())
    with pytest.raises(ValueError, match="pools hold no 'adversarial'"):
        traffic.simulate_window("adversarial", 0.3, 10, 0, _hand_pools())


def test_drifted_prompts_shift_what_they_claim_to():
    rng = random.Random(0)
    clean = [traffic.clean_prompt(rng) for _ in range(200)]
    assert {support.classify_intent(p) for p in clean} == set(support.TRAIN_INTENTS)
    paraphrased = [traffic.drifted_prompt("paraphrase", rng) for _ in range(200)]
    assert sum(support.classify_intent(p) == "other" for p in paraphrased) > 150  # key phrases replaced
    assert not any(item in p for p in paraphrased for item in support.ITEMS)
    adversarial = [traffic.drifted_prompt("adversarial", rng) for _ in range(50)]
    assert all(p.startswith(support.PROMPT_PREFIX) and p.endswith(support.PROMPT_SUFFIX) for p in adversarial)
    long = [traffic.drifted_prompt("long_prompts", rng) for _ in range(200)]
    assert min(len(p) for p in long) > np.median([len(p) for p in clean]) + 80


def test_fit_texts_cuts_the_prompt_start_then_the_response_end():
    from models.tiny import build_tokenizer
    from rlhf.drift.features import fit_texts

    rng = random.Random(0)
    tokenizer = build_tokenizer([traffic.drifted_prompt("long_prompts", rng) for _ in range(200)], vocab_size=300)
    prompt, response = traffic.drifted_prompt("long_prompts", rng), " Your refund is approved and on the way."
    n_p, n_r = (len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (prompt, response))
    assert fit_texts(tokenizer, [prompt], [response], n_p + n_r + 1) == ([prompt], [response])
    (short,), (same,) = fit_texts(tokenizer, [prompt], [response], n_r + 11)
    assert same == response and prompt.endswith(short) and len(tokenizer(short)["input_ids"]) == 10
    (one,), (cut,) = fit_texts(tokenizer, [prompt], [response], 4)
    assert len(tokenizer(one)["input_ids"]) == 1 and response.startswith(cut) and len(tokenizer(cut)["input_ids"]) == 2


def test_monitor_config_needs_enough_permutations_for_alpha():
    # Holm's first step: p < alpha / 13 tests = 0.01 / 13 -> at least 1300 permutations
    with pytest.raises(ValueError, match="at least 1300 permutations"):
        MonitorConfig(permutations=1000)
    assert MonitorConfig(permutations=200, thresholds={"alpha": 0.1}).permutations == 200
    with pytest.raises(ValueError, match="is now `permutations`"):
        MonitorConfig(mmd_permutations=2000)


def test_read_window_filters_the_version_and_checks_feedback(tmp_path):
    from tasks.monitor import read_window

    rows = traffic.simulate_window("clean", 0.0, 120, 0, _hand_pools(), model_version="2")
    rows += traffic.simulate_window("clean", 0.0, 30, 1, _hand_pools(), model_version="1")
    path = traffic.write_jsonl(tmp_path / "w.jsonl", rows)
    prompts, responses, feedback, other = read_window(str(path), "2", min_rows=100)
    assert len(prompts) == len(responses) == 120 and other == 30
    assert set(feedback.tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="fewer than min_rows=200"):
        read_window(str(path), "2", min_rows=200)
    rows[0]["feedback"] = 5.0
    with pytest.raises(ValueError, match=r"not numbers in \[0, 1\]"):
        read_window(str(traffic.write_jsonl(tmp_path / "bad.jsonl", rows)), "2", min_rows=100)


MALFORMED_WINDOWS = [
    ("null-prompt", {"prompt": None}, "'prompt' is null, not text, or blank in 1 of 120 rows (e.g. line 4)"),
    ("invisible-response", {"response": "\u200b\u200b"}, "'response' is null, not text, or blank in 1 of 120"),
    ("bad-timestamp", {"timestamp": "yesterday"}, "'timestamp' is null or not an ISO 8601 time"),
    ("null-timestamp", {"timestamp": None}, "'timestamp' is null or not an ISO 8601 time"),
    ("impossible-date", {"timestamp": "2024-13-45T99:00:00Z"}, "'timestamp' is null or not an ISO 8601 time"),
    ("null-version", {"model_version": None}, "'model_version' is null in 1 of 120 rows (e.g. line 4)"),
]


@pytest.mark.parametrize("name,edit,expected", MALFORMED_WINDOWS, ids=[c[0] for c in MALFORMED_WINDOWS])
def test_malformed_traffic_window_fails_before_any_model_loads(tmp_path, name, edit, expected):
    from rlhf.data.loading import DataError
    from tasks.monitor import read_window, run_monitor

    rows = traffic.simulate_window("clean", 0.0, 120, 0, _hand_pools(), model_version="2")
    rows[3].update(edit)
    path = traffic.write_jsonl(tmp_path / "window_000.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_window(str(path), "2", min_rows=100)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "Fix: " in message, message
    assert "\n" not in message
    # the flow's task refuses it before it looks for a model (none is registered in this store)
    with pytest.raises(DataError):
        run_monitor(MonitorConfig(traffic=str(tmp_path / "window_*.jsonl")))


def test_find_window_takes_the_latest_and_names_the_fix(tmp_path):
    from tasks.monitor import find_window

    with pytest.raises(FileNotFoundError, match=r"rlhf traffic --kind new_intent.*monitor\.traffic"):
        find_window(MonitorConfig(traffic=str(tmp_path / "none_*.jsonl")))
    for i in (0, 2, 1):
        traffic.write_jsonl(tmp_path / f"window_{i:04d}.jsonl", [])
    latest = find_window(MonitorConfig(traffic=str(tmp_path / "window_*.jsonl")))
    assert latest.index == 2 and latest.path.endswith("window_0002.jsonl")
    assert find_window(MonitorConfig(traffic=str(tmp_path / "window_*.jsonl"), window_index=0)).index == 0


# --- with models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(tiny_stack, tmp_path_factory):
    """The tiny stack's SFT checkpoint registered as champion (lineage tags, baseline), plus response pools."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from rlhf.infra.tracking import download, log_checkpoint, setup_experiment, stage_run
    from tasks.baseline import run_baseline
    from tasks.monitor import load_models

    root = tmp_path_factory.mktemp("monitor")
    uri = f"sqlite:///{root}/mlflow.db"
    old_uri, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.chdir(root)
    client = MlflowClient()
    with mlflow.start_run(experiment_id=setup_experiment("rlhf"), run_name="pipeline-test") as parent:
        uris = {}
        for stage, ckpt in (("sft", tiny_stack.sft), ("reward", tiny_stack.reward)):
            with stage_run(parent.info.run_id, stage):
                uris[stage] = log_checkpoint(download(ckpt.uri, root), "checkpoint")
        with stage_run(parent.info.run_id, "register") as register:
            client.create_registered_model(MODEL)
            mv = client.create_model_version(MODEL, source=uris["sft"], run_id=register.info.run_id)
            for key, value in {
                "lineage.pipeline_run_id": parent.info.run_id,
                "lineage.checkpoint_uri": uris["sft"],
            }.items():
                client.set_model_version_tag(MODEL, mv.version, key, value)
    client.set_registered_model_alias(MODEL, "champion", mv.version)
    baseline_uri = run_baseline(
        tiny_stack.cfg,
        MODEL,
        mv.version,
        [tiny_stack.paths["heldout_prompts"], tiny_stack.paths["prompts"]],
        BaselineConfig(max_prompts=600, embedding_rows=200, responses=256),
    )
    cfg = MonitorConfig(registered_model=MODEL, traffic=str(root / "traffic" / "window_*.jsonl"), **SMALL)
    models = load_models(cfg)
    pools = traffic.build_pools(
        models.policy,
        models.reward_model,
        models.tokenizer,
        clean_size=300,
        drift_size=120,
        seed=1,
        kinds=("clean", "new_intent", "degraded_policy"),
    )
    yield types.SimpleNamespace(
        root=root,
        uri=uri,
        version=str(mv.version),
        register_run_id=register.info.run_id,
        sft_uri=uris["sft"],
        baseline_uri=baseline_uri,
        cfg=cfg,
        models=models,
        pools=pools,
    )
    os.chdir(cwd)
    if old_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_uri
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_baseline_is_stored_with_the_version(champion):
    from mlflow.tracking import MlflowClient

    from rlhf.drift.profile import load_baseline

    tags = MlflowClient().get_model_version(MODEL, champion.version).tags
    assert tags["baseline.uri"] == champion.baseline_uri == f"runs:/{champion.register_run_id}/baseline"
    baseline = load_baseline(champion.baseline_uri)
    profile = baseline.profile
    json.dumps(profile, allow_nan=False)  # strict JSON: no NaN slipped in
    assert profile["prompts"]["n"] == 600 and profile["responses"]["n"] == 256
    assert baseline.embeddings.shape == (200, champion.models.policy.config.n_embd)
    assert set(profile["prompts"]["intent_counts"]) == set(support.TRAIN_INTENTS)
    assert len(profile["responses"]["rm_scores"]) == len(profile["responses"]["gold"]) == 256
    assert profile["kl"]["mean"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert 0 < profile["responses"]["feedback_positive_rate"] < 1
    assert profile["models"]["reference"] == champion.models.lineage.reference_uri


@pytest.mark.slow
def test_lineage_finds_the_stage_runs(champion):
    lineage = champion.models.lineage
    assert {"sft", "reward", "register"} <= set(lineage.stage_runs)
    assert lineage.policy_uri == champion.sft_uri
    assert lineage.reference_uri.endswith(f"{lineage.stage_runs['sft']}/artifacts/checkpoint")
    assert lineage.reward_model_uri.endswith(f"{lineage.stage_runs['reward']}/artifacts/checkpoint")


@pytest.mark.slow
def test_clean_windows_pass_and_drift_is_detected_and_diagnosed(champion):
    from tasks.monitor import analyze_window

    def run(kind: str, seed: int):
        rows = traffic.simulate_window(kind, traffic.DEFAULT_MAGNITUDE, 300, seed, champion.pools, champion.version)
        feedback = np.array([r["feedback"] for r in rows if r["feedback"] is not None])
        return analyze_window(
            champion.models, [r["prompt"] for r in rows], [r["response"] for r in rows], feedback, champion.cfg, seed
        )

    for seed in (1, 2):
        clean = run("clean", seed)
        assert clean.diagnosis.cause is None, (clean.diagnosis, clean.metrics)
    for kind in ("new_intent", "degraded_policy"):
        for seed in (1, 2):
            analysis = run(kind, seed)
            assert analysis.diagnosis.cause == traffic.CAUSES[kind], (kind, analysis.diagnosis, analysis.metrics)
    assert analysis.metrics["drift/kl_live_mean"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_drift_monitor_flow_logs_series_flags_version_and_alerts(champion, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.monitor import drift_monitor

    traffic.write_windows(
        champion.root / "traffic", ["clean", "new_intent"], champion.pools, n_rows=300, model_version=champion.version
    )
    first = drift_monitor(champion.cfg.model_copy(update={"window_index": 0}))
    cfg = champion.cfg
    latest = drift_monitor(cfg)
    assert not first.alert and first.window_index == 0
    assert latest.alert and latest.cause == "input_shift" and latest.window_index == 1
    assert drift_monitor(cfg).skipped  # the latest window was monitored already

    client = MlflowClient()
    history = client.get_metric_history(latest.series_run_id, "drift/prompt_intent_psi")
    assert sorted(m.step for m in history) == [0, 1]
    assert max(history, key=lambda m: m.step).value > cfg.thresholds.prompt_intent_psi
    run = client.get_run(latest.run_id)
    assert run.data.tags["drift.alert"] == "true" and run.data.tags["model_version"] == champion.version
    assert run.data.tags["drift.cause"] == "input_shift"
    assert {"drift.event_id", "drift.artifact_id"} <= set(run.data.tags)
    assert {a.path for a in client.list_artifacts(latest.run_id, "report")} == {
        "report/diagnosis.md",
        "report/distributions.png",
    }
    assert "likely cause: input shift" in latest.report_markdown and "warranty" in latest.report_markdown
    version_tags = client.get_model_version(MODEL, champion.version).tags
    assert version_tags["drift.alert"] == "input_shift" and version_tags["drift.alert_run_id"] == latest.run_id
    assert client.get_run(first.run_id).data.tags["drift.alert"] == "false"


@pytest.mark.slow
def test_rlhf_traffic_and_monitor_commands_alert_on_new_intent_only(champion, prefect_harness, capsys):
    from rlhf.cli import main

    out = champion.root / "cli-traffic"
    traffic.write_windows(out, ["clean"], champion.pools, n_rows=300, model_version=champion.version)
    small = [f"--set=monitor.{k}={v}" for k, v in SMALL.items()]
    # `rlhf traffic` samples the champion (found through its lineage) and numbers its window after the clean one
    assert main(["traffic", "--kind", "new_intent", "--rows", "300", "--out", str(out), *small]) == 0
    rows = [json.loads(line) for line in (out / "window_0001.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and {r["model_version"] for r in rows} == {champion.version}
    assert sum(support.classify_intent(r["prompt"]) == "warranty" for r in rows) == 90  # magnitude 0.3 of 300
    capsys.readouterr()

    glob = str(out / "window_*.jsonl")
    assert main(["monitor", "--traffic", glob, "--window", "0", *small]) == 0
    clean = capsys.readouterr().out
    assert f"{MODEL} v{champion.version}, window 0" in clean and "no drift" in clean and "YES" not in clean, clean
    assert main(["monitor", "--traffic", glob, "--fail-on-alert", "--report", *small]) == 1  # the latest window
    drifted = capsys.readouterr().out
    assert "# Drift report: rlhf-policy" in drifted and "warranty" in drifted  # --report: the whole report
    assert "window 1" in drifted and "ALERT, likely cause: input shift" in drifted, drifted
    assert "prompt_intent_psi" in drifted and "Evidence:" in drifted
    logged = int(drifted.split(" drift/* metrics logged to MLflow run ")[0].rsplit("\n", 1)[-1])
    assert logged >= 4
    assert main(["monitor", "--traffic", glob, *small]) == 0  # the same window again: skipped, no alert
    assert "monitored already" in capsys.readouterr().out
    short = traffic.write_jsonl(out / "short" / "window_0000.jsonl", rows[:20])
    assert main(["monitor", "--traffic", str(short), *small]) == 2  # a user error: one line, before Prefect
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fewer than min_rows=50" in err, err


def test_alert_event_is_what_the_retraining_trigger_expects():
    """prefect.yaml's retrain-on-drift trigger covers the monitor's alert event, keeps one cooldown per model
    version, and its retrain_of template names a payload field the event carries (the server renders it)."""
    from pathlib import Path

    import yaml
    from prefect.events import Event
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    from tasks.monitor import MonitorResult, alert_event

    root = Path(__file__).resolve().parents[2]
    (deployment,) = [
        d for d in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"] if d["name"] == "retrain-on-drift"
    ]
    (spec,) = deployment["triggers"]
    trigger = EventTrigger.model_validate(
        {k: spec[k] for k in ("match", "expect", "for_each", "posture", "threshold", "within")}
    )

    def received(model: str, version: str) -> ReceivedEvent:
        result = MonitorResult(model, version, "w.jsonl", 3, False, True, "input_shift")
        return ReceivedEvent(**Event(**alert_event(result)).model_dump())  # as emit_event sends it

    first, again, other = received(MODEL, "3"), received(MODEL, "3"), received(MODEL, "4")
    assert trigger.covers(first) and trigger.covers(other)
    assert not trigger.covers(received("rlhf-reward", "3"))  # another model's alerts do not retrain the policy
    assert trigger.bucketing_key(first) == trigger.bucketing_key(again) != trigger.bucketing_key(other)
    assert spec["parameters"] == {"retrain_of": "{{ event.payload.model_uri }}"}
    assert first.payload["model_uri"] == "models:/rlhf-policy/3"
    assert trigger.within.total_seconds() == 24 * 3600  # the cooldown docs/monitoring.md states


def test_a_window_run_cut_short_by_kill_9_is_ended_and_the_window_measured_again(mlflow_store, tmp_path):
    """A monitor killed while logging a window left its window run RUNNING, and every later monitor run skipped
    that window as already monitored, so it was never measured. Now the next start ends the run KILLED (its owner
    is gone) and only a finished window run counts."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from rlhf.infra.tracking import end_dead_runs, setup_experiment
    from tasks.monitor import TrafficWindow, already_monitored

    client = MlflowClient()
    experiment_id = setup_experiment("monitor-kill9")
    series = client.create_run(experiment_id, tags={"drift.series": "m/1"})
    window = TrafficWindow(str(tmp_path / "window_000.jsonl"), 0)
    killed = f"""
import os, signal, mlflow
from rlhf.infra.tracking import heartbeat, owner_tags
mlflow.set_tracking_uri({mlflow_store!r})
with mlflow.start_run(experiment_id={experiment_id!r}, parent_run_id={series.info.run_id!r}, nested=True,
                      tags={{"drift.window_index": "0", "drift.window_file": {window.path!r}, **owner_tags()}}) as run:
    with heartbeat(run.info.run_id):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while the window run is open
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", killed], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not already_monitored(client, experiment_id, series.info.run_id, window)
    (ended,) = end_dead_runs(experiment_id)
    assert client.get_run(ended.info.run_id).info.status == "KILLED"
    assert not already_monitored(client, experiment_id, series.info.run_id, window)
    done = client.create_run(
        experiment_id,
        tags={"mlflow.parentRunId": series.info.run_id, "drift.window_index": "0", "drift.window_file": window.path},
    )
    client.set_terminated(done.info.run_id)
    assert already_monitored(client, experiment_id, series.info.run_id, window)
