"""Running GPTQModel in a child process and swapping its result into the model (the parent side).

:func:`quantize_model_gptq` saves the model (fp32 safetensors) and its tokenizer to a temporary
folder, starts ``python -m qalora.quantizers.gptq.child`` on a job file, follows its progress
file with a per-decoder-layer bar, then reads the checkpoint back exactly
(:mod:`qalora.quantizers.gptq.reader`) and swaps the canonical layers in.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

import qalora
from qalora.lowbit import check_bits
from qalora.model_io import join_split_projections
from qalora.paths import state_dir
from qalora.quantizers.gptq.reader import apply_gptq_layers, read_gptq_checkpoint, read_gptq_config
from qalora.quantizers.surgery import check_targets

# GPTQModel's TorchLinear (the packer it uses on CPU) accepts these group sizes (gptqmodel 7.6.0).
GPTQMODEL_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# GPTQModel's GPTQ default; AutoGPTQ used 0.01. It raises damp automatically if H is not PD.
DEFAULT_DAMP_PERCENT = 0.05
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "gptqmodel.log"
CHILD_MODULE = "qalora.quantizers.gptq.child"


def gptqmodel_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a GPTQModel process: set before gptqmodel is imported.

    Existing values win. GPTQMODEL_CPU_WORKERS >= 2 (its model loader pool needs 2); its C++
    pack extension is built once into the state dir (the first build takes ~40 s); HF_HOME points
    into the state dir (otherwise its tokenizer helper redirects it to /tmp); offline.
    """
    env = dict(os.environ if base is None else base)
    cache = state_dir() / "cache" / "gptqmodel"
    cpus = os.cpu_count() or 2
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, (cpus + 1) // 2))))
    env.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    env.setdefault("HF_HOME", str(cache / "hf_home"))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _check_calibration(calibration: Sequence[torch.Tensor], vocab_size: int | None, max_len: int | None) -> None:
    if not calibration:
        raise ValueError("GPTQ needs calibration data: got an empty list of token id tensors")
    for i, ids in enumerate(calibration):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"calibration[{i}] must be a 1-D integer tensor of token ids, got "
                             f"{type(ids).__name__} {getattr(ids, 'shape', '')}")
        if ids.numel() < 2:
            raise ValueError(f"calibration[{i}] has {ids.numel()} tokens; GPTQ needs at least 2 per sample")
        if max_len is not None and ids.numel() > max_len:
            raise ValueError(f"calibration[{i}] has {ids.numel()} tokens, more than the model's "
                             f"max_position_embeddings={max_len}")
        if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"calibration[{i}] has token ids outside [0, {vocab_size})")


