"""GPTQ quantization through GPTQModel, converted exactly into the canonical low-bit format.

:func:`quantize_model_gptq` mirrors :func:`qalora.quantize.quantize_model_rtn`: it replaces the
target ``nn.Linear`` layers of an fp32 HF causal LM in place with
:class:`qalora.lowbit.LowBitLinear`. Internally it

1. saves the model (fp32 safetensors) and its tokenizer to a temporary folder under ``work_dir``
   (GPTQModel loads models from folders and wants a tokenizer there);
2. runs GPTQModel (asymmetric by default, act-order/``desc_act`` off so groups stay contiguous,
   true-sequential on, on the CPU in fp32) in a **child process**, with its logs going to
   ``gptqmodel.log`` and only a per-decoder-layer progress bar shown here. The child keeps
   GPTQModel's import-time side effects (monkey patches of transformers/safetensors, env vars such
   as HF_HOME set by its tokenizer helper, worker thread pools, and the global torch RNG that its
   first quantize advances) out of the calling process;
3. reads the GPTQModel checkpoint back with :func:`read_gptq_checkpoint` - exactly: codes and
   zeros integer-identical, scales the same fp16 values - and swaps the layers in.

The reader is usable on its own for any GPTQModel GPTQ checkpoint (``checkpoint_format`` ``gptq``
= v1 or ``gptq_v2``, int32 words, contiguous groups), see :func:`apply_gptq_checkpoint`.

GPTQ v1/v2 layout (GPTQModel, AutoGPTQ lineage), per layer with D_in inputs, D_out outputs, L groups:

- ``qweight`` int32 [D_in*bits/32, D_out]: along D_in, each column is a little-endian bit stream
  of codes (2/4/8 bit: 32/bits codes per word; 3 bit: 32 codes in every 3 words as one 96-bit
  stream). That is the canonical per-row stream of :mod:`qalora.lowbit`, transposed.
- ``qzeros`` int32 [L, D_out*bits/32]: the same stream along D_out, one row per group. Format v1
  stores zero-1: GPTQModel writes it by subtracting 0x..0101 from every *word* (with borrow
  across fields) at 2/4/8 bit, and field by field mod 8 at 3 bit. The reader undoes exactly
  that: word-wise add with carry at 2/4/8 bit (a field-wise +1 would be wrong wherever a zero
  is 0), field-wise +1 mod 8 at 3 bit. v2 stores the zeros themselves.
- ``scales`` fp16 [L, D_out], ``g_idx`` int32 [D_in] (must be i // g: contiguous groups),
  optional ``bias`` (fp16 in GPTQModel checkpoints).

GPTQModel then dequantizes W = scales[g] * (q - z). The canonical layer stores the same integer
codes, the same fp16 scales and the same integer zeros as fp32 floats, so its fp32 dequantization
is the exact product and GPTQModel's fp16 kernel result is that product rounded to fp16.
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
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from qalora.lowbit import check_bits, unpack_codes
from qalora.model_io import set_submodule
from qalora.paths import state_dir
from qalora.quantize import check_targets, lowbit_from_linear

# GPTQModel's TorchLinear (the packer it uses on CPU) accepts these group sizes (gptqmodel 7.6.0).
GPTQMODEL_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# GPTQModel's GPTQ default; AutoGPTQ used 0.01. It raises damp automatically if H is not PD.
DEFAULT_DAMP_PERCENT = 0.05
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "gptqmodel.log"
_QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


class GPTQLayer(NamedTuple):
    """One layer read from a GPTQ checkpoint, in canonical orientation.

    codes uint8 [D_out, D_in], scales fp16 [D_out, L], zeros fp32 [D_out, L] (integer valued),
    bias fp32 [D_out] or None; W = scales * (codes - zeros) group-wise.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int


