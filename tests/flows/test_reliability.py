"""Reliability and security under faults (docs/reliability.md).

Fast tests: checkpoint manifests, secret masking, PII redaction, the tracking
preflight, data size limits, safetensors-only loading, cache keys. Slow tests:
a corrupted PPO checkpoint, a lost tracking connection (Prefect retry and a real
MLflow server going down mid-run), and the whole pipeline killed with SIGKILL during
PPO, re-run, re-run unchanged, and run twice at once.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlhf.config import load_config
from rlhf.data.loading import DataError, load_split
from rlhf.infra.integrity import MANIFEST, CheckpointCorrupted, sha256_file, verify_manifest, write_manifest
from rlhf.infra.security import MASK, mask_secrets, redact_rows, redact_text
from rlhf.infra.tracking import TrackingUnavailable, check_tracking_store, is_transient_tracking_error
from tasks.common import Checkpoint

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
PII_TEXT = "Mail jane.doe@example.com or call +1 415 555 0142, card 4111 1111 1111 1111."


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One SQLite MLflow store for this module's fast tests (creating one takes seconds)."""
    root = tmp_path_factory.mktemp("reliability-store")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(None)


def artifact_path(uri: str) -> Path:
    """The local folder of an artifact URI of a local store (file:// or a plain path)."""
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)


# ------------------------------------------------------------------------------ integrity
def test_manifest_refuses_truncated_changed_or_missing_files(tmp_path) -> None:
    ckpt = tmp_path / "step_00004"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "sub" / "state.json").write_text('{"step": 4}')
    write_manifest(ckpt)
    assert verify_manifest(ckpt)
    # the manifest is coreutils' format: `sha256sum -c` checks it too
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=ckpt, check=True)

    original = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(original[:1000])  # truncated
    with pytest.raises(
        CheckpointCorrupted,
        match=r"model.safetensors \(1000 bytes\).*truncated or changed.*Fix: use an earlier checkpoint",
    ):
        verify_manifest(ckpt)
    (ckpt / "model.safetensors").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
    with pytest.raises(CheckpointCorrupted, match="model.safetensors"):
        verify_manifest(ckpt)
    (ckpt / "model.safetensors").write_bytes(original)
    (ckpt / "sub" / "state.json").unlink()
    with pytest.raises(CheckpointCorrupted, match="sub/state.json is listed .* but missing"):
        verify_manifest(ckpt)
    (ckpt / "sub" / "state.json").write_text('{"step": 4}')
    assert verify_manifest(ckpt)
    (ckpt / MANIFEST).write_text("not a manifest\n")
    with pytest.raises(CheckpointCorrupted, match="manifest itself is damaged"):
        verify_manifest(ckpt)
    (ckpt / MANIFEST).unlink()
    assert verify_manifest(ckpt, required=False) is False
    with pytest.raises(CheckpointCorrupted, match="has no SHA256SUMS"):
        verify_manifest(ckpt)


def test_logged_checkpoints_are_verified_on_download(shared_store, tmp_path) -> None:
    from rlhf.infra.tracking import download, log_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(2048))
    with mlflow.start_run():
        uri = log_checkpoint(folder, "checkpoint")
    local = download(uri, tmp_path / "into")
    assert sorted(p.name for p in local.iterdir()) == [MANIFEST, "model.safetensors"]
    assert local.is_relative_to(tmp_path / "into")  # under the caller's folder, which it removes
    # corrupt the stored copy (the local artifact store is a folder): the next download refuses it
    store_file = artifact_path(uri) / "model.safetensors"
    store_file.write_bytes(store_file.read_bytes()[:100])
    with pytest.raises(CheckpointCorrupted, match="model.safetensors"):
        download(uri, tmp_path / "into")


# ------------------------------------------------------------------------------- security
def test_secret_like_params_and_values_are_masked(shared_store) -> None:
    from rlhf.infra.tracking import flatten, log_params

    params = {
        "model": {"base_model": f"https://alice:{SECRET}@hub.example.com/org/model", "trust_remote_code": False},
        "data": {"source": f"s3://bucket/data?token={SECRET}"},
        "hub_token": "short-but-secret",
        "db_password": "hunter2",
        "api_key": "abc",
        "ppo": {"max_new_tokens": 16},
        "tokenizer": "gpt2",
    }
    masked = mask_secrets(params)
    assert masked["model"]["base_model"] == f"https://alice:{MASK}@hub.example.com/org/model"
    assert SECRET not in json.dumps(masked)
    assert masked["hub_token"] == masked["db_password"] == masked["api_key"] == MASK
    # names that merely contain "token" and ordinary values are left alone
    assert masked["ppo"]["max_new_tokens"] == 16 and masked["tokenizer"] == "gpt2"
    assert masked["model"]["trust_remote_code"] is False
    with mlflow.start_run() as run:
        log_params(flatten(params))
    logged = MlflowClient().get_run(run.info.run_id).data.params
    assert SECRET not in json.dumps(logged) and "hunter2" not in json.dumps(logged)
    assert logged["ppo.max_new_tokens"] == "16"


KILLED_MID_STAGE = """
import os, signal, sys
import mlflow
from rlhf.config import PipelineConfig
from tasks.common import pipeline_run
from rlhf.infra.tracking import stage_run
with pipeline_run(PipelineConfig(experiment="kill9"), "killed", "flow-run-id") as parent_id:
    with stage_run(parent_id, "sft"):
        print(parent_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 in the middle of SFT
"""


