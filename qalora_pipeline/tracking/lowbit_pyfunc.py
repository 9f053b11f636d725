"""MLflow pyfunc model serving a merged low-bit qalora folder, logged as "models from code".

MLflow stores this file as the model's code and the merged folder as the artifact ``lowbit_model``;
nothing of ours is pickled. ``load_context`` rebuilds the model with
``qalora.checkpoint.load_lowbit_model`` (safetensors weights, sha256-verified against the folder's
manifest), so predictions come from the low-bit codes, scales and merged float zeros themselves.

    model = mlflow.pyfunc.load_model("models:/qalora-smollm2-135m@champion")
    model.predict(["Give three tips for staying healthy."], params={"max_new_tokens": 32})

Input: a list of prompts, a single string, a DataFrame with a ``prompt`` column (else its first
column), or ``{"prompt": [...]}``. Output: a list of generated continuations (greedy decoding).
Params: ``max_new_tokens`` (default 32), ``prompt_format`` ``"alpaca"`` (default: the instruction
template the adapter was tuned with) or ``"raw"``. ``model_config`` (set when logging):
``device`` ``"cpu"`` (default) / ``"cuda"`` / ``"auto"``.

``identity`` (on the unwrapped model: ``load_model(uri).unwrap_python_model().identity``) is
``{"weights_sha256"}`` of the ``model.safetensors`` actually loaded: compare it with the registry's
``weights_sha256`` version tag to check which version an alias serves.

The module imports nothing heavy at import time: MLflow executes it when logging the model.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "lowbit_model"
DEFAULT_MAX_NEW_TOKENS = 32
PROMPT_FORMATS = ("alpaca", "raw")


def prompts_from_input(model_input: Any) -> list[str]:
    """Normalise the accepted input shapes to a list of prompt strings."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise ValueError(f"dict input needs a 'prompt' key, got keys {sorted(model_input)}")
        values = model_input["prompt"]
        values = [values] if isinstance(values, str) else list(values)
    else:
        try:
            values = list(model_input)
        except TypeError:
            raise ValueError(f"unsupported input {type(model_input).__name__}: pass prompts as a list of strings") from None
    # MLflow's schema enforcement turns {"prompt": [...]} into a one-row frame whose cell is the list.
    values = [x for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"every prompt must be a string; got {sorted(set(bad))}")
    return values


class LowBitTextModel(PythonModel):
    """Greedy text generation from a merged low-bit model folder."""

    def load_context(self, context) -> None:
        import torch

        from qalora.checkpoint import load_lowbit_model
        from qalora.device import resolve_device
        from qalora.manifest import sha256_file

        config = getattr(context, "model_config", None) or {}
        device = resolve_device(config.get("device", "cpu"), key="model_config.device")
        folder = context.artifacts[ARTIFACT_KEY]
        # Hash the file that is served (not a recorded value), so a wrong artifact cannot pass for the right one.
        self.identity = {"weights_sha256": sha256_file(f"{folder}/model.safetensors")}
        self.model, self.tokenizer, self.quant = load_lowbit_model(folder, dtype=torch.float32, device=device)
        if self.tokenizer is None:
            raise ValueError(f"{folder} has no tokenizer: the low-bit folder must be self-contained to serve text")
        self.device = device

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Greedy continuations. Through pyfunc, MLflow's schema enforcement hands over a DataFrame (one
        string column); called directly, a list of prompts or a string works too. The ``pd.DataFrame``
        hint tells MLflow to leave the data as it is (no type-hint conversion)."""
        import torch

        from qalora.data import alpaca_prompt

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        prompt_format = params.get("prompt_format") or "alpaca"
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r}; valid: {list(PROMPT_FORMATS)}")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = []
        with torch.no_grad():
            for prompt in prompts_from_input(model_input):
                text = alpaca_prompt(prompt) if prompt_format == "alpaca" else prompt
                ids = tok(text, return_tensors="pt").input_ids.to(self.device)
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=pad)
                out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def signature():
    """Input: string column ``prompt``; output: string; params ``max_new_tokens``, ``prompt_format``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS),
                            ParamSpec("prompt_format", "string", "alpaca")]),
    )


mlflow.models.set_model(LowBitTextModel())
