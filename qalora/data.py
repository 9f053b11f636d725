"""Training and calibration data: Alpaca records -> tokenized examples; text -> calibration windows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

ALPACA_KEYS = ("instruction", "input", "output")
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The standard Alpaca prompt; the response follows it directly."""
    template = PROMPT_WITH_INPUT if input.strip() else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids [1, T] of the Alpaca-wrapped ``prompt`` (the check's and the exports' comparisons: an
    instruction-tuned model answers it, rather than ending the turn at once); T >= 1 or ValueError.

    A tokenizer that drops every character it lacks (no unk token, no byte fallback) can return no
    ids at all, and the models cannot run on T = 0 ("cannot reshape tensor of 0 elements").
    """
    ids = tokenizer(alpaca_prompt(prompt), return_tensors="pt").input_ids
    if ids.numel() == 0:
        source = getattr(tokenizer, "name_or_path", "") or "not loaded from a folder"
        raise ValueError(f"check prompt {prompt!r} tokenizes to zero tokens with the tokenizer "
                         f"{type(tokenizer).__name__} ({source}): set check.prompts to text it can encode")
    return ids


def _read_records(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty: expected Alpaca records with keys {list(ALPACA_KEYS)}")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a list of Alpaca records or .jsonl") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: top level must be a list of Alpaca records, got {type(data).__name__}")
    return data


def load_alpaca(path: str | Path) -> list[dict[str, str]]:
    """Validated Alpaca records. Every record needs string ``instruction`` and ``output``;
    ``input`` is optional (empty string). Errors name the file and record index."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path} has no records: expected Alpaca records with keys {list(ALPACA_KEYS)}")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is {type(rec).__name__}, expected an object with keys {list(ALPACA_KEYS)}")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise ValueError(f"{path}: record {i} needs a non-empty string {key!r} (has keys {sorted(rec)})")
        if not isinstance(rec.get("input", ""), str):
            raise ValueError(f"{path}: record {i} field 'input' must be a string")
        out.append({"instruction": rec["instruction"], "input": rec.get("input", ""), "output": rec["output"]})
    return out


@dataclass(frozen=True)
class Example:
    """One tokenized training example: ``input_ids`` [T] and ``labels`` [T] (-100 on the prompt)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def tokenize_alpaca(records: list[dict[str, str]], tokenizer, max_seq_len: int) -> list[Example]:
    """Prompt + response + EOS, truncated to ``max_seq_len``; loss only on response tokens.

    Examples whose prompt alone fills ``max_seq_len`` carry no loss and are dropped.
    """
    eos = tokenizer.eos_token_id
    examples = []
    for rec in records:
        prompt = tokenizer(alpaca_prompt(rec["instruction"], rec["input"]), add_special_tokens=True).input_ids
        response = tokenizer(rec["output"], add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        ids = (prompt + response)[:max_seq_len]
        labels = ([-100] * len(prompt) + response)[:max_seq_len]
        if any(label != -100 for label in labels):
            examples.append(Example(torch.tensor(ids), torch.tensor(labels)))
    if not examples:
        raise ValueError(f"no example has a response token within max_seq_len={max_seq_len}; raise it")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids/attention_mask/labels [B, T]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_texts(path: str | Path) -> list[str]:
    """Plain text (.txt: blank-line separated documents) or .jsonl with a ``text`` field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'text' field")
            texts.append(rec["text"])
    else:
        texts = [t for t in path.read_text(encoding="utf-8").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def calibration_windows(texts: list[str], tokenizer, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """``num_samples`` windows of ``seq_len`` token ids [seq_len], taken in order from the
    concatenated texts (deterministic: no sampling)."""
    ids: list[int] = []
    need = num_samples * seq_len
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {num_samples}x{seq_len}={need}")
    flat = torch.tensor(ids[:need])
    return list(flat.view(num_samples, seq_len))
