"""QA-LoRA tuning over a frozen low-bit base, with exact resume from checkpoints.

Everything a step depends on is either derived from the step number (data order, learning rate)
or saved in the checkpoint (adapter, AdamW moments, torch RNG for dropout), so an interrupted run
resumed from its last checkpoint yields the same adapter bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qalora.adapter import QALoRALinear, adapter_config, adapter_layers, apply_qalora, save_adapter_files
from qalora.checkpoint import load_lowbit_model, model_identity
from qalora.config import TuneParams
from qalora.data import collate, load_alpaca, tokenize_alpaca
from qalora.device import DTYPES, dtype_name, resolve_device
from qalora.lowbit import cache_dequantized_for
from qalora.manifest import (
    atomic_output_dir, check_output_path, read_json, sha256_bytes, sha256_file, write_json_atomic, write_manifest,
)

StepCallback = Callable[[int, dict[str, float]], None]


def learning_rate(step: int, p: TuneParams) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay to 0."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    if p.schedule == "constant":
        return p.lr
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    if p.schedule == "linear":
        return p.lr * (1.0 - progress)
    return p.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class DataOrder:
    """Example indices of micro-batch m: a seeded permutation per epoch, derived, never stored."""

    def __init__(self, n: int, micro_batch: int, seed: int) -> None:
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def micro_batch_indices(self, m: int) -> list[int]:
        positions = range(m * self.micro_batch, (m + 1) * self.micro_batch)
        return [self._perm(p // self.n)[p % self.n] for p in positions]


def resolve_dtype(p: TuneParams, device: torch.device) -> str:
    """``auto``: bf16 on CUDA (autocast, frozen float tensors stored in bf16), fp32 elsewhere
    (the exact CPU path): :func:`qalora.device.dtype_name`."""
    return dtype_name(p.dtype, device)


def set_dequant_cache(model: torch.nn.Module, device: torch.device, mode: str = "auto") -> bool:
    """Cache (or not) every adapted layer's dequantized frozen weight, as
    :func:`qalora.lowbit.cache_dequantized_for` decides for ``device``; returns the choice."""
    cache = cache_dequantized_for(device, mode)
    for layer in adapter_layers(model).values():
        layer.base.cache_dequantized = cache
        layer.base.invalidate_cache()
    return cache


# --- checkpoints: adapter + AdamW state + RNG, all safetensors/JSON (no pickle) ---------------

def _save_checkpoint(folder: Path, model, optimizer, step: int, fingerprint: str, history: list) -> None:
    with atomic_output_dir(folder / f"step-{step:06d}", "tune-checkpoint", marker="trainer_state.json") as tmp:
        params = [p for layer in adapter_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
        index = {id(p): i for i, p in enumerate(params)}
        state = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().clone().contiguous()
                   for i, st in state["state"].items() for k, v in st.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"param.{index[id(p)]}": p.detach().cpu().contiguous() for p in params}, str(tmp / "adapter.safetensors"))
        write_json_atomic(tmp / "trainer_state.json",
                          {"step": step, "fingerprint": fingerprint, "param_groups": state["param_groups"],
                           "history": history})
    for old in folder.glob("step-*"):
        if old.name != f"step-{step:06d}":
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def _read_checkpoint_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint file {path} is not readable (corrupt or truncated?): {e}; delete "
                         f"{path.parent} to resume from the checkpoint before it") from e


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the step was not taken."""


