"""Tier 3: the whole pipeline under Prefect's test harness, and the CLI's user errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from rlhf.cli import main
from rlhf.config import load_config
from tasks.common import config_hash

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
STAGES = {"validate", "sft", "reward", "ppo", "evaluate", "register"}


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.mark.slow
def test_pipeline_tracks_six_stages_and_registers_the_policy(prefect_harness, mlflow_store):
    from flows.pipeline import rlhf_pipeline

    result = rlhf_pipeline(load_config(SMOKE))

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ppo.steps"] == "4"
    children = child_runs(client, result.parent_run_id)
    assert {run.info.run_name for run in children} == STAGES
    assert len(children) == 6
    by_stage = {run.info.run_name: run for run in children}
    for stage in ("sft", "reward"):
        files = {f.path for f in client.list_artifacts(by_stage[stage].info.run_id, "checkpoint")}
        assert "checkpoint/model.safetensors" in files
    ppo_checkpoints = {f.path for f in client.list_artifacts(by_stage["ppo"].info.run_id, "checkpoints")}
    assert ppo_checkpoints == {"checkpoints/step_00000", "checkpoints/step_00002", "checkpoints/step_00004"}
    for name in (
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
    ):
        assert len(client.get_metric_history(by_stage["ppo"].info.run_id, name)) == 4, name
    for name in (
        "eval/gold_reward_mean",
        "eval/rm_score_mean",
        "eval/kl_mean",
        "eval/win_rate_vs_sft",
        "eval/response_length_mean",
        "eval/sft_gold_reward_mean",
    ):
        assert name in result.metrics
    assert "reward/accuracy" in by_stage["reward"].data.metrics

    versions = client.search_model_versions("name = 'rlhf-policy'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["lineage.pipeline_run_id"] == result.parent_run_id
    assert result.model_uri == "models:/rlhf-policy/1"
    # The drift baseline is stored with the version, in the register run that logged it.
    assert versions[0].tags["baseline.uri"] == f"runs:/{by_stage['register'].info.run_id}/baseline"
    assert client.list_artifacts(by_stage["register"].info.run_id, "baseline")

    # MLflow's own surfaces: the reward model registered and linked, dataset inputs with the validated
    # fingerprints, a LoggedModel per checkpoint, the Model training view
    assert versions[0].tags["lineage.reward_model"] == "models:/rlhf-reward/1"
    assert client.get_model_version("rlhf-reward", "1").source == f"{by_stage['reward'].info.artifact_uri}/checkpoint"
    fingerprints = {
        k.removeprefix("data.fingerprint."): v for k, v in parent.data.tags.items() if k.startswith("data.fingerprint.")
    }
    for stage, splits in (
        ("validate", set(fingerprints)),
        ("sft", {"sft"}),
        ("reward", {"preferences", "preferences_heldout"}),
        ("ppo", {"prompts"}),
        ("evaluate", {"heldout_prompts"}),
    ):
        inputs = {
            i.dataset.name: i.dataset.digest for i in client.get_run(by_stage[stage].info.run_id).inputs.dataset_inputs
        }
        assert inputs == {s: fingerprints[s][:36] for s in splits}, stage
    models = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    names = {m.name for m in models}
    assert {"sft-checkpoint", "reward-checkpoint", "ppo-step_00002", "ppo-step_00004", "policy"} <= names, names
    chosen = next(m for m in models if m.tags.get("rlhf.checkpoint_uri") == versions[0].tags["lineage.checkpoint_uri"])
    assert {"eval/win_rate_vs_sft", "eval/selection/kl_mean"} <= {m.key for m in chosen.metrics}
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # Prefect's side: the flow run links its MLflow parent run (the local store: `make mlflow-ui`'s address).
    from prefect.artifacts import Artifact

    link = Artifact.get("mlflow-run")
    assert link is not None  # Prefect 3.9 stores a link artifact as markdown: "[text](url)"
    assert str(link.flow_run_id) == parent.data.tags["prefect.flow_run_id"]
    url = f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{result.parent_run_id}"
    assert link.data.endswith(f"({url})"), link.data


@pytest.mark.slow
def test_drift_retraining_trains_only_when_data_code_or_config_changed(prefect_harness, mlflow_store, tmp_path):
    """retrain_of: a version without recorded lineage is retrained; the version that retraining registered,
    alerting in turn with the same data, code and config, is not (the run stops after validation)."""
    from flows.pipeline import rlhf_pipeline
    from tasks.retrain import drifted_version, retrain_check

    client = MlflowClient()
    client.create_registered_model("rlhf-policy")
    (tmp_path / "old").mkdir()
    old = client.create_model_version("rlhf-policy", source=str(tmp_path / "old")).version  # no lineage tags
    smoke = load_config(SMOKE)

    retrained = rlhf_pipeline(smoke, retrain_of=f"models:/rlhf-policy/{old}")
    assert retrained.model_uri == "models:/rlhf-policy/2"
    tags = client.get_run(retrained.parent_run_id).data.tags
    assert (tags["rlhf.retrain_of"], tags["rlhf.retrain"]) == (f"models:/rlhf-policy/{old}", "true")
    lineage = client.get_model_version("rlhf-policy", "2").tags
    assert {"lineage.code", "lineage.config_hash", "lineage.data.sft", "lineage.data.preferences"} <= set(lineage)

    state = rlhf_pipeline(smoke, retrain_of="models:/rlhf-policy/2", return_state=True)
    assert state.is_completed() and state.name == "Skipped"
    assert state.message.startswith("not retraining models:/rlhf-policy/2: it was trained on the same data")
    assert "run the deployment without retrain_of" in state.message  # the way to retrain anyway
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'rlhf-policy'")) == ["1", "2"]
    experiment = client.get_experiment_by_name("rlhf").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if r.data.tags.get("rlhf.retrain") == "false"]
    assert parent.info.status == "FINISHED" and parent.data.tags["rlhf.retrain_of"] == "models:/rlhf-policy/2"
    assert child_runs(client, parent.info.run_id) == []  # validation came from the cache, and no training ran
    assert parent.data.tags["data.fingerprint.sft"] == lineage["lineage.data.sft"]

    # Registration and the check agree on the lineage: only a real change makes the same version retrainable.
    fingerprints = {k.removeprefix("lineage.data."): v for k, v in lineage.items() if k.startswith("lineage.data.")}
    drifted = drifted_version("models:/rlhf-policy/2")
    assert not retrain_check(drifted, smoke, fingerprints).retrain
    longer = load_config(SMOKE, ["ppo.steps=6"])
    assert retrain_check(drifted, longer, fingerprints).changes == (
        f"lineage.config_hash: {lineage['lineage.config_hash'][:12]} -> {config_hash(longer)[:12]}",
    )
    new_data = {**fingerprints, "preferences": "0" * 64}
    assert retrain_check(drifted, smoke, new_data).changes[0].startswith("lineage.data.preferences: ")


@pytest.mark.slow
def test_bad_preference_data_stops_the_flow_before_training(prefect_harness, mlflow_store, tmp_path):
    from flows.pipeline import rlhf_pipeline
    from rlhf.builtin.dataset import write_builtin_dataset
    from tasks.validate import ValidationFailed

    data = tmp_path / "data"
    write_builtin_dataset(data, seed=0)
    rows = [json.loads(line) for line in (data / "preferences.jsonl").read_text().splitlines()]
    for row in rows[:50]:
        row["rejected"] = row["chosen"]  # chosen == rejected: no preference signal
    (data / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    with pytest.raises(ValidationFailed, match="preferences"):
        rlhf_pipeline(load_config(SMOKE, [f"data.source={data}"]))

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    assert {run.data.tags.get("rlhf.stage") for run in runs if "rlhf.stage" in run.data.tags} == {"validate"}
    parent = next(run for run in runs if "rlhf.stage" not in run.data.tags)
    assert parent.info.status == "FAILED"
    assert client.search_model_versions("name = 'rlhf-policy'") == []
    assert not (Path("mlartifacts").exists() and any(Path("mlartifacts").rglob("model.safetensors")))


def as_public_layouts(folder: Path) -> None:
    """Rewrite a data folder as public data sets come: UltraFeedback-binarized preferences (string
    prompt, whole conversations, extra columns), UltraChat SFT messages, Anthropic HH held-out pairs."""
    from rlhf.builtin.support import customer_message

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]

    def write(name: str, out: list[dict]) -> None:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in out))

    def turn(role: str, text: str) -> dict:
        return {"role": role, "content": text.strip()}

    sft = rows("sft.jsonl")
    write(
        "sft.jsonl",
        [
            {
                "prompt": customer_message(r["prompt"]),
                "prompt_id": str(i),
                "messages": [turn("user", customer_message(r["prompt"])), turn("assistant", r["completion"])],
            }
            for i, r in enumerate(sft)
        ],
    )
    preferences = []
    for i, r in enumerate(rows("preferences.jsonl")):
        user = turn("user", customer_message(r["prompt"]))
        chosen, rejected = [user, turn("assistant", r["chosen"])], [user, turn("assistant", r["rejected"])]
        preferences.append(
            {
                "prompt": user["content"],
                "prompt_id": str(i),
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": 8.0,
                "score_rejected": 2.0,
            }
        )
    write("preferences.jsonl", preferences)
    write(
        "preferences_heldout.jsonl",
        [
            {
                key: f"\n\nHuman: {customer_message(r['prompt'])}\n\nAssistant: {r[key].strip()}"
                for key in ("chosen", "rejected")
            }
            for r in rows("preferences_heldout.jsonl")
        ],
    )


@pytest.mark.slow
def test_user_data_and_a_llama_model_go_through_the_whole_pipeline(mlflow_store, prefect_harness, tmp_path):
    """A user's own data and model, every stage, in one run: a folder of public layouts validates and
    trains a locally built Llama-architecture model (the non-GPT-2 path); with no gold judge, a second
    reward model (another seed) judges; divergence and efficiency are checked."""
    from flows.pipeline import rlhf_pipeline
    from rlhf.builtin.dataset import write_builtin_dataset

    data = write_builtin_dataset(tmp_path / "data", seed=0)["sft"].parent  # the same files, as a user's folder
    as_public_layouts(data)
    result = rlhf_pipeline(
        load_config(SMOKE, [f"data.source={data}", "output_dir=outputs", "model.base_model=builtin:tiny-llama"])
    )

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert {
        split: parent.data.tags[f"data.format.{split}"] for split in ("sft", "preferences", "preferences_heldout")
    } == {
        "sft": "messages",
        "preferences": "conversational-full",
        "preferences_heldout": "transcript",
    }
    judge_run = client.get_run(parent.data.tags["rlhf.judge_reward_run"])
    proxy_run_id = dict(kv.split("=") for kv in parent.data.tags["rlhf.stage_runs"].split(","))["reward"]
    assert judge_run.data.tags["rlhf.stage"] == "reward" and judge_run.info.run_id != proxy_run_id
    evaluate = next(
        r for r in client.search_runs([parent.info.experiment_id]) if r.data.tags.get("rlhf.stage") == "evaluate"
    )
    assert evaluate.data.tags["eval.judge"] == "heldout_reward_model"
    assert evaluate.data.tags["hacking.proxy_efficiency"] in ("true", "false")  # measured, not "n/a"
    assert "eval/gold_reward_mean" not in result.metrics and "eval/heldout_rm_score_mean" in result.metrics

    # The Llama path: every stage ran (the judge is a second reward run) and the registered policy is a Llama.
    assert parent.data.params["model.base_model"] == "builtin:tiny-llama"
    stages = sorted(run.info.run_name for run in child_runs(client, result.parent_run_id))
    assert stages == sorted([*STAGES, "reward"]), stages
    version = client.search_model_versions("name = 'rlhf-policy'")[0]
    checkpoint = version.tags["lineage.checkpoint_uri"]
    config = json.loads(Path(mlflow.artifacts.download_artifacts(f"{checkpoint}/config.json")).read_text())
    assert config["model_type"] == "llama"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--data", "/no/such/folder"], "data.source '/no/such/folder' is not a folder"),
        (["run", "--set", "ppo.stepz=3"], "unknown option 'ppo.stepz'"),
        (["run", "--set", "ppo.batch_size=10"], "must be a multiple of ppo.mini_batch_size"),
        (["run", "--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
        (["run", "--set", "ppo.kl_control=pid"], "bad value 'pid' for 'ppo.kl_control'"),
    ],
)
def test_cli_user_errors_are_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
