"""Perplexity of a causal LM on held-out text, with a stated context length and stride.

The text is tokenized once (no BOS added) and cut to ``max_tokens``. Windows of ``context`` tokens
start every ``stride`` tokens (``stride`` defaults to ``context``: consecutive non-overlapping
windows); a window is used only when it fits entirely (the last partial window is dropped). The first
window scores all its ``context - 1`` predictions; every later window scores only its last ``stride``
tokens, the ones no earlier window scored, each seeing at least ``context - stride`` tokens of left
context (HF's sliding-window recipe). ppl = exp(sum NLL / scored tokens).

``stride == context`` is the cheap, standard setting (every token after the first of each window
scored once, with 0..context-1 tokens of context); a smaller stride gives every scored token more
context and a lower perplexity at ``context / stride`` times the compute.
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
    max_tokens: int | None = 40_000,
    batch_size: int = 4,
    progress: bool = True,
    stride: int | None = None,
) -> dict[str, float]:
    """Returns ``{"perplexity", "nll", "tokens" (scored), "context", "stride", "windows", "text_tokens"}``."""
    stride = context if stride is None else stride
    if context < 2:
        raise ValueError(f"context={context}: need at least 2 tokens per window")
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < context:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of context={context}")
    starts = list(range(0, ids.numel() - context + 1, stride))
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(starts), batch_size), desc="perplexity", disable=not progress):
        chunk = starts[b : b + batch_size]
        batch = torch.stack([ids[s : s + context] for s in chunk]).to(device)
        logits = model(batch).logits[:, :-1].float()
        targets = batch[:, 1:].clone()
        # Later windows score only the last `stride` tokens; earlier positions were scored before.
        masked = context - 1 - stride  # > 0 only when windows overlap
        if masked > 0:
            for row, s in enumerate(chunk):
                if s > 0:
                    targets[row, :masked] = -100
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100
        )
        nll += loss.item()
        count += int((targets != -100).sum())
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": float(count),
        "context": float(context),
        "stride": float(stride),
        "windows": float(len(starts)),
        "text_tokens": float(ids.numel()),
    }
