"""deploy/prefect-docker.yaml and deploy/prefect-k8s.yaml: GPU requests through job variables.

They are separate files (``prefect deploy --all --prefect-file ...``) so that `make serve`
and tests/integration/test_integration_servers.py, which deploy prefect.yaml on the process pool,
never see them. No Docker or Kubernetes here: the checks are on the files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from rlhf.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
GPU_PRESET = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


def test_docker_variant_requests_gpus_and_runs_the_pipeline_from_the_image():
    spec = load("prefect-docker.yaml")
    assert "build_docker_image" in next(iter(spec["build"][0]))
    assert (ROOT / spec["build"][0]["prefect_docker.deployments.steps.build_docker_image"]["dockerfile"]).is_file()
    for deployment in spec["deployments"]:
        assert (ROOT / deployment["entrypoint"].split(":")[0]).is_file()
        cfg = PipelineConfig.model_validate(deployment["parameters"]["config"])
        variables = deployment["work_pool"]["job_variables"]
        assert deployment["work_pool"]["name"] == "rlhf-docker"
        assert variables["env"]["MLFLOW_TRACKING_URI"] == "{{ $MLFLOW_TRACKING_URI }}"
        (request,) = variables["container_create_kwargs"]["device_requests"]
        assert request["Capabilities"] == [["gpu"]] and request["Count"] == -1
        # A GPU deployment trains the GPU preset's model in several processes, not the CPU demo's tiny one.
        assert cfg.model.base_model == GPU_PRESET["model"]["base_model"] != PipelineConfig().model.base_model
        assert cfg.distributed.num_processes > 1


def test_k8s_variant_sets_the_resource_variables_its_job_template_defines():
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
        cfg = PipelineConfig.model_validate(deployment["parameters"]["config"])
        # One training process per requested GPU.
        assert cfg.distributed.num_processes == variables["gpu_count"]


def test_process_pool_prefect_yaml_has_no_container_deployments():
    names = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert names == {"rlhf-process"}