def test_runs_left_running_by_kill_9_end_killed_at_the_next_start(shared_store, tmp_path) -> None:
    from rlhf.config import PipelineConfig
    from rlhf.ppo.resume import owner_alive
    from tasks.common import pipeline_run

    client = MlflowClient()
    env = {**os.environ, "MLFLOW_TRACKING_URI": shared_store, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", KILLED_MID_STAGE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    parent_id = out.stdout.split()[0]
    experiment_id = client.get_run(parent_id).info.experiment_id
    left = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    assert {r.info.run_id for r in left} >= {parent_id} and len(left) == 2  # the parent and its sft run
    # A live run of another process on this host, and a run of another host with a fresh heartbeat, are left
    # alone; a run of another host whose heartbeat is older than STALE_AFTER_BEATS intervals (5 x 30 s) ends.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    remote = {"rlhf.owner_host": "gpu-node-7", "rlhf.owner_pid": "4242", "rlhf.heartbeat_interval_s": "30"}
    try:
        live = client.create_run(
            experiment_id, tags={"rlhf.owner_host": socket.gethostname(), "rlhf.owner_pid": str(sleeper.pid)}
        )
        fresh = client.create_run(experiment_id, tags={**remote, "rlhf.heartbeat": f"{time.time() - 60:.0f}"})
        stale = client.create_run(
            experiment_id, tags={**remote, "rlhf.heartbeat": f"{time.time() - 200:.0f}", "ppo.resume_key": "k"}
        )
        # PPO's takeover rule is the same: 200 s without a heartbeat is dead (it was 15 minutes), 60 s is alive
        assert owner_alive(client.get_run(fresh.info.run_id))
        assert not owner_alive(client.get_run(stale.info.run_id))
        with pipeline_run(PipelineConfig(experiment="kill9"), "next", "flow-run-2"):
            pass
        for run in [*left, stale]:
            ended = client.get_run(run.info.run_id)
            assert ended.info.status == "KILLED" and ended.data.tags["rlhf.ended_by"] == "dead-owner"
        assert client.get_run(live.info.run_id).info.status == "RUNNING"
        assert client.get_run(fresh.info.run_id).info.status == "RUNNING"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stage_runs_heartbeat_from_a_thread_while_the_stage_is_busy(shared_store, monkeypatch) -> None:
    from rlhf.config import PipelineConfig
    from rlhf.infra.tracking import HEARTBEAT_TAG, stage_run
    from tasks.common import pipeline_run

    monkeypatch.setenv("RLHF_HEARTBEAT_S", "0.2")
    client = MlflowClient()
    with pipeline_run(PipelineConfig(experiment="heartbeat"), "beats", "flow-run-3") as parent_id:
        with stage_run(parent_id, "sft") as run:
            run_ids = [parent_id, run.info.run_id]
            assert client.get_run(run.info.run_id).data.tags["rlhf.heartbeat_interval_s"] == "0.2"
            # The stage's own thread never writes a heartbeat (it could be in one long training step): each run's
            # tag must still change, several times (it holds whole seconds).
            seen: dict[str, set[str]] = {run_id: set() for run_id in run_ids}
            deadline = time.monotonic() + 60
            while min(map(len, seen.values())) < 3 and time.monotonic() < deadline:
                for run_id in run_ids:
                    seen[run_id].add(client.get_run(run_id).data.tags[HEARTBEAT_TAG])
                time.sleep(0.2)
            assert all(len(values) >= 3 for values in seen.values()), seen
    assert not [t for t in threading.enumerate() if t.name.startswith("rlhf-heartbeat-")]  # stopped with the runs


KILLED_FLOW_RUN = """
import os, signal
from prefect import flow
from prefect.context import FlowRunContext
from rlhf.config import PipelineConfig
from rlhf.infra.tracking import stage_run
from tasks.common import pipeline_run

@flow
def doomed() -> None:
    flow_run = FlowRunContext.get().flow_run
    with pipeline_run(PipelineConfig(experiment="kill9-prefect"), flow_run.name, str(flow_run.id)) as parent_id:
        with stage_run(parent_id, "evaluate"):
            print(parent_id, flow_run.id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 in the middle of the evaluate stage

doomed()
"""


def test_flow_run_of_a_killed_pipeline_ends_crashed_at_the_next_start(prefect_harness, mlflow_store) -> None:
    from uuid import UUID

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    from rlhf.config import PipelineConfig
    from tasks.common import pipeline_run

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_store,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run([sys.executable, "-c", KILLED_FLOW_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
    parent_id, flow_run_id = out.stdout.split()[:2]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(UUID(flow_run_id)).state.type.value == "RUNNING"  # what kill -9 leaves

        @flow
        def next_pipeline() -> None:
            flow_run = FlowRunContext.get().flow_run
            with pipeline_run(PipelineConfig(experiment="kill9-prefect"), flow_run.name, str(flow_run.id)):
                pass

        next_pipeline()
        state = prefect.read_flow_run(UUID(flow_run_id)).state
    assert state.type.value == "CRASHED" and "process is gone" in state.message
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    assert client.search_runs([experiment_id], "attributes.status = 'RUNNING'") == []
    killed = client.search_runs([experiment_id], "attributes.status = 'KILLED'")
    assert {r.data.tags.get("rlhf.stage", "pipeline") for r in killed} == {"pipeline", "evaluate"}


ZOMBIE_FLOW_RUN = """
import os, signal, time
from prefect import flow
from prefect.context import FlowRunContext

@flow
def zombie() -> None:
    print(FlowRunContext.get().flow_run.id, flush=True)
    time.sleep(3)  # Prefect sends the first heartbeat as the run starts
    os.kill(os.getpid(), signal.SIGKILL)  # the process (and its machine) is gone: no final state is reported

zombie()
"""


def test_flow_run_whose_heartbeats_stop_is_crashed_by_the_zombie_automation(prefect_harness) -> None:
    from uuid import UUID

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.automations import NAME, ensure_zombie_automation

    # 4-second beats (12 s to Crashed) instead of `make serve`'s 30 (90 s); created twice: still one automation
    ensure_zombie_automation(4)
    automation = ensure_zombie_automation(4)
    try:
        with get_client(sync_client=True) as prefect:
            assert [a.id for a in prefect.read_automations_by_name(NAME)] == [automation.id]
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", ZOMBIE_FLOW_RUN], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
        flow_run_id = UUID(out.stdout.split()[0])
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(flow_run_id).state
            while state.type.value == "RUNNING" and time.monotonic() < deadline:
                time.sleep(1)
                state = prefect.read_flow_run(flow_run_id).state
        assert state.type.value == "CRASHED" and "no heartbeat for 3 x 4 s" in state.message, state
    finally:
        Automation.read(id=automation.id).delete()  # the session's other flow runs must not meet a 12 s limit


def test_pii_is_redacted_in_logged_ppo_samples(shared_store) -> None:
    from tasks.ppo import log_samples

    rows = [{"step": 2, "prompt": PII_TEXT, "response": "Write to help@shop.example.org", "score": 0.5, "kl": 0.1}]
    assert redact_text(PII_TEXT) == "Mail [EMAIL] or call [PHONE], card [CARD]."
    assert redact_rows(rows)[0]["score"] == 0.5  # numbers pass through
    with mlflow.start_run() as run:
        log_samples(rows, 2)
    logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/samples/step_00002.json")).read_text()
    assert "example.com" not in logged and "555" not in logged and "4111" not in logged
    assert "[EMAIL]" in logged and "[CARD]" in logged


def test_pii_is_redacted_in_drift_report_examples() -> None:
    from tasks.monitor import redacted

    out = redacted({"Longest prompts": [(PII_TEXT, "call me at +44 20 7946 0958", "31 tokens")]})
    ((prompt, response, note),) = out["Longest prompts"]
    assert "@" not in prompt and "7946" not in response and note == "31 tokens"


UNPICKLERS = {
    "torch.load",
    "torch.serialization.load",
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "joblib.load",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "pandas.read_pickle",
}


def unsafe_loads(source: str) -> list[str]:
    """Calls in source that may unpickle: a loader above, under any import alias, except torch.load with
    weights_only=True."""
    tree = ast.parse(source)
    names: dict[str, str] = {}  # local name -> dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        head, _, rest = ast.unparse(node.func).partition(".")
        dotted = names.get(head, head) + (f".{rest}" if rest else "")
        if dotted not in UNPICKLERS:
            continue
        keywords = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
        if dotted in ("torch.load", "torch.serialization.load") and keywords.get("weights_only") == "True":
            continue
        found.append(ast.unparse(node))
    return found


def test_safetensors_only_torch_load_weights_only_and_no_remote_code(tmp_path) -> None:
    from models.loading import load_causal_lm
    from rlhf.builtin.model import resolve_base_model

    # 1. a checkpoint whose weights are only pickled is refused, with the conversion to do
    base = resolve_base_model("builtin:tiny-gpt2", tmp_path / "base")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(base) / "config.json", pickled)
    torch.save(load_causal_lm(base).state_dict(), pickled / "pytorch_model.bin")  # the legacy pickled layout
    with pytest.raises(ValueError, match="pickle-based.*safe_serialization=True"):
        load_causal_lm(str(pickled))
    # 2. no code path unpickles: every torch.load (however imported) passes weights_only=True, and nothing
    # calls pickle/joblib loaders. The checker is shown to catch the forms a text match missed.
    for unsafe in [
        "from torch import load\nload(f)",
        "from torch import load as tl\ntl(f, weights_only=False)",
        "import torch as t\nt.load(f)",
        "import pickle\npickle.load(f)",
        "from pickle import loads\nloads(b)",
        "import joblib\njoblib.load(p)",
    ]:
        assert unsafe_loads(unsafe), unsafe
    assert not unsafe_loads("import torch\ntorch.load(f, weights_only=True)\nimport json\njson.load(f)")
    safe_calls = 0
    for path in [
        *ROOT.glob("rlhf/**/*.py"),
        *ROOT.glob("tasks/*.py"),
        *ROOT.glob("models/*.py"),
        *ROOT.glob("flows/*.py"),
    ]:
        source = path.read_text()
        assert not unsafe_loads(source), (path, unsafe_loads(source))
        safe_calls += source.count("weights_only=True")
    assert safe_calls >= 2  # the optimizer and RNG state of PPO checkpoints
    # 3. remote code is off unless asked for
    assert load_config().model.trust_remote_code is False
    # 4. servers we start listen on 127.0.0.1 only
    hosts = re.findall(r"--host\s+(\S+)", (ROOT / "Makefile").read_text() + (ROOT / "scripts" / "serve.sh").read_text())
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts


def test_data_files_over_the_size_limits_are_refused(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Where is order {i}?"}) + "\n" for i in range(200)))
    assert len(load_split(str(path))) == 200
    with pytest.raises(
        DataError, match=r"over the 2.0 kB limit \(validation.max_file_bytes\).*raise validation.max_file_bytes"
    ):
        load_split(str(path), max_file_bytes=2000)
    with pytest.raises(DataError, match=r"line 1 is .* over the 0.0 kB limit"):
        load_split(str(path), max_row_bytes=10)
    assert load_config(None, ["validation.max_file_bytes=5000"]).validation.max_file_bytes == 5000


# ---------------------------------------------------------------------------- tracking store
def test_unreachable_tracking_store_fails_fast_naming_uri_and_fix(tmp_path, monkeypatch, capsys) -> None:
    from rlhf.cli import main

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(
        TrackingUnavailable, match=rf"MLflow tracking server {uri} is unreachable.*Fix: start it \(`make serve`"
    ):
        check_tracking_store(uri)
    assert time.monotonic() - start < 5
    # a password in the URI is not repeated in the message
    with pytest.raises(TrackingUnavailable) as err:
        check_tracking_store(f"http://bob:{SECRET}@127.0.0.1:{port}")
    assert SECRET not in str(err.value) and f"bob:{MASK}@" in str(err.value)
    with pytest.raises(TrackingUnavailable, match="does not exist. Fix: create the folder"):
        check_tracking_store(f"sqlite:///{tmp_path}/no/such/folder/mlflow.db")
    assert check_tracking_store(f"sqlite:///{tmp_path}/mlflow.db")
    # the CLI says it in one line, exit status 2, before Prefect or any training starts
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["run", "--config", str(ROOT / "configs" / "smoke.yaml")]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and uri in err_text and "make serve" in err_text
    assert not (tmp_path / "outputs").exists()


def test_transient_tracking_errors_are_told_apart() -> None:
    import requests

    lost = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url"
    )
    assert is_transient_tracking_error(lost)
    try:
        try:
            raise requests.ConnectionError("Connection refused")
        except requests.ConnectionError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert is_transient_tracking_error(wrapped)
    assert not is_transient_tracking_error(ValueError("bad config"))
    assert not is_transient_tracking_error(MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST"))


def test_a_stage_stopped_at_its_time_limit_is_never_retried() -> None:
    import requests
    from prefect._internal.concurrency.cancellation import CancelledError
    from prefect.states import Failed
    from prefect.task_engine import TaskRunTimeoutError

    from tasks.common import StageTimedOut, retry_on_tracking_error

    def retried(exc: BaseException) -> bool:
        return retry_on_tracking_error(None, None, Failed(data=exc))

    def raised(exc: BaseException, under: BaseException) -> BaseException:
        try:
            try:
                raise under
            except BaseException:
                raise exc  # noqa: B904 (chained implicitly, as a stage's own handler would)
        except BaseException as e:
            return e

    lost = requests.ConnectionError("Connection refused")
    assert retried(lost)
    assert not retried(TaskRunTimeoutError("Scope timed out after 40 second(s)."))
    # the limit under what the stage raised: a connection it interrupted, the stage's own wrapper
    assert not retried(raised(lost, TaskRunTimeoutError("Scope timed out after 40 second(s).")))
    assert not retried(raised(lost, CancelledError()))  # how Prefect interrupts a task at its limit
    assert not retried(raised(RuntimeError("upload failed"), StageTimedOut("timeouts.sft_s")))
    assert not retried(ValueError("bad config"))


# ---------------------------------------------------------------------------------- caching
def test_stage_cache_key_follows_inputs_not_run_ids_or_paths(tmp_path, shared_store) -> None:
    from tasks.caching import StageCache

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "sft.jsonl").write_text('{"prompt": "Hi", "completion": "Hello"}\n')
    cfg = load_config()
    sft_key = StageCache(stage="sft").compute_key
    inputs = {
        "cfg": cfg,
        "base_model": "gpt2",
        "sft_path": str(tmp_path / "a" / "sft.jsonl"),
        "parent_run_id": "1" * 32,
    }
    key = sft_key(None, inputs, {})
    # another pipeline run, another folder, same content: same key
    assert (
        sft_key(None, {**inputs, "parent_run_id": "2" * 32, "sft_path": str(tmp_path / "b" / "sft.jsonl")}, {}) == key
    )
    # a PPO option does not touch SFT's key; an SFT option, the seed or the data content does
    assert sft_key(None, {**inputs, "cfg": load_config(None, ["ppo.steps=7"])}, {}) == key
    assert sft_key(None, {**inputs, "cfg": load_config(None, ["sft.max_steps=7"])}, {}) != key
    assert sft_key(None, {**inputs, "cfg": load_config(None, ["seed=1"])}, {}) != key
    (tmp_path / "b" / "sft.jsonl").write_text('{"prompt": "Hi", "completion": "Hello!"}\n')
    assert sft_key(None, {**inputs, "sft_path": str(tmp_path / "b" / "sft.jsonl")}, {}) != key
    # downstream stages key on the upstream checkpoint reference
    reward_key = StageCache(stage="reward").compute_key
    r_inputs = {"cfg": cfg, "sft": Checkpoint("a" * 32, "file:///x/a"), "preferences_path": "p", "heldout_path": "h"}
    assert reward_key(None, r_inputs, {}) != reward_key(
        None, {**r_inputs, "sft": Checkpoint("b" * 32, "file:///x/b")}, {}
    )


def test_editing_a_module_a_stage_imports_invalidates_only_that_stage(tmp_path, monkeypatch) -> None:
    import shutil

    from tasks import caching

    for package in caching.PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(caching, "ROOT", tmp_path)
    before = {stage: caching.code_fingerprint(f"tasks.{stage}") for stage in ("sft", "ppo")}
    # rlhf/infra/distributed.py is imported by tasks/sft.py only through tasks/common.py
    assert tmp_path / "rlhf" / "infra" / "distributed.py" in caching.import_closure("tasks.sft")
    with (tmp_path / "rlhf" / "infra" / "distributed.py").open("a") as f:
        f.write("\n# an edit\n")
    assert caching.code_fingerprint("tasks.sft") != before["sft"]
    # the drift statistics are outside PPO's closure: editing them leaves PPO's key alone
    with (tmp_path / "rlhf" / "drift" / "stats.py").open("a") as f:
        f.write("\n# an edit\n")
    after_ppo = caching.code_fingerprint("tasks.ppo")
    assert tmp_path / "rlhf" / "drift" / "stats.py" not in caching.import_closure("tasks.ppo")
    assert after_ppo != before["ppo"]  # (distributed.py is in PPO's closure too)
    (tmp_path / "rlhf" / "drift" / "stats.py").write_text(
        (ROOT / "rlhf" / "drift" / "stats.py").read_text() + "\n# again\n"
    )
    assert caching.code_fingerprint("tasks.ppo") == after_ppo


def test_cached_results_pointing_at_missing_runs_or_files_are_not_used(shared_store, tmp_path) -> None:
    from rlhf.infra.tracking import log_checkpoint
    from tasks.caching import missing_references

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with mlflow.start_run() as run:
        uri = log_checkpoint(folder, "checkpoint")
    good = Checkpoint(run.info.run_id, uri)
    assert missing_references({"sft": good, "path": str(folder / "config.json")}) == []
    gone = Checkpoint("f" * 32, uri.replace(run.info.run_id, "f" * 32))
    assert missing_references({"sft": gone, "path": str(tmp_path / "deleted.jsonl")}) == [
        f"MLflow run {'f' * 32}",
        str(tmp_path / "deleted.jsonl"),
    ]
    MlflowClient().delete_run(run.info.run_id)
    assert missing_references(good) == [f"MLflow run {run.info.run_id}"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # without the time limit the stage would wait on the rendezvous forever
def test_a_hung_stage_is_stopped_at_its_time_limit_naming_the_setting(prefect_harness, tmp_path, monkeypatch) -> None:
    """A training stage launched in two processes whose DDP rendezvous never completes (rank 1 never
    joins) fails at timeouts.<stage>_s: not retried, the error names the setting, and torchrun and
    both workers are gone.

    pytest-timeout's SIGALRM handler makes Prefect enforce the limit from a watcher thread, by an
    exception raised between two Python instructions, as for a task off the main thread: the harder
    path, which a blocking wait on the launcher's output would hold off."""
    from prefect import flow, task

    import tasks.launch as launch
    from tasks.caching import call_stage
    from tasks.common import RETRY_ON_TRACKING_ERROR, SFT, StageTimedOut

    worker = tmp_path / "hung_worker.py"
    worker.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "if os.environ['RANK'] == '0':\n"
        "    import torch.distributed as dist\n"
        "    dist.init_process_group('gloo')  # waits for rank 1, which never comes\n"
        "time.sleep(600)\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    port = launch.free_port()
    monkeypatch.setattr(launch, "launch_command", lambda *a: [*torchrun, "--master_port", str(port), str(worker)])

    @task(name=SFT, **RETRY_ON_TRACKING_ERROR)  # the stage's name and retry options; its body launches
    def hung_sft(config):
        return launch.launch_stage(SFT, config, None, {})

    @flow
    def one_stage():
        return call_stage(hung_sft, load_config(None, ["timeouts.sft_s=20"]))  # time for torchrun and both workers

    with pytest.raises(StageTimedOut, match=r"timeouts\.sft_s \(20 s\).*--set timeouts\.sft_s=SECONDS"):
        one_stage()
    pids = [int((tmp_path / f"rank{rank}").read_text()) for rank in (0, 1)]  # both workers had started
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.5)  # torchrun passes the SIGTERM on; its workers may still be exiting
    assert not any(_alive(pid) for pid in pids), "a training process outlived its stage"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited worker of an exited torchrun may linger as a zombie until init reaps it
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_every_pipeline_stage_has_a_time_limit() -> None:
    from rlhf.config import PipelineConfig
    from tasks.common import BASELINE, DPO, EVALUATE, GRPO, PPO, REGISTER, REWARD, RLOO, SFT, VALIDATE

    limits = PipelineConfig().timeouts.model_dump()
    stages = (VALIDATE, SFT, REWARD, PPO, DPO, RLOO, GRPO, EVALUATE, REGISTER, BASELINE)
    assert set(limits) == {f"{stage}_s" for stage in stages}
    assert min(limits.values()) >= 3600  # generous: a healthy stage never meets them
    # A time limit changes no result: the registry's config hash (version reuse) ignores it.
    from tasks.common import config_hash

    assert config_hash(load_config(None, ["timeouts.ppo_s=5"])) == config_hash(PipelineConfig())
    assert config_hash(load_config(None, ["ppo.steps=5"])) != config_hash(PipelineConfig())


# ======================================================================== slow: PPO under faults
SMALL_PPO = [
    "ppo.batch_size=8",
    "ppo.mini_batch_size=4",
    "ppo.max_new_tokens=16",
    "ppo.kl_horizon=8",
    "ppo.sample_every=100",
]


@pytest.fixture(scope="module")
def micro_stack(tmp_path_factory):
    """SFT and reward checkpoints after 2 steps each: enough for fault tests, which need no learning.

    (conftest's tiny_stack trains 120 + 160 steps, for tests that check learning.)
    """
    import types

    from rlhf.builtin.model import resolve_base_model
    from rlhf.builtin.task import resolve_data_paths
    from rlhf.infra.tracking import setup_experiment
    from tasks.reward import run_reward
    from tasks.sft import run_sft

    root = tmp_path_factory.mktemp("micro_stack")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config(
            None,
            [
                "sft.max_steps=2",
                "sft.batch_size=8",
                "reward.max_steps=2",
                "reward.batch_size=8",
                "reward.max_heldout_pairs=50",
            ],
        )
        paths = resolve_data_paths(cfg.data, root, cfg.seed)
        base = resolve_base_model(cfg.model.base_model, root / "base-models", cfg.seed)
        with mlflow.start_run(experiment_id=setup_experiment("micro-stack")) as parent:
            sft = run_sft(cfg, base, paths["sft"], parent.info.run_id)
            reward = run_reward(cfg, sft, paths["preferences"], paths["preferences_heldout"], parent.info.run_id)
    mlflow.set_tracking_uri(None)
    return types.SimpleNamespace(paths=paths, sft=sft, reward=reward)


def ppo_config(tmp_path: Path, *overrides: str):
    return load_config(None, [*SMALL_PPO, f"output_dir={tmp_path / 'outputs'}", *overrides])


def metric_steps(run_id: str, key: str = "objective/kl") -> list[int]:
    """The steps at which a run logged `key`, in logging order (repeats would show)."""
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


@pytest.mark.slow
def test_corrupted_checkpoint_is_refused_and_the_previous_good_one_used(micro_stack, mlflow_store, tmp_path) -> None:
    from tasks.ppo import run_ppo

    cfg = ppo_config(tmp_path, "ppo.steps=4", "ppo.checkpoint_every=2")
    with mlflow.start_run() as parent:
        first = run_ppo(cfg, micro_stack.sft, micro_stack.reward, micro_stack.paths["prompts"], parent.info.run_id)
        assert sorted(first.checkpoints) == [0, 2, 4]
        # 1. truncate the latest checkpoint's weights in the artifact store
        weights = artifact_path(first.checkpoints[4]) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        # 2. asked for that checkpoint by URI: refused, naming the file and the fix
        with pytest.raises(CheckpointCorrupted, match=r"model.safetensors .* truncated or changed.*earlier checkpoint"):
            run_ppo(
                cfg,
                micro_stack.sft,
                micro_stack.reward,
                micro_stack.paths["prompts"],
                parent.info.run_id,
                resume_from=first.checkpoints[4],
            )
        # 3. asked for the run: step 4 refused, step 2 used, steps 3..6 redone
        longer = ppo_config(tmp_path, "ppo.steps=6", "ppo.checkpoint_every=2")
        resumed = run_ppo(
            longer,
            micro_stack.sft,
            micro_stack.reward,
            micro_stack.paths["prompts"],
            parent.info.run_id,
            resume_from=first.final.run_id,
        )
    tags = MlflowClient().get_run(resumed.final.run_id).data.tags
    assert tags["ppo.resumed_at_step"] == "2"
    assert tags["ppo.corrupt_checkpoints_skipped"] == first.checkpoints[4]
    assert metric_steps(resumed.final.run_id) == [1, 2, 3, 4, 5, 6]
    before = {m.step: m.value for m in MlflowClient().get_metric_history(first.final.run_id, "objective/kl")}
    after = {m.step: m.value for m in MlflowClient().get_metric_history(resumed.final.run_id, "objective/kl")}
    assert after[1] == before[1] and after[2] == before[2]  # copied from the source run up to the checkpoint
    assert sorted(resumed.checkpoints) == [0, 2, 4, 6] and resumed.checkpoints[4] != first.checkpoints[4]


@pytest.mark.slow
def test_two_live_runs_with_the_same_inputs_keep_their_own_local_checkpoints(
    micro_stack, mlflow_store, tmp_path, monkeypatch
) -> None:
    """Run B starts (same inputs) while run A is uploading checkpoint 2: B neither resumes from A's
    half-uploaded checkpoint nor deletes it, and A's upload then succeeds."""
    import rlhf.ppo.resume as resume
    import tasks.ppo as ppo_stage

    real_log_checkpoint, seen = resume.log_checkpoint, {}
    cfg = ppo_config(tmp_path, "ppo.steps=2", "ppo.checkpoint_every=2")
    args = (micro_stack.sft, micro_stack.reward, micro_stack.paths["prompts"])

    def run_b_during_a_upload(local, artifact_path):
        if artifact_path.endswith("step_00002") and "a_folder" not in seen:
            write_manifest(local)  # A's checkpoint is complete on disk, its upload under way
            seen["a_folder"] = Path(local)
            # B in its own thread (MLflow's active run is per thread), as a second pipeline would run it
            thread = threading.Thread(target=lambda: seen.update(b=ppo_stage.run_ppo(cfg, *args, seen["parent"])))
            thread.start()
            thread.join()
            assert Path(local).is_dir(), "run B deleted run A's checkpoint folder"
        return real_log_checkpoint(local, artifact_path)

    monkeypatch.setattr(resume, "log_checkpoint", run_b_during_a_upload)
    with mlflow.start_run() as parent:
        seen["parent"] = parent.info.run_id
        a = ppo_stage.run_ppo(cfg, *args, parent.info.run_id)
    b = seen["b"]
    client = MlflowClient()
    assert "ppo.resumed_from_checkpoint" not in client.get_run(b.final.run_id).data.tags  # B trained afresh
    assert (
        sorted(resume.logged_checkpoints(a.final.run_id)) == sorted(resume.logged_checkpoints(b.final.run_id)) == [0, 2]
    )
    assert a.final.run_id in seen["a_folder"].parts  # each run writes under its own folder
    assert not any((tmp_path / "outputs" / "ppo-checkpoints").rglob("step_*"))


@pytest.mark.slow
def test_lost_tracking_connection_is_retried_and_the_unlogged_checkpoint_kept(
    micro_stack, mlflow_store, prefect_harness, tmp_path, monkeypatch
) -> None:
    from prefect import flow
    from prefect.cache_policies import NO_CACHE

    import rlhf.ppo.resume as ppo_resume
    import tasks.ppo as ppo_stage

    real_log_checkpoint, failures = ppo_resume.log_checkpoint, []

    def connection_lost_at_step_4(local, artifact_path):
        if artifact_path.endswith("step_00004") and not failures:
            write_manifest(local)  # as log_checkpoint does before uploading
            failures.append(sorted(p.name for p in Path(local).iterdir()))
            raise MlflowException(
                "API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts failed with exception "
                "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded (Connection refused)"
            )
        return real_log_checkpoint(local, artifact_path)

    monkeypatch.setattr(ppo_resume, "log_checkpoint", connection_lost_at_step_4)
    cfg = ppo_config(tmp_path, "ppo.steps=6", "ppo.checkpoint_every=2")
    ppo_no_wait = ppo_stage.ppo_task.with_options(retry_delay_seconds=0, cache_policy=NO_CACHE, persist_result=False)

    @flow
    def ppo_only(parent_run_id: str):
        return ppo_no_wait(cfg, micro_stack.sft, micro_stack.reward, micro_stack.paths["prompts"], parent_run_id)

    with mlflow.start_run() as parent:
        result = ppo_only(parent.info.run_id)

    # 1. The first attempt failed uploading checkpoint 4, which stayed on the local disk.
    assert len(failures) == 1 and MANIFEST in failures[0]
    client = MlflowClient()
    runs = client.search_runs([parent.info.experiment_id], "tags.`rlhf.stage` = 'ppo'", order_by=["start_time ASC"])
    first, retried = runs
    assert first.info.status == "FAILED" and retried.info.run_id == result.final.run_id
    assert sorted(ppo_resume.logged_checkpoints(first.info.run_id)) == [0, 2]
    # 2. Prefect's retry resumed from that local checkpoint, logged it into its own run and went on.
    assert retried.data.tags["ppo.resumed_at_step"] == "4"
    assert retried.info.run_id in retried.data.tags["ppo.resumed_from_checkpoint"]
    assert sorted(ppo_resume.logged_checkpoints(retried.info.run_id)) == [4, 6]
    assert sorted(result.checkpoints) == [0, 2, 4, 6]
    assert metric_steps(result.final.run_id) == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing twice
    assert not (tmp_path / "outputs" / "ppo-checkpoints").exists() or not any(
        (tmp_path / "outputs" / "ppo-checkpoints").rglob("step_*")
    )


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with its state under root; returns once /health answers."""
    import requests

    log = open(root / f"mlflow-server-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=root,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.5)
    stop_process_group(proc)
    raise RuntimeError("mlflow server did not answer /health within 120 s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (the server and its workers) and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_tracking_server_outage_mid_run_is_ridden_out(micro_stack, tmp_path, monkeypatch) -> None:
    from rlhf.ppo.resume import logged_checkpoints
    from rlhf.ppo.trainer import PPOTrainer
    from tasks.ppo import run_ppo

    port = free_port()
    servers = [start_mlflow_server(tmp_path, port)]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow's own HTTP retries (urllib3): 7 retries, backoff 1, 2, 4, ... s (the default factor is 2)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    mlflow.set_tracking_uri(uri)
    real_step, outage = PPOTrainer.step, {}

    def restart_later() -> None:
        time.sleep(3)
        servers.append(start_mlflow_server(tmp_path, port))
        outage["up"] = time.monotonic()

    def server_dies_after_step_2(self):
        if self.step_count == 2 and "down" not in outage:  # checkpoint 2 is logged; the server crashes
            stop_process_group(servers[0])
            outage["down"] = time.monotonic()
            threading.Thread(target=restart_later, daemon=True).start()
        return real_step(self)

    monkeypatch.setattr(PPOTrainer, "step", server_dies_after_step_2)
    try:
        cfg = ppo_config(tmp_path, "ppo.steps=4", "ppo.checkpoint_every=2")
        with mlflow.start_run() as parent:
            result = run_ppo(cfg, micro_stack.sft, micro_stack.reward, micro_stack.paths["prompts"], parent.info.run_id)
        finished = time.monotonic()
        assert "up" in outage, "the server was not restarted"
        print(
            f"tracking server down for {outage['up'] - outage['down']:.1f} s; stage finished "
            f"{finished - outage['up']:.1f} s after it came back"
        )
        assert MlflowClient().get_run(result.final.run_id).info.status == "FINISHED"
        assert metric_steps(result.final.run_id) == [1, 2, 3, 4]
        assert sorted(logged_checkpoints(result.final.run_id)) == [0, 2, 4]
        assert not any((tmp_path / "outputs").rglob("step_*"))  # every checkpoint reached the server
    finally:
        for server in servers:
            stop_process_group(server)
        mlflow.set_tracking_uri(None)


# ================================================================= slow: the whole pipeline
TINY_PIPELINE = [
    "sft.max_steps=3",
    "sft.batch_size=8",
    "reward.max_steps=3",
    "reward.batch_size=8",
    "reward.max_heldout_pairs=50",
    "ppo.steps=4",
    "ppo.batch_size=4",
    "ppo.mini_batch_size=2",
    "ppo.max_new_tokens=8",
    "ppo.kl_horizon=4",
    "ppo.checkpoint_every=2",
    "ppo.sample_every=2",
    "eval.max_new_tokens=8",
    "eval.samples_per_prompt=1",
    "data.max_heldout_prompts=8",
    "baseline.max_prompts=8",
    "baseline.embedding_rows=4",
    "baseline.responses=4",
    "baseline.batch_size=4",
]
PIPELINE_SCRIPT = """
import json, os, sys, time
from rlhf.config import load_config
overrides, block_file = json.loads(sys.argv[1]), sys.argv[2]
if block_file:  # stand still in PPO step 3, after checkpoint 2 was logged, until killed
    from rlhf.ppo.trainer import PPOTrainer
    real_step = PPOTrainer.step
    def step(self):
        if self.step_count == 3:
            open(block_file, "w").write(str(os.getpid()))
            time.sleep(600)
        return real_step(self)
    PPOTrainer.step = step
from flows.pipeline import rlhf_pipeline
result = rlhf_pipeline(load_config(None, overrides))
print("RESULT " + json.dumps({"parent": result.parent_run_id, "model_uri": result.model_uri}))
"""


def start_pipeline(root: Path, env: dict[str, str], overrides: list[str], block_file: str = "") -> subprocess.Popen:
    """The pipeline in its own process (and process group), in folder root."""
    return subprocess.Popen(
        [sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(overrides), block_file],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def pipeline_result(proc: subprocess.Popen, timeout_s: float) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def stage_children(parent_run_id: str) -> dict[str, list]:
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        out.setdefault(run.data.tags["rlhf.stage"], []).append(run)
    return out


@pytest.mark.slow
def test_pipeline_killed_in_ppo_resumes_caches_and_runs_concurrently(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import rlhf_pipeline

    storage = tmp_path / "prefect-results"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_store,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOCAL_STORAGE_PATH": str(storage),
        "PYTHONPATH": str(ROOT),
    }
    client = MlflowClient()

    # 1. Run A: SIGKILL (process group) while PPO is in step 3; checkpoint 2 is logged.
    marker = tmp_path / "in-ppo-step-3"
    proc = start_pipeline(tmp_path, env, TINY_PIPELINE, str(marker))
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), proc.communicate(timeout=5)[0][-4000:] if proc.poll() is not None else "timeout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    experiment_id = client.get_experiment_by_name("rlhf").experiment_id
    (killed_parent,) = client.search_runs([experiment_id], "tags.`prefect.flow_run_id` != ''")
    killed = {stage: runs[0] for stage, runs in stage_children(killed_parent.info.run_id).items()}
    assert killed["ppo"].info.status == "RUNNING" and metric_steps(killed["ppo"].info.run_id) == [1, 2, 3]
    assert client.search_model_versions("name = 'rlhf-policy'") == []

    # 2. Run B, same inputs: validate, SFT and reward from the cache; PPO continues A's run from step 2.
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        resumed = rlhf_pipeline(load_config(None, TINY_PIPELINE))
    b_parent = client.get_run(resumed.parent_run_id)
    assert b_parent.data.tags["rlhf.cached_stages"] == "validate,sft,reward"
    b_children = stage_children(resumed.parent_run_id)
    assert set(b_children) == {"ppo", "evaluate", "register"}  # no second SFT or reward run
    ppo_b = b_children["ppo"][0]
    assert ppo_b.data.tags["ppo.resumed_from_run"] == killed["ppo"].info.run_id
    assert ppo_b.data.tags["ppo.resumed_at_step"] == "2"
    assert ppo_b.data.params["sft_run_id"] == killed["sft"].info.run_id
    assert metric_steps(ppo_b.info.run_id) == [1, 2, 3, 4]  # steps 1-2 copied, 3-4 trained: each once
    killed_kl = {m.step: m.value for m in client.get_metric_history(killed["ppo"].info.run_id, "objective/kl")}
    resumed_kl = {m.step: m.value for m in client.get_metric_history(ppo_b.info.run_id, "objective/kl")}
    assert resumed_kl[1] == killed_kl[1] and resumed_kl[2] == killed_kl[2]
    assert client.get_run(killed["ppo"].info.run_id).info.status == "KILLED"
    assert client.get_run(killed_parent.info.run_id).info.status == "KILLED"
    versions = client.search_model_versions("name = 'rlhf-policy'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["validation.success"] == "true"

    # 3. Run C, unchanged: every training stage cached, the same version returned, none added.
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        again = rlhf_pipeline(load_config(None, TINY_PIPELINE))
    assert client.get_run(again.parent_run_id).data.tags["rlhf.cached_stages"] == "validate,sft,reward,ppo"
    assert set(stage_children(again.parent_run_id)) == {"evaluate"}
    assert again.model_uri == "models:/rlhf-policy/1"
    assert len(client.search_model_versions("name = 'rlhf-policy'")) == 1

    # 4. Runs D and E at once, each with a changed PPO input: SFT/reward cached, PPO re-run, two new versions.
    runs = {lr: start_pipeline(tmp_path, env, [*TINY_PIPELINE, f"ppo.learning_rate={lr}"]) for lr in ("1e-4", "2e-4")}
    try:
        outcomes = {lr: pipeline_result(proc, 600) for lr, proc in runs.items()}
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=60)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'rlhf-policy'")}
    assert sorted(versions) == ["1", "2", "3"]
    assert sorted(o["model_uri"] for o in outcomes.values()) == ["models:/rlhf-policy/2", "models:/rlhf-policy/3"]
    for lr, outcome in outcomes.items():
        parent = client.get_run(outcome["parent"])
        assert parent.data.tags["rlhf.cached_stages"] == "validate,sft,reward"
        children = stage_children(outcome["parent"])
        ppo_run = children["ppo"][0]
        assert (
            float(ppo_run.data.params["ppo.learning_rate"]) == float(lr)
            and "ppo.resumed_from_run" not in ppo_run.data.tags
        )
        version = versions[outcome["model_uri"].rsplit("/", 1)[1]]
        # no crossed artifacts: the version's lineage, run and weights are this pipeline run's own
        assert version.tags["lineage.pipeline_run_id"] == outcome["parent"]
        assert version.tags["lineage.ppo_run_id"] == ppo_run.info.run_id
        assert ppo_run.info.run_id in version.tags["lineage.checkpoint_uri"]
        assert version.run_id == children["register"][0].info.run_id
        served = Path(mlflow.artifacts.download_artifacts(f"{outcome['model_uri']}", dst_path=str(tmp_path / f"v{lr}")))
        checkpoint = artifact_path(version.tags["lineage.checkpoint_uri"])
        assert sha256_file(next(served.rglob("model.safetensors"))) == sha256_file(checkpoint / "model.safetensors")
