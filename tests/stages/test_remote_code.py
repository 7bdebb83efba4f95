"""`model.trust_remote_code` reaches every loader: a checkpoint whose model code ships with it (config.json
``auto_map``) trains PPO, resumes, is monitored and served, not only SFT.

The checkpoint is the built-in tiny GPT-2 re-declared as a custom architecture in a
``modeling_remote.py`` saved next to its weights, which transformers loads only with
``trust_remote_code=True``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

REMOTE_CODE = """
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel


class RemoteConfig(GPT2Config):
    model_type = "rlhf-remote-gpt2"


class RemoteLM(GPT2LMHeadModel):
    config_class = RemoteConfig


class RemoteRM(GPT2ForSequenceClassification):
    config_class = RemoteConfig
"""


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory) -> str:
    from transformers import GPT2Config

    from models.loading import load_causal_lm
    from rlhf.builtin.model import resolve_base_model

    root = tmp_path_factory.mktemp("remote")
    base = resolve_base_model("builtin:tiny-gpt2", root / "base")
    source = root / "modeling_remote.py"
    source.write_text(REMOTE_CODE)
    spec = importlib.util.spec_from_file_location("modeling_remote", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_remote"] = module  # save_pretrained copies the source of the module it finds here
    spec.loader.exec_module(module)
    module.RemoteConfig.register_for_auto_class()
    module.RemoteLM.register_for_auto_class("AutoModelForCausalLM")
    config = module.RemoteConfig(
        **{k: v for k, v in GPT2Config.from_pretrained(base).to_dict().items() if k != "model_type"}
    )
    model = module.RemoteLM(config)
    model.load_state_dict(load_causal_lm(base).state_dict())
    out = root / "checkpoint"
    model.save_pretrained(out)
    del sys.modules["modeling_remote"]  # what loads it later is transformers' copy, with trust_remote_code
    for name in Path(base).iterdir():
        if "token" in name.name or name.name in ("vocab.json", "merges.txt"):
            shutil.copy(name, out)
    config_file = out / "config.json"
    data = json.loads(config_file.read_text())
    data["auto_map"]["AutoModelForSequenceClassification"] = "modeling_remote.RemoteRM"
    config_file.write_text(json.dumps(data))
    return str(out)


def test_the_checkpoint_needs_remote_code(remote_dir):
    from models.loading import load_causal_lm

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(remote_dir)
    assert type(load_causal_lm(remote_dir, trust_remote_code=True)).__name__ == "RemoteLM"


def test_ppo_builds_and_resumes_with_remote_code(remote_dir, monkeypatch, tmp_path):
    import tasks.ppo
    from rlhf.builtin.dataset import write_builtin_dataset
    from rlhf.config import load_config
    from tasks.common import Checkpoint

    monkeypatch.setattr(tasks.ppo, "download", lambda uri, into: Path(uri))
    prompts = str(write_builtin_dataset(tmp_path / "data", 0)["prompts"])
    ckpt = Checkpoint("run", remote_dir)
    small = ["ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.kl_horizon=4"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        tasks.ppo.build_trainer(load_config(None, small), ckpt, ckpt, prompts)
    trainer = tasks.ppo.build_trainer(load_config(None, [*small, "model.trust_remote_code=true"]), ckpt, ckpt, prompts)
    assert type(trainer.policy.lm).__name__ == "RemoteLM"
    trainer.save_checkpoint(tmp_path / "step")
    trainer.load_checkpoint(tmp_path / "step")  # resuming loads the weights with the policy's own class


def test_monitor_loads_the_version_as_it_was_registered(remote_dir, monkeypatch):
    import tasks.monitor
    from rlhf.config import MonitorConfig
    from rlhf.drift.lineage import Lineage

    def lineage(trust: bool) -> Lineage:
        return Lineage("m", "1", "r", "p", {}, remote_dir, remote_dir, remote_dir, "ppo", {}, "runs:/r/baseline", trust)

    monkeypatch.setattr(tasks.monitor, "download", lambda uri, into: Path(uri))
    monkeypatch.setattr(tasks.monitor, "load_baseline", lambda uri: None)
    monkeypatch.setattr(tasks.monitor, "resolve_lineage", lambda *a, **k: lineage(False))
    with pytest.raises(ValueError, match="trust_remote_code"):
        tasks.monitor.load_models(MonitorConfig(), client=object())
    monkeypatch.setattr(tasks.monitor, "resolve_lineage", lambda *a, **k: lineage(True))
    models = tasks.monitor.load_models(MonitorConfig(), client=object())
    assert type(models.policy).__name__ == "RemoteLM" and type(models.reward_model).__name__ == "RemoteRM"


def test_served_model_loads_with_remote_code(remote_dir):
    from models.serving import PolicyModel, serving_limits

    served = PolicyModel()
    with pytest.raises(ValueError, match="trust_remote_code"):
        served.load_context(types.SimpleNamespace(artifacts={"policy": remote_dir}, model_config={}))
    served.load_context(
        types.SimpleNamespace(artifacts={"policy": remote_dir}, model_config={"trust_remote_code": True})
    )
    assert type(served.model).__name__ == "RemoteLM"
    assert serving_limits(remote_dir, trust_remote_code=True)["context_window"] == served.context_window
