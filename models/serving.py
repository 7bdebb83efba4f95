"""The registered policy as an MLflow pyfunc: prompts in, sampled responses out.

Logged as an MLflow "model from code" (this file is the model's code, no pickle).
Served with ``mlflow models serve -m models:/rlhf-policy@champion``; a request is
``{"dataframe_records": [{"prompt": "Customer: ...\\nAgent:"}]}`` and optional
``params`` ``max_new_tokens`` and ``temperature`` (0 means greedy).

Every request is checked before generation: a prompt that does not leave room for
``max_new_tokens`` in the model's context window, a ``max_new_tokens`` over the
model's limit, a temperature outside 0..10, or an empty prompt is refused with a
``RequestError`` (HTTP 400 from ``mlflow models serve``) that names the limit and the
fix, instead of an ``IndexError`` deep in the position embeddings. The limits
(``context_window``, ``max_new_tokens_limit``) are in the model signature's params
(``serving_limits``), so a client sees them; they are fixed by the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_TEMPERATURE = 10.0
LIMIT_PARAMS = ("context_window", "max_new_tokens_limit")


class RequestError(MlflowException, ValueError):
    """A request the client must fix (HTTP 400 when served); the message names the limit and the fix."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def context_window(config: Any) -> int:
    """Longest sequence (prompt + response tokens) the model's position embeddings cover."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"the model config ({type(config).__name__}) names no context window (max_position_embeddings or "
        "n_positions): set one in its config.json"
    )


def serving_limits(checkpoint_dir: str | Path, trust_remote_code: bool = False) -> dict[str, int]:
    """The limits a request is checked against, from the checkpoint's config.json (for the signature params)."""
    from transformers import AutoConfig

    window = context_window(AutoConfig.from_pretrained(str(checkpoint_dir), trust_remote_code=trust_remote_code))
    return {"context_window": window, "max_new_tokens_limit": window - 1}  # at least one prompt token


class PolicyModel(mlflow.pyfunc.PythonModel):
    """Generates a response for each prompt with the policy checkpoint in artifacts['policy']."""

    def load_context(self, context) -> None:
        from models.loading import load_causal_lm, load_tokenizer

        trust_remote_code = bool((getattr(context, "model_config", None) or {}).get("trust_remote_code", False))
        self.tokenizer = load_tokenizer(context.artifacts["policy"], trust_remote_code)
        self.model = load_causal_lm(context.artifacts["policy"], trust_remote_code=trust_remote_code).eval()
        self.context_window = context_window(self.model.config)
        self.max_new_tokens_limit = self.context_window - 1

    def check_request(self, prompts: list[Any], params: dict) -> tuple[list[str], int, float]:
        """(prompts, max_new_tokens, temperature) of a valid request; RequestError naming the limit otherwise."""
        for key in LIMIT_PARAMS:
            if key in params and params[key] is not None and int(params[key]) != getattr(self, key):
                raise RequestError(
                    f"params.{key}={params[key]} differs from this model's {key} ({getattr(self, key)}), which is "
                    f"fixed by the model. Fix: leave {key} out of the request"
                )
        max_new_tokens = params.get("max_new_tokens", 48)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, float)):
            raise RequestError(f"params.max_new_tokens={max_new_tokens!r} is not a number. Fix: send an integer")
        if max_new_tokens != int(max_new_tokens) or not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise RequestError(
                f"params.max_new_tokens={max_new_tokens} is outside 1..{self.max_new_tokens_limit} (this model's "
                f"context window is {self.context_window} tokens, prompt included). Fix: ask for at most "
                f"{self.max_new_tokens_limit} new tokens"
            )
        temperature = params.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise RequestError(f"params.temperature={temperature!r} is not a number. Fix: send a number in 0..10")
        if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
            raise RequestError(
                f"params.temperature={temperature} is outside 0..{MAX_TEMPERATURE:g}. Fix: send 0 for greedy "
                "decoding or a temperature such as 0.7 or 1.0"
            )
        texts = []
        room = self.context_window - int(max_new_tokens)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError(f"prompt {i} is {prompt!r}, not text. Fix: send a non-empty string in 'prompt'")
            n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n > room:
                raise RequestError(
                    f"prompt {i} is {n} tokens; with max_new_tokens={int(max_new_tokens)} that is "
                    f"{n + int(max_new_tokens)}, over this model's context window of {self.context_window} tokens. "
                    f"Fix: shorten the prompt to at most {room} tokens, or lower max_new_tokens"
                )
            texts.append(prompt)
        return texts, int(max_new_tokens), float(temperature)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        if "prompt" not in model_input.columns:
            raise RequestError(
                f"the request has no 'prompt' column (it has {list(model_input.columns)}). "
                'Fix: send {"dataframe_records": [{"prompt": "..."}]}'
            )
        prompts, max_new_tokens, temperature = self.check_request(list(model_input["prompt"]), params or {})
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0 if temperature > 0 else None,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        responses = self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        return pd.DataFrame({"response": responses})


set_model(PolicyModel())
