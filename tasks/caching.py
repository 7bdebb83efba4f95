"""Stage caching and retries: an unchanged stage is not redone, a lost connection is retried.

The cache key of a stage (``StageCache``) is a hash of what its result depends on:

- the config sections the stage reads (``STAGE_SECTIONS``), never the whole config,
  so changing ``ppo.steps`` does not redo SFT;
- the content of its input files and folders (data splits, the base model), not
  their paths: each pipeline run writes its data under outputs/<parent run id>/;
- its upstream references (the SFT and reward ``Checkpoint``: run id and URI), so a
  re-trained SFT model re-runs everything downstream;
- the source of every project file the stage's module imports, directly or not (its
  import closure: an edit anywhere the stage reaches invalidates it, and nowhere else),
  the torch/transformers/trl versions, and Prefect's TASK_SOURCE of the task itself;
- the tracking store, so a cached reference always points into the store in use.

The MLflow parent run id and the output folder are left out: both change with every
flow run. Results persist in Prefect's result storage (``PREFECT_LOCAL_STORAGE_PATH``,
by default ``$PREFECT_HOME/storage``). A cached result holds references only; before
a flow uses one, ``missing_references`` checks that its runs, artifacts and files
still exist, and ``call_stage`` re-runs the stage (refreshing the cache) when not.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

from rlhf.config import PipelineConfig
from rlhf.infra.integrity import fingerprint, fingerprint_path
from rlhf.infra.tracking import tracking_uri
from tasks.common import (
    DPO,
    GRPO,
    PPO,
    RETRY_ON_TRACKING_ERROR,
    REWARD,
    RLOO,
    SFT,
    VALIDATE,
    Checkpoint,
    StageTimedOut,
    config_hash,
)

ROOT = Path(__file__).resolve().parents[1]
EXCLUDED_INPUTS = frozenset({"parent_run_id", "out_dir"})
"""Task inputs that change with every flow run without changing the result."""
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    VALIDATE: ("seed", "data", "validation", "model"),
    SFT: ("seed", "model", "sft"),
    REWARD: ("seed", "model", "reward"),
    PPO: ("seed", "data", "ppo"),
    DPO: ("seed", "data", "dpo", "eval"),
    RLOO: ("seed", "data", "rloo"),
    GRPO: ("seed", "data", "grpo"),
}
"""The config sections each cached stage reads (data: for the task's gold judge; DPO probes its checkpoints at
the evaluation's sampling settings)."""
PROJECT_PACKAGES = ("rlhf", "tasks", "models", "flows")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def module_file(module: str) -> Path | None:
    """The project source file of a dotted module name (None outside the project)."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module a source file imports, at any depth of the file (module and
    function level), including each ``from package import name`` as a possible submodule."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def import_closure(module: str) -> list[Path]:
    """Every project source file ``module`` runs: itself, what it imports, and so on (with the
    packages' ``__init__`` files), sorted."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return sorted(seen)


def code_fingerprint(module: str) -> str:
    """Hash of the source of every project file in ``module``'s import closure."""
    return fingerprint(
        [[f.relative_to(ROOT).as_posix(), f.read_text(encoding="utf-8")] for f in import_closure(module)]
    )


PIPELINE_MODULE = "flows.pipeline"
"""The module whose import closure is the code of a pipeline run (every stage, the promote flow, the library)."""
LINEAGE_CODE_TAG = "lineage.code"
LINEAGE_CONFIG_TAG = "lineage.config_hash"
LINEAGE_DATA_PREFIX = "lineage.data."


def pipeline_code_fingerprint() -> str:
    """Hash of the code a pipeline run executes: the source of every project file the pipeline flow
    imports (directly or not) and the torch/transformers/trl versions."""
    return fingerprint({"code": code_fingerprint(PIPELINE_MODULE), "libraries": _library_versions()})


def training_lineage(cfg: PipelineConfig, fingerprints: dict[str, str]) -> dict[str, str]:
    """What a model version is trained from, as its ``lineage.*`` tags: the validated data (one fingerprint per
    split), the code (``pipeline_code_fingerprint``) and the config hash. Registration writes them; a
    drift-triggered retraining compares them with its own (tasks/retrain.py)."""
    return {
        LINEAGE_CONFIG_TAG: config_hash(cfg),
        LINEAGE_CODE_TAG: pipeline_code_fingerprint(),
        **{f"{LINEAGE_DATA_PREFIX}{split}": fp for split, fp in sorted(fingerprints.items())},
    }


def _library_versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def _store_identity() -> str:
    """The tracking URI with a relative sqlite path made absolute (the same file from any folder)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def canonical(value: Any, sections: tuple[str, ...] = ()) -> Any:
    """A JSON-able stand-in for one task input: config sections, file contents, references."""
    if isinstance(value, PipelineConfig):
        dump = value.model_dump()
        return {name: dump[name] for name in sections}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{k: canonical(v) for k, v in dataclasses.asdict(value).items()}}
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, str) and not _URI.match(value) and os.path.exists(value):
        return {"content": fingerprint_path(value)}  # a local file or folder: its content, not its path
    return value


@dataclass
class StageCache(CachePolicy):
    """Cache key of one pipeline stage (see the module docstring)."""

    stage: str = ""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        sections = STAGE_SECTIONS[self.stage]
        key = {
            "stage": self.stage,
            "inputs": {k: canonical(v, sections) for k, v in sorted(inputs.items()) if k not in EXCLUDED_INPUTS},
            "code": code_fingerprint(f"tasks.{self.stage}"),  # the stage's module has the stage's name
            "libraries": _library_versions(),
            "store": _store_identity(),
        }
        return f"rlhf-{self.stage}-{fingerprint(key)}"


def stage_cache(stage: str) -> CachePolicy:
    """The cache policy of a stage task: StageCache + Prefect's TASK_SOURCE."""
    return StageCache(stage=stage) + TASK_SOURCE


def cached_stage(stage: str) -> dict[str, Any]:
    """The @task options of a cached stage: its name, its cache key, a persisted result, and retries
    when the tracking store's connection failed."""
    return {"name": stage, "cache_policy": stage_cache(stage), "persist_result": True, **RETRY_ON_TRACKING_ERROR}


# -- cached results -------------------------------------------------------------------------
def missing_references(result: Any) -> list[str]:
    """What a (cached) stage result points to that no longer exists: runs, artifacts, local files."""
    from mlflow.artifacts import list_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    missing: list[str] = []
    client = MlflowClient()

    def uri_exists(uri: str) -> bool:
        try:
            return bool(list_artifacts(artifact_uri=uri))
        except (MlflowException, OSError):
            return False

    def walk(value: Any) -> None:
        if isinstance(value, Checkpoint):
            try:
                run = client.get_run(value.run_id)
                alive = run.info.lifecycle_stage == "active"
            except MlflowException:
                alive = False
            if not alive:
                missing.append(f"MLflow run {value.run_id}")
            elif not uri_exists(value.uri):
                missing.append(value.uri)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and _URI.match(value) and "/artifacts/" in value:
            if not uri_exists(value):
                missing.append(value)
        elif isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value):
            missing.append(value)

    walk(result)
    return missing


def call_stage(stage_task: Any, config: PipelineConfig, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """Run a stage task under its time limit; (result, whether it came from the cache).

    The limit is ``config.timeouts.<stage>_s`` (Prefect's ``timeout_seconds``): a stage that runs
    past it fails the flow with ``StageTimedOut``, whose message names the setting. A cached
    result whose references are gone (a deleted run, a cleaned outputs/ folder, another
    tracking store) is not used: the stage runs again and refreshes the cache.
    """
    from prefect import get_run_logger
    from prefect.task_engine import TaskRunTimeoutError

    stage = stage_task.name
    seconds = getattr(config.timeouts, f"{stage}_s")
    timed = stage_task.with_options(timeout_seconds=seconds)
    try:
        state = timed(config, *args, return_state=True, **kwargs)
        result = state.result()
        if state.name != "Cached":
            return result, False
        missing = missing_references(result)
        if not missing:
            return result, True
        get_run_logger().warning(
            "cached result of %s points to what no longer exists (%s): running the stage again",
            stage,
            ", ".join(missing[:3]),
        )
        return timed.with_options(refresh_cache=True)(config, *args, **kwargs), False
    except TaskRunTimeoutError as e:
        raise StageTimedOut(
            f"the {stage} stage ran longer than timeouts.{stage}_s ({seconds} s) and was stopped: if it is "
            f"merely slow, raise the limit (--set timeouts.{stage}_s=SECONDS, or timeouts: {{{stage}_s: SECONDS}} "
            "in the config file); if it hung (a DDP rendezvous waiting for a process that never came, a "
            "stuck download), its log above shows where"
        ) from e
