"""Hostile requests to the served policy end in a RequestError (HTTP 400) naming the limit and the fix.

The pyfunc is loaded in-process on the built-in tiny GPT-2 (context window 256), as
``mlflow models serve`` loads it; tests/stages/test_serving.py serves it over HTTP.
"""

from __future__ import annotations

import types

import pandas as pd
import pytest

from models.serving import PolicyModel, RequestError, serving_limits


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    from rlhf.builtin.model import resolve_base_model

    return resolve_base_model("builtin:tiny-gpt2", tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def served(policy_dir) -> PolicyModel:
    model = PolicyModel()
    model.load_context(types.SimpleNamespace(artifacts={"policy": policy_dir}, model_config={}))
    return model


def ask(model: PolicyModel, prompt: str, **params) -> pd.DataFrame:
    return model.predict(None, pd.DataFrame({"prompt": [prompt]}), params)


def test_limits_come_from_the_checkpoint(served, policy_dir):
    limits = serving_limits(policy_dir)
    assert limits == {"context_window": served.context_window, "max_new_tokens_limit": served.context_window - 1}
    assert served.context_window == 256


def test_a_valid_request_generates(served):
    (response,) = ask(served, "Customer: I forgot my password.\nAgent:", max_new_tokens=8, temperature=0)["response"]
    assert isinstance(response, str)


HOSTILE = [
    (
        "prompt-over-context",
        {"prompt": "Customer: " + "refund " * 400},
        {"max_new_tokens": 48},
        "over this model's context window of 256 tokens. Fix: shorten the prompt to at most 208 tokens",
    ),
    (
        "max-new-tokens-5000",
        {},
        {"max_new_tokens": 5000},
        "params.max_new_tokens=5000 is outside 1..255 (this model's context window is 256 tokens, prompt included). "
        "Fix: ask for at most 255 new tokens",
    ),
    ("max-new-tokens-zero", {}, {"max_new_tokens": 0}, "params.max_new_tokens=0 is outside 1..255"),
    ("max-new-tokens-text", {}, {"max_new_tokens": "lots"}, "is not a number. Fix: send an integer"),
    ("temperature-huge", {}, {"temperature": 1e9}, "params.temperature=1000000000.0 is outside 0..10. Fix:"),
    ("temperature-nan", {}, {"temperature": float("nan")}, "params.temperature=nan is outside 0..10"),
    ("empty-prompt", {"prompt": "   "}, {}, "prompt 0 is '   ', not text. Fix: send a non-empty string"),
    ("raised-limit", {}, {"context_window": 100000}, "params.context_window=100000 differs from this model's"),
]


@pytest.mark.parametrize("name,row,params,expected", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_is_refused_with_the_limit_and_the_fix(served, name, row, params, expected):
    prompt = row.get("prompt", "Customer: hi\nAgent:")
    with pytest.raises(RequestError) as info:
        ask(served, prompt, **params)
    assert expected in info.value.message, info.value.message
    assert isinstance(info.value, ValueError) and info.value.get_http_status_code() == 400


def test_no_prompt_column(served):
    with pytest.raises(RequestError, match="no 'prompt' column"):
        served.predict(None, pd.DataFrame({"text": ["hi"]}), {})


def test_registered_signature_carries_the_limits(policy_dir):
    from rlhf.config import load_config
    from tasks.register import serving_signature_params

    params = serving_signature_params(load_config(None, ["eval.max_new_tokens=32"]), policy_dir)
    assert params == {"max_new_tokens": 32, "temperature": 1.0, "context_window": 256, "max_new_tokens_limit": 255}