# ----------------------------------------------------------------------------------------------
# Reading GPTQ checkpoints
# ----------------------------------------------------------------------------------------------


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32/int64 words [..., n] (low 32 bits used) -> uint8 [..., 4n], little-endian per word."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=w.device)
    return ((w.unsqueeze(-1) >> shifts) & 0xFF).reshape(*w.shape[:-1], -1).to(torch.uint8)


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Rows of int32 words [R, n] holding little-endian code streams -> uint8 codes [R, count]."""
    codes = unpack_codes(_words_to_bytes(words), bits)
    if codes.shape[1] < count:
        raise ValueError(f"packed stream holds {codes.shape[1]} codes, fewer than the {count} expected")
    return codes[:, :count]


def _v1_word_offset(bits: int) -> int:
    """0x..0101: a 1 in every ``bits``-wide field of a 32-bit word (2/4/8 bit)."""
    return sum(1 << (bits * j) for j in range(32 // bits))


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool = True) -> torch.Tensor:
    """qzeros int32 [L, D_out*bits/32] -> integer zeros uint8 [L, D_out] (v1: undoes the zero-1)."""
    check_bits(bits)
    if v1 and bits != 3:
        # GPTQModel stored (word - 0x..0101) mod 2^32: a word-wise subtraction that borrows across
        # fields when a zero is 0. Adding it back word-wise (with carry) restores every field.
        words = (qzeros.to(torch.int64) + _v1_word_offset(bits)) & 0xFFFFFFFF
        return _unpack_stream(words, bits, out_features)
    zeros = _unpack_stream(qzeros, bits, out_features)
    if v1:  # 3 bit: GPTQModel shifts each decoded field by -1 mod 8, so undo it field by field
        zeros = ((zeros.to(torch.int16) + 1) & 0x7).to(torch.uint8)
    return zeros


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [D_in*bits/32, D_out] -> codes uint8 [D_out, D_in]."""
    check_bits(bits)
    return _unpack_stream(qweight.t().contiguous(), bits, in_features)


def read_gptq_config(folder: str | Path) -> dict[str, Any]:
    """The quantization config of a GPTQ checkpoint folder (quantize_config.json or config.json)."""
    folder = Path(folder)
    for name in _QUANT_CONFIG_FILES:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    if (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text()).get("quantization_config")
        if cfg:
            return cfg
    raise FileNotFoundError(f"{folder} has no quantize_config.json nor a quantization_config in config.json: "
                            "not a GPTQ checkpoint")


def _checkpoint_format(cfg: dict[str, Any]) -> str:
    method = str(cfg.get("quant_method") or cfg.get("method") or "gptq").lower()
    fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    if method != "gptq" or fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"unsupported checkpoint: quant_method={method!r}, checkpoint_format={fmt!r}; "
                         "qalora reads GPTQ checkpoints in format 'gptq' (v1) or 'gptq_v2'")
    pack = str(cfg.get("pack_dtype", "int32")).replace("torch.", "")
    if pack != "int32":
        raise ValueError(f"unsupported pack_dtype={pack!r}: qalora reads int32-packed GPTQ checkpoints")
    return fmt


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    return files


def read_gptq_checkpoint(folder: str | Path) -> dict[str, GPTQLayer]:
    """Every quantized layer of a GPTQModel/AutoGPTQ-style GPTQ checkpoint, exactly.

    Returns ``{layer_name: GPTQLayer(codes, scales, zeros, bias, bits, group_size)}`` in file
    order. Bits and group size are derived per layer from the tensor shapes (so per-layer
    ``dynamic`` overrides work) and checked against the config when it names them. Raises if a
    layer's groups are not contiguous (act-order / desc_act checkpoints cannot be represented in
    the canonical format) or the format is not GPTQ v1/v2 with int32 words.
    """
    folder = Path(folder)
    cfg = read_gptq_config(folder)
    v1 = _checkpoint_format(cfg) == "gptq"
    files = _safetensors_files(folder)
    keys_by_file: dict[Path, list[str]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys_by_file[path] = list(f.keys())
    all_keys = [k for keys in keys_by_file.values() for k in keys]
    order = [k[: -len(".qweight")] for k in all_keys if k.endswith(".qweight")]
    orphans = sorted({k.rpartition(".")[0] for k in all_keys if k.endswith((".qzeros", ".scales", ".g_idx"))}
                     - set(order))
    if orphans:
        raise ValueError(f"{folder}: tensors {orphans[:3]} have qzeros/scales/g_idx but no qweight")
    if not order:
        raise ValueError(f"{folder}: no GPTQ layers (*.qweight tensors) in {[p.name for p in files]}")
    wanted = set(order)
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in order}
    for path, keys in keys_by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for k in keys:
                prefix, _, leaf = k.rpartition(".")
                if prefix in wanted and leaf in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                    parts[prefix][leaf] = f.get_tensor(k)
    layers: dict[str, GPTQLayer] = {}
    for name in order:
        layers[name] = _convert_layer(name, parts[name], cfg, v1)
    return layers