def _load_checkpoint(ckpt: Path, model, optimizer, fingerprint: str) -> tuple[int, list]:
    state = read_json(ckpt / "trainer_state.json", "trainer state")
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint {ckpt} belongs to a different tune (other base, data or params); "
            f"delete {ckpt.parent} to start over"
        )
    params = [p for layer in adapter_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    weights = _read_checkpoint_file(ckpt / "adapter.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(weights[f"param.{i}"])
    tensors = _read_checkpoint_file(ckpt / "optimizer.safetensors")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state["step"], state["history"]


# --- the loop ------------------------------------------------------------------------------------

def tune(
    base_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    params: TuneParams,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Tune a QA-LoRA adapter on ``base_dir`` (canonical low-bit folder) with Alpaca data.

    Writes ``out_dir`` (adapter files, ``metrics.jsonl``, manifest) atomically at the end;
    checkpoints go to ``checkpoint_dir`` (default ``<out_dir>.checkpoints``) every
    ``params.save_every`` steps and a re-run resumes from the latest. Returns the manifest.
    """
    check_output_path(out_dir, "tune")  # refuse a bad --out now, not after the whole tune
    device = torch.device(resolve_device(params.device, key="tune.device"))
    dtype = resolve_dtype(params, device)
    model, tokenizer, _ = load_lowbit_model(base_dir, dtype=DTYPES[dtype])
    base = {"path": str(base_dir), "sha256": model_identity(base_dir)}
    examples = training_examples(tokenizer, base_dir, data_path, params)
    torch.manual_seed(params.seed)
    apply_qalora(model, params.rank, params.alpha, params.dropout, params.targets)
    dequant_cache = set_dequant_cache(model, device, params.dequant_cache)
    return train_adapter(model, tokenizer, examples, data_path, out_dir, params, base, device, dtype,
                         compute={"dequant_cache": dequant_cache}, checkpoint_dir=checkpoint_dir,
                         progress=progress, on_step=on_step, desc="QA-LoRA tune")


def training_examples(tokenizer, model_path: str | Path, data_path: str | Path, params: TuneParams) -> list:
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer files: tuning needs one to tokenize {data_path}")
    return tokenize_alpaca(load_alpaca(data_path), tokenizer, params.max_seq_len)


def train_adapter(
    model: torch.nn.Module,
    tokenizer,
    examples: list,
    data_path: str | Path,
    out_dir: str | Path,
    params: TuneParams,
    base: dict[str, str],
    device: torch.device,
    dtype: str,
    *,
    compute: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
    desc: str = "tune",
) -> dict[str, Any]:
    """The training loop shared by QA-LoRA (:func:`tune`) and plain LoRA (:func:`qalora.lora.tune_lora`):
    ``model``'s adapter layers (already applied, seeded, everything else frozen) trained on ``examples``.

    ``base`` = {path, sha256} of the frozen base: it keys the checkpoints (a checkpoint of another base is
    refused) and goes into the adapter config and manifest; ``config``: more adapter-config fields.
    """
    out_dir = Path(out_dir)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + ".checkpoints")
    data_sha = sha256_file(data_path) if Path(data_path).is_file() else None
    fingerprint = sha256_bytes(json.dumps(
        {"params": params.model_dump(), "base": base["sha256"], "data": data_sha}, sort_keys=True).encode())
    model.to(device)
    model.config.use_cache = False
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for layer in adapter_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)

    start, history = 0, []
    latest = _latest_checkpoint(ckpt_root)
    if latest is not None:
        start, history = _load_checkpoint(latest, model, optimizer, fingerprint)
    order = DataOrder(len(examples), params.micro_batch_size, params.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    bar = tqdm(range(start, params.steps), desc=desc, initial=start, total=params.steps, disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        lr = learning_rate(step, params)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens = 0.0, 0
        for micro in range(params.grad_accum):
            batch = collate([examples[i] for i in order.micro_batch_indices(step * params.grad_accum + micro)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = model(**batch).loss / params.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens += int((batch["labels"] != -100).sum())
        if not math.isfinite(loss_sum):
            # The step is not taken: the adapter and the checkpoints on disk stay those of the last finite loss.
            kept = _latest_checkpoint(ckpt_root)
            raise NonFiniteLossError(
                f"the loss became {loss_sum} at step {step + 1} (tune.lr = {params.lr:g}); stopped without "
                f"taking that step; " + (f"the last good checkpoint is {kept} (step {int(kept.name.split('-')[1])})"
                                         if kept else "no checkpoint was written before it")
                + ": lower tune.lr or check the data")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, params.max_grad_norm if params.max_grad_norm > 0 else float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                  "tokens": tokens, "seconds": time.perf_counter() - t0}
        history.append(record)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
        if (step + 1) % params.save_every == 0 and step + 1 < params.steps:
            _save_checkpoint(ckpt_root, model, optimizer, step + 1, fingerprint, history)
        if on_step is not None:
            on_step(step + 1, record)

    model.eval()
    metrics = {
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "mean_loss_last10": sum(h["loss"] for h in history[-10:]) / len(history[-10:]),
        "train_seconds": sum(h["seconds"] for h in history), "steps": float(params.steps),
        "trainable_params": float(sum(p.numel() for p in trainable)),
    }
    with atomic_output_dir(out_dir, "tune") as tmp:
        save_adapter_files(model, tmp, adapter_config(model, base["sha256"], dropout=params.dropout,
                                                        targets=params.targets, **(config or {})))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        manifest = write_manifest(
            tmp, "tune", params.model_dump(),
            inputs={"base": base, "data": {"path": str(data_path), "sha256": data_sha}},
            extra={"metrics": metrics, "resumed_from_step": start,
                   "compute": {"device": device.type, "dtype": dtype, **(compute or {})}},
        )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return manifest


__all__ = ["tune", "train_adapter", "learning_rate", "DataOrder", "QALoRALinear"]
