"""Deployments that run what they say: each resolves to its preset's values.

prefect.yaml's ``smoke`` names configs/smoke.yaml; deploy/prefect-docker.yaml and
deploy/prefect-k8s.yaml name configs/gpu.yaml and request GPUs through job variables.
The container files are separate (``prefect deploy --all --prefect-file ...``) so that `make serve`
and tests/integration/test_integration_servers.py, which deploy prefect.yaml on the process pool,
never see them. No Docker or Kubernetes here: the checks are on the files.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from rlhf.config import ConfigError, PipelineConfig, load_config, resolve_config

ROOT = Path(__file__).resolve().parents[2]
GPU_PRESET = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


def prefect_yaml_deployment(name: str) -> dict:
    """One deployment of prefect.yaml, by name."""
    (deployment,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"] if d["name"] == name]
    return deployment


def deployed_config(deployment: dict) -> PipelineConfig:
    """The config a run of the deployment trains with: its parameters validated against the
    flow's signature as Prefect does, defaults filled, resolved as the flow's first line does."""
    from flows.pipeline import rlhf_pipeline

    assert deployment["entrypoint"] == "flows/pipeline.py:rlhf_pipeline"
    validated = rlhf_pipeline.validate_parameters(deployment.get("parameters") or {})
    bound = inspect.signature(rlhf_pipeline.fn).bind(**validated)
    bound.apply_defaults()
    args = bound.arguments
    assert args["retrain_of"] is None  # only a drift trigger sets it (tasks/retrain.py)
    return resolve_config(args["config"], args["config_file"], args["overrides"])


@pytest.mark.parametrize("name", ["prefect-docker.yaml", "prefect-k8s.yaml"])
def test_gpu_deployments_run_configs_gpu_yaml(name: str, monkeypatch: pytest.MonkeyPatch):
    """Every value of configs/gpu.yaml reaches the flow; only the process count is the deployment's own."""
    monkeypatch.chdir(ROOT)  # the flow runs in the image's copy of the repository root
    for deployment in load(name)["deployments"]:
        cfg = deployed_config(deployment)
        gpu = load_config("configs/gpu.yaml")
        assert cfg.model.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
        assert (cfg.sft, cfg.reward, cfg.ppo, cfg.eval) == (gpu.sft, gpu.reward, gpu.ppo, gpu.eval)
        assert cfg.model_copy(update={"distributed": gpu.distributed}) == gpu
        assert cfg.distributed.num_processes > 1


def test_smoke_deployment_runs_configs_smoke_yaml(monkeypatch: pytest.MonkeyPatch):
    """The smoke deployment names the preset rather than copying it: a run trains with exactly its values."""
    monkeypatch.chdir(ROOT)  # the worker runs the flow in this folder (prefect.yaml's working directory)
    deployment = prefect_yaml_deployment("smoke")
    assert deployment["parameters"] == {"config_file": "configs/smoke.yaml"}
    smoke = load_config("configs/smoke.yaml")
    assert deployed_config(deployment) == smoke
    assert smoke != PipelineConfig() and smoke.ppo.steps == 4  # the preset is not the defaults


def test_compare_deployment_parameters_are_the_flows(monkeypatch: pytest.MonkeyPatch):
    """The on-demand comparison deployment: its parameters validate against the flow's signature."""
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    deployment = prefect_yaml_deployment("compare")
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    params = flow.validate_parameters(deployment["parameters"])
    assert params["algorithms"] == ("ppo", "dpo", "rloo", "grpo") and params["seeds"] == (0, 1)


def test_pipeline_config_resolution():
    """config alone, config_file instead of it, overrides on either; both at once is an error."""
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    assert resolve_config(smoke) is smoke
    assert resolve_config(PipelineConfig(), ROOT / "configs" / "smoke.yaml") == smoke
    assert resolve_config(smoke, None, ["ppo.steps=6"]) == smoke.model_copy(
        update={"ppo": smoke.ppo.model_copy(update={"steps": 6})}
    )
    assert resolve_config(PipelineConfig(), ROOT / "configs" / "smoke.yaml", ["seed=3"]).seed == 3
    with pytest.raises(ConfigError, match="both config and config_file"):
        resolve_config(smoke, ROOT / "configs" / "gpu.yaml")
    with pytest.raises(ConfigError, match="unknown option 'ppo.stepz'"):
        resolve_config(smoke, None, ["ppo.stepz=6"])


def test_docker_variant_requests_gpus_and_runs_the_pipeline_from_the_image():
    spec = load("prefect-docker.yaml")
    assert "build_docker_image" in next(iter(spec["build"][0]))
    assert (ROOT / spec["build"][0]["prefect_docker.deployments.steps.build_docker_image"]["dockerfile"]).is_file()
    for deployment in spec["deployments"]:
        assert (ROOT / deployment["entrypoint"].split(":")[0]).is_file()
        variables = deployment["work_pool"]["job_variables"]
        assert deployment["work_pool"]["name"] == "rlhf-docker"
        assert variables["env"]["MLFLOW_TRACKING_URI"] == "{{ $MLFLOW_TRACKING_URI }}"
        (request,) = variables["container_create_kwargs"]["device_requests"]
        assert request["Capabilities"] == [["gpu"]] and request["Count"] == -1


def test_k8s_variant_sets_the_resource_variables_its_job_template_defines(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    spec = load("prefect-k8s.yaml")
    template = json.loads((ROOT / "deploy" / "k8s-gpu-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= declared, used - declared
    assert {"gpu_count", "cpu_request", "memory_request"} <= used
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    for deployment in spec["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        assert set(variables) <= declared, set(variables) - declared
        # One training process per requested GPU.
        assert deployed_config(deployment).distributed.num_processes == variables["gpu_count"]


def test_process_pool_prefect_yaml_has_no_container_deployments():
    names = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert names == {"rlhf-process"}