def _convert_layer(name: str, t: dict[str, torch.Tensor], cfg: dict[str, Any], v1: bool) -> GPTQLayer:
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in t]
    if missing:
        raise ValueError(f"GPTQ layer {name} lacks {missing}")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"GPTQ layer {name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if scales.dtype != torch.float16:
        raise ValueError(f"GPTQ layer {name}: scales are {scales.dtype}; GPTQ checkpoints store fp16 scales")
    n_groups, d_out = scales.shape
    g_idx = t.get("g_idx")
    d_in = g_idx.numel() if g_idx is not None else None
    if d_in is None:  # no g_idx (old AutoGPTQ without act-order): D_in from the config's group size
        d_in = n_groups * int(cfg["group_size"])
    bits, rem = divmod(qweight.shape[0] * 32, d_in)
    if rem or bits not in (2, 3, 4, 8) or qweight.shape[1] != d_out:
        raise ValueError(f"GPTQ layer {name}: qweight {tuple(qweight.shape)} does not fit D_in={d_in}, "
                         f"D_out={d_out} at 2/3/4/8 bit")
    group_size, rem = divmod(d_in, n_groups)
    if rem:
        raise ValueError(f"GPTQ layer {name}: {n_groups} groups do not divide D_in={d_in}")
    if not cfg.get("dynamic"):
        want_bits, want_group = cfg.get("bits"), cfg.get("group_size")
        if want_bits is not None and int(want_bits) != bits:
            raise ValueError(f"GPTQ layer {name} is {bits}-bit by its shapes but the config says bits={want_bits}")
        if want_group not in (None, -1) and int(want_group) != group_size:
            raise ValueError(f"GPTQ layer {name} has group size {group_size} but the config says {want_group}")
    if g_idx is not None:
        contiguous = torch.arange(d_in, dtype=torch.int64) // group_size
        if not torch.equal(g_idx.to(torch.int64), contiguous):
            raise ValueError(
                f"GPTQ layer {name}: g_idx is not contiguous (i // {group_size}); act-order (desc_act=True) "
                "checkpoints cannot be represented with contiguous groups - quantize with desc_act=False")
    if qzeros.shape != (n_groups, d_out * bits // 32):
        raise ValueError(f"GPTQ layer {name}: qzeros {tuple(qzeros.shape)} != {(n_groups, d_out * bits // 32)}")
    codes = unpack_gptq_qweight(qweight, bits, d_in)
    zeros = unpack_gptq_zeros(qzeros, bits, d_out, v1=v1).t().to(torch.float32).contiguous()
    bias = t.get("bias")
    return GPTQLayer(
        codes=codes,
        scales=scales.t().contiguous(),
        zeros=zeros,
        bias=None if bias is None else bias.to(torch.float32),
        bits=bits,
        group_size=group_size,
    )


def apply_gptq_layers(
    model: nn.Module, layers: dict[str, GPTQLayer], use_checkpoint_bias: bool = False
) -> list[str]:
    """Replace the model's nn.Linear named in ``layers`` with canonical LowBitLinear layers.

    The bias is taken from the model's own linear (fp32; GPTQModel stores biases in fp16) unless
    ``use_checkpoint_bias``.
    """
    done = []
    for name, layer in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"GPTQ layer {name} does not exist in the model") from e
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, not nn.Linear: already quantized?")
        if (linear.out_features, linear.in_features) != tuple(layer.codes.shape):
            raise ValueError(f"GPTQ layer {name} is {tuple(layer.codes.shape)} but the model's linear is "
                             f"{(linear.out_features, linear.in_features)}")
        new = lowbit_from_linear(linear, layer.codes, layer.scales, layer.zeros, layer.bits, layer.group_size, name)
        if use_checkpoint_bias and layer.bias is not None and new.bias is not None:
            new.bias.copy_(layer.bias)
        set_submodule(model, name, new.to(linear.weight.device))
        done.append(name)
    return done


