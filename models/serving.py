"""The registered policy as an MLflow pyfunc: prompts in, sampled responses out.

Logged as an MLflow "model from code" (this file is the model's code, no pickle).
Served with ``mlflow models serve -m models:/rlhf-policy@champion``; a request is
``{"dataframe_records": [{"prompt": "Customer: ...\\nAgent:"}]}`` and optional
``params`` ``max_new_tokens`` and ``temperature`` (0 means greedy).
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model


class PolicyModel(mlflow.pyfunc.PythonModel):
    """Generates a response for each prompt with the policy checkpoint in artifacts['policy']."""

    def load_context(self, context) -> None:
        from models.loading import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(context.artifacts["policy"])
        self.model = load_causal_lm(context.artifacts["policy"]).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        params = params or {}
        prompts = [str(p) for p in model_input["prompt"]]
        temperature = float(params.get("temperature", 1.0))
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0 if temperature > 0 else None,
                max_new_tokens=int(params.get("max_new_tokens", 48)),
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        responses = self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        return pd.DataFrame({"response": responses})


set_model(PolicyModel())