def quantize_model_gptq(
    model: nn.Module,
    tokenizer,
    calibration: Sequence[torch.Tensor],
    bits: int,
    group_size: int,
    targets: Sequence[str],
    *,
    sym: bool = False,
    damp_percent: float = DEFAULT_DAMP_PERCENT,
    act_group_aware: bool = True,
    device: str = "cpu",
    work_dir: str | Path,
    progress: bool = True,
    keep_files: bool = False,
) -> list[str]:
    """GPTQ-quantize every target nn.Linear of ``model`` in place; returns the quantized layer names.

    ``calibration``: 1-D token id tensors, one sample each (batch size 1, no padding).
    Asymmetric (``sym=False``) by default; act-order off (contiguous groups); true-sequential on;
    ``act_group_aware`` is GPTQModel's group-aware reordering (GAR, its default), which only
    changes the order columns are processed in and keeps groups contiguous. Runs on ``device``
    (``cpu`` or ``cuda[:N]``) in fp32, in a child process (see module doc); GPTQModel's log is ``work_dir/<tmp>/gptqmodel.log``
    and is kept (with the checkpoint) when it fails or ``keep_files``. The global torch RNG of
    this process is not touched.
    """
    check_bits(bits)
    layers = check_targets(model, targets, group_size)
    if group_size not in GPTQMODEL_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported by GPTQModel's packer "
                         f"(valid: {GPTQMODEL_GROUP_SIZES}); RTN (qalora.quantizers.rtn) takes any divisor")
    for name, lin in layers.items():
        if lin.in_features % 32 or lin.out_features % 32:
            raise ValueError(f"{name} is {lin.out_features}x{lin.in_features}: GPTQModel packs 32 codes per "
                             "word and needs D_in and D_out to be multiples of 32")
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent={damp_percent} must be in (0, 1)")
    if tokenizer is None:
        raise ValueError("GPTQModel needs the model's tokenizer (it is saved next to the model)")
    config = getattr(model, "config", None)
    _check_calibration(calibration, getattr(config, "vocab_size", None),
                       getattr(config, "max_position_embeddings", None))

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gptq-", dir=work_dir))
    src, out = tmp / "fp32_model", tmp / "gptq_checkpoint"
    ok = False
    try:
        _save_fp32(model, tokenizer, src)
        save_file({f"{i:06d}": ids.detach().to(torch.int64).cpu().contiguous() for i, ids in enumerate(calibration)},
                  str(tmp / "calibration.safetensors"))
        target_set = set(layers)
        skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in target_set]
        job = {
            "src": str(src), "out": str(out), "calibration": str(tmp / "calibration.safetensors"),
            "progress": str(tmp / PROGRESS_FILE), "offload": str(tmp / "offload"),
            "bits": bits, "group_size": group_size, "sym": sym, "damp_percent": damp_percent,
            "act_group_aware": act_group_aware, "skip": skip, "device": device,
        }
        (tmp / "job.json").write_text(json.dumps(job, indent=1))
        n_layers = getattr(config, "num_hidden_layers", None)
        _run_child(tmp, n_layers, f"GPTQ int{bits}.g{group_size}", progress)
        shutil.rmtree(src, ignore_errors=True)  # the fp32 copy is the big one

        # GPTQModel splits fused projections (Phi-3's gate_up_proj) into their parts: join them back.
        read = join_split_projections(read_gptq_checkpoint(out), target_set)
        missing = sorted(target_set - set(read))
        extra = sorted(set(read) - target_set)
        if missing or extra:
            raise RuntimeError(f"GPTQModel quantized a different layer set than asked: missing {missing[:5]}, "
                               f"unexpected {extra[:5]} (does GPTQModel support this architecture's layers?)")
        cfg = read_gptq_config(out)
        if bool(cfg.get("desc_act")) or bool(cfg.get("sym")) != sym:
            raise RuntimeError(f"GPTQModel wrote desc_act={cfg.get('desc_act')}, sym={cfg.get('sym')}; "
                               f"asked desc_act=False, sym={sym}")
        for name, layer in read.items():
            if (layer.bits, layer.group_size) != (bits, group_size):
                raise RuntimeError(f"{name}: GPTQModel wrote int{layer.bits}.g{layer.group_size}")
        apply_gptq_layers(model, {n: read[n] for n in layers})
        ok = True
    finally:
        shutil.rmtree(src, ignore_errors=True)
        if ok and not keep_files:
            shutil.rmtree(tmp, ignore_errors=True)
    return list(layers)


def _save_fp32(model: nn.Module, tokenizer, folder: Path) -> None:
    """Write the model as a plain fp32 HF folder (config, one safetensors file, tokenizer).

    Not ``save_pretrained``: it refuses models that carry a load-time quantizer (a GGUF file
    loaded by transformers is dequantized but keeps ``quantization_config: gguf``). Every state
    dict key is written (tensors sharing storage, e.g. tied embeddings, as separate copies) so
    the loader never finds a key missing; the caller's model is not changed.
    """
    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        storage = t.untyped_storage().data_ptr()
        tensors[key] = t.clone() if storage in seen else t.contiguous()
        seen.add(storage)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _run_child(tmp: Path, n_layers: int | None, desc: str, progress: bool) -> None:
    env = gptqmodel_env()
    root = str(Path(qalora.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = tmp / LOG_FILE
    progress_path = tmp / PROGRESS_FILE
    bar = tqdm(total=n_layers, desc=desc, unit="layer", disable=not progress)
    seen: set[int] = set()
    offset = 0
    start = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", CHILD_MODULE, str(tmp / "job.json")],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while True:
                rc = proc.poll()
                if progress_path.is_file():
                    with open(progress_path) as f:
                        f.seek(offset)
                        chunk = f.read()
                    complete = chunk[: chunk.rfind("\n") + 1]
                    offset += len(complete.encode())
                    for line in complete.splitlines():
                        event = json.loads(line)
                        if "layer" in event and event["layer"] not in seen:
                            seen.add(event["layer"])
                            bar.update(1)
                if rc is not None:
                    break
                time.sleep(0.5)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            bar.close()
    if rc != 0:
        lines = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
        tail = "\n".join(l for l in lines if l.strip())[-4000:]
        raise RuntimeError(f"GPTQModel failed (exit code {rc}) after {time.time() - start:.0f} s; "
                           f"full log: {log_path}\n{tail}")