def apply_gptq_checkpoint(model: nn.Module, folder: str | Path, targets: Sequence[str] | None = None) -> list[str]:
    """Convert a GPTQ checkpoint of ``model``'s architecture into its canonical layers, in place.

    ``model`` is the full-precision model the checkpoint was made from (its non-quantized tensors
    are kept as they are). ``targets`` restricts the layers by last name component.
    """
    layers = read_gptq_checkpoint(folder)
    if targets is not None:
        layers = {n: v for n, v in layers.items() if n.split(".")[-1] in set(targets)}
    return apply_gptq_layers(model, layers, use_checkpoint_bias=True)


# ----------------------------------------------------------------------------------------------
# Running GPTQModel
# ----------------------------------------------------------------------------------------------


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
    work_dir: str | Path,
    progress: bool = True,
    keep_files: bool = False,
) -> list[str]:
    """GPTQ-quantize every target nn.Linear of ``model`` in place; returns the quantized layer names.

    ``calibration``: 1-D token id tensors, one sample each (batch size 1, no padding).
    Asymmetric (``sym=False``) by default; act-order off (contiguous groups); true-sequential on;
    ``act_group_aware`` is GPTQModel's group-aware reordering (GAR, its default), which only
    changes the order columns are processed in and keeps groups contiguous. Runs on the CPU in
    fp32, in a child process (see module doc); GPTQModel's log is ``work_dir/<tmp>/gptqmodel.log``
    and is kept (with the checkpoint) when it fails or ``keep_files``. The global torch RNG of
    this process is not touched.
    """
    check_bits(bits)
    layers = check_targets(model, targets, group_size)
    if group_size not in GPTQMODEL_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported by GPTQModel's packer "
                         f"(valid: {GPTQMODEL_GROUP_SIZES}); RTN (qalora.quantize) takes any divisor")
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
            "act_group_aware": act_group_aware, "skip": skip,
        }
        (tmp / "job.json").write_text(json.dumps(job, indent=1))
        n_layers = getattr(config, "num_hidden_layers", None)
        _run_child(tmp, n_layers, f"GPTQ int{bits}.g{group_size}", progress)
        shutil.rmtree(src, ignore_errors=True)  # the fp32 copy is the big one

        read = read_gptq_checkpoint(out)
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
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = tmp / LOG_FILE
    progress_path = tmp / PROGRESS_FILE
    bar = tqdm(total=n_layers, desc=desc, unit="layer", disable=not progress)
    seen: set[int] = set()
    offset = 0
    start = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qalora.gptq", str(tmp / "job.json")],
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


def _child_main(job_path: str) -> None:
    """Entry point of the child process: quantize job['src'] with GPTQModel into job['out']."""
    job = json.loads(Path(job_path).read_text())
    progress = open(job["progress"], "a", buffering=1)

    def event(**kw) -> None:
        progress.write(json.dumps({**kw, "t": round(time.time(), 3)}) + "\n")

    event(stage="import")
    from gptqmodel import GPTQModel, QuantizeConfig  # lazy: env was set by the parent

    calib = load_file(job["calibration"])
    samples = [{"input_ids": calib[k].tolist(), "attention_mask": [1] * calib[k].numel()} for k in sorted(calib)]
    dynamic = None
    if job["skip"]:
        import re

        dynamic = {"-:^(?:" + "|".join(re.escape(n) for n in job["skip"]) + ")$": {}}
    qcfg = QuantizeConfig(
        bits=job["bits"], group_size=job["group_size"], sym=job["sym"], desc_act=False,
        act_group_aware=job["act_group_aware"], true_sequential=True, damp_percent=job["damp_percent"],
        device="cpu", offload_to_disk_path=job["offload"], dynamic=dynamic,
    )
    event(stage="load")
    gm = GPTQModel.load(job["src"], qcfg, dtype=torch.float32)

    def layer_done(layer_idx: int, submodule_finalized: bool = False, **_: Any) -> None:
        event(layer=int(layer_idx), finalized=bool(submodule_finalized))

    gm.layer_callback = layer_done
    event(stage="quantize")
    gm.quantize(samples, batch_size=1, calibration_data_min_length=0)
    event(stage="save")
    gm.save(job["out"])
    event(stage="done")
    progress.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m qalora.gptq JOB.json  (internal: the GPTQModel child process)")
    _child_main(sys.argv[1])
