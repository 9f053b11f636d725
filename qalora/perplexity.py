"""Perplexity of a causal LM on held-out text, with non-overlapping windows.

Text is tokenized once (no BOS added), cut to ``max_tokens``, and split into consecutive windows
of ``context`` tokens (stride = context, the last partial window dropped); each window is scored
independently and the loss averaged over all predicted tokens: ppl = exp(sum NLL / count).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    context: int = 512,
    max_tokens: int = 40_000,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:max_tokens]
    n_windows = ids.numel() // context
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of context={context}")
    windows = ids[: n_windows * context].view(n_windows, context)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "tokens": float(count), "context": float(context)}
