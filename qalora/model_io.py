"""Load a full-precision base model (a HF folder, a hub id from the local cache only, or a GGUF file)
and find the linear layers qalora quantizes and adapts, on every model family it supports.

Model families (README "Model families"):

- LLaMA-style blocks (LLaMA, Mistral, Qwen2, Gemma 2/3, ...): one nn.Linear per projection,
  ``q/k/v/o_proj`` and ``gate/up/down_proj`` (:data:`DEFAULT_TARGETS`).
- Fused projections (Phi-3's ``qkv_proj`` = q|k|v and ``gate_up_proj`` = gate|up): one nn.Linear whose
  output rows are its parts' rows stacked, so it is quantized, adapted and merged as one wider
  layer. Groups run along D_in, the QA-LoRA pooling too, and the merge moves each output row's
  zeros on its own, so fusing rows changes nothing: a fused layer merges exactly like its parts
  would. A target list names the parts; a fused projection is a target when all its parts are
  (:data:`FUSED_PROJECTIONS`), or when the list names it.
- Mixture of experts: transformers 5 stores each MoE block's experts as stacked 3-D parameters, not
  nn.Linear layers. :func:`defuse_experts` splits them (in place, weights bit for bit) into per-expert
  nn.Linear layers ``experts.<i>.gate_proj/up_proj/down_proj`` with GPTQModel's own splitter
  (``defuser``), which gives them the names GPTQModel quantizes under; the loaders here and in
  :mod:`qalora.checkpoint` do it on load. A model whose experts stay stacked is refused
  (:class:`UnsupportedModelError`): quantizing only its nn.Linear layers would silently leave most
  of its weights in full precision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Projections of LLaMA-style blocks; the default QA-LoRA / quantization targets.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused projection -> the projections whose output rows it stacks, in order (Phi-3, Phi-4-mini, ...).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class UnsupportedModelError(ValueError):
    """A model family (or one of its layers) qalora cannot quantize, tune or merge; names the reason."""


def model_family(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def stacked_expert_weights(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of every 3-D weight outside a convolution: MoE experts stored stacked
    ([num_experts, D_out, D_in], transformers 5), which no nn.Linear target can cover."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                found[f"{module_name}.{name}" if module_name else name] = tuple(p.shape)
    return found


def _refuse_stacked(model: torch.nn.Module, stacked: dict[str, tuple[int, ...]], why: str) -> UnsupportedModelError:
    first = next(iter(stacked))
    return UnsupportedModelError(
        f"{model_family(model)}: {len(stacked)} weights are stacked mixture-of-experts parameters, not nn.Linear "
        f"layers (e.g. {first} {list(stacked[first])}); qalora quantizes and adapts nn.Linear layers only, so "
        f"these experts would stay in full precision. {why}"
    )


def defuse_experts(model: torch.nn.Module) -> list[str]:
    """Split stacked MoE experts into per-expert nn.Linear layers in place; returns the new layer names.

    A no-op (returns []) for a model without stacked experts. Uses ``defuser`` (GPTQModel's own
    dependency), so the layers are named as GPTQModel quantizes them
    (``...mlp.experts.<i>.gate_proj``); the split copies the weights bit for bit and keeps the math; the
    forward then runs per-expert matmuls of other shapes, equal to fp32 rounding (MKL may sum in
    another order: 2e-7 relative on an AMD EPYC, bit-equal on an AVX-512 Xeon).
    Raises :class:`UnsupportedModelError` naming the family when experts stay stacked.
    """
    stacked = stacked_expert_weights(model)
    if not stacked:
        return []
    try:
        import defuser
    except ImportError as e:  # pragma: no cover - installed with gptqmodel
        raise _refuse_stacked(model, stacked, f"Splitting them needs the `defuser` package ({e}).") from e
    before = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with _quiet_defuser():
        defuser.convert_model(model, cleanup_original=True)
    left = stacked_expert_weights(model)
    if left:
        raise _refuse_stacked(model, left, "defuser cannot split this family's experts: mixture-of-experts "
                                           f"family {model_family(model)!r} is not supported.")
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in before)


class _quiet_defuser:
    """defuser logs each converted block at INFO (the whole module tree); keep warnings only."""

    def __enter__(self):
        import logging
        import sys

        import defuser.defuser  # noqa: F401 - imports the modules that log, so their loggers exist now

        self.saved = []
        for name, mod in list(sys.modules.items()):
            log = getattr(mod, "logger", None) if name.startswith("defuser") else None
            if isinstance(log, logging.Logger):
                self.saved.append((log, log.level))
                log.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for log, level in self.saved:
            log.setLevel(level)
        return False


def load_base_model(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer).

    ``source``: a folder with config.json + *.safetensors, a ``.gguf`` file (dequantized to
    ``dtype`` by transformers), or a hub id that must already be in the local HF cache (no
    network at run time). Pickle checkpoints (*.bin) are refused: safetensors only. Stacked MoE
    experts are split into per-expert layers (:func:`defuse_experts`). Refused: a checkpoint that lacks
    weights of the model it builds (transformers would initialize them at random), and a GGUF file
    transformers cannot load (:class:`UnsupportedModelError` naming its architecture and why).
    """
    source = str(source)
    path = Path(source)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a HF model folder")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path} has no *.safetensors weights; qalora loads safetensors only "
                "(convert pickle checkpoints with `transformers` save_pretrained(safe_serialization=True))"
            )
        where = source
    elif path.suffix or path.is_absolute() or source.startswith("."):
        raise FileNotFoundError(f"model not found: {source} (expected a HF folder, a .gguf file or a hub id)")
    else:
        where, kwargs["local_files_only"] = source, True
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=not source.endswith(".gguf") or None,
                                                           output_loading_info=True, **kwargs)
    except OSError as e:
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(
                f"hub id {source!r} is not in the local HF cache and no network is used at run time; "
                "pass a local folder or .gguf file"
            ) from e
        raise
    except SafetensorError as e:  # a truncated download, a file cut by a full disk, a corrupt header
        files = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) if path.is_dir() else "a weights file"
        raise ValueError(f"{source}: {files} not readable (corrupt or truncated? re-download or re-save it): {e}") from e
    except (NotImplementedError, ValueError, RuntimeError, KeyError) as e:
        if "gguf_file" in kwargs:
            raise UnsupportedModelError(gguf_refusal(path, e)) from e
        raise
    # transformers initializes weights a checkpoint lacks at random, with a warning: refuse instead.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        if "gguf_file" in kwargs:
            raise UnsupportedModelError(gguf_refusal(path, missing=missing, model=model))
        raise ValueError(f"{source}: {len(missing)} weights of {model_family(model)} are missing from the checkpoint "
                         f"(e.g. {missing[:3]}); transformers would initialize them at random")
    defuse_experts(model)
    model.eval()
    return model, tokenizer


def gguf_refusal(path: Path, error: BaseException | None = None, missing: list[str] | None = None,
                 model: torch.nn.Module | None = None) -> str:
    """Why transformers' GGUF loader refused ``path`` (its ``error``), or built a model (``model``) without
    some of its weights (``missing``): the file's architecture (the family) and the reason."""
    import transformers

    meta: dict = {}
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        for key, field in reader.fields.items():
            if key.startswith("general.") or key.endswith((".expert_feed_forward_length", ".expert_count")):
                meta[key] = field.contents()
    except Exception:  # noqa: BLE001 - the metadata only words the message
        pass
    arch, name = meta.get("general.architecture"), meta.get("general.name")
    head = (f"{path.name}: transformers {transformers.__version__} cannot load this GGUF "
            f"(general.architecture={arch!r}, general.name={name!r})")
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover
        GGUF_SUPPORTED_ARCHITECTURES = []
    experts = meta.get(f"{arch}.expert_count")
    if missing:
        family = model_family(model) if model is not None else "?"
        if experts and not any(n.rpartition(".")[2] == "experts" for n, _ in model.named_modules()):
            reason = (f"the file is a mixture of experts ({arch}.expert_count={experts}, e.g. Mixtral) that its GGUF "
                      f"loader builds as a dense {family} model: the expert tensors map to nothing and the "
                      f"{len(missing)} MLP weights (e.g. {missing[0]}) would be random; convert the model to a HF "
                      "folder instead")
        else:
            reason = (f"{len(missing)} weights of the {family} model it builds are not in the file (e.g. {missing[:3]}) "
                      "and would be random; convert the model to a HF folder instead")
        return f"{head}: {reason}"
    text = f"{type(error).__name__}: {error}"
    if arch is not None and arch not in GGUF_SUPPORTED_ARCHITECTURES and "not supported" in str(error):
        reason = (f"its GGUF loader does not map architecture {arch!r} (it maps "
                  f"{', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'}))}); "
                  "convert the model to a HF folder instead")
    elif "Unknown gguf model_type: mistral" in str(error):
        reason = ("it reads a 'llama' file whose general.name is 'mistral' as Mistral, a family gguf-py has no tensor "
                  "names for; llama.cpp's Mistral files under any other name load as LLaMA (the same weights)")
    elif "mismatch" in text and any(k.endswith("expert_feed_forward_length") for k in meta):
        width = next(v for k, v in meta.items() if k.endswith("expert_feed_forward_length"))
        reason = (f"its GGUF loader does not read the experts' width (expert_feed_forward_length={width} here) and "
                  "builds experts of the config class's default width, so only files at that width load; "
                  "convert the model to a HF folder instead")
    else:
        reason = text[:2000]
    return f"{head}: {reason}"


def target_names(targets: tuple[str, ...] | list[str]) -> set[str]:
    """The layer names ``targets`` selects: the names themselves, plus every fused projection all of
    whose parts are targets (q/k/v_proj -> Phi-3's qkv_proj)."""
    names = set(targets)
    return names | {fused for fused, parts in FUSED_PROJECTIONS.items() if set(parts) <= names}


def join_split_projections(layers: dict, wanted) -> dict:
    """Join the parts of a fused projection that a quantizer wrote split, back into the fused layer.

    GPTQModel 7.6 (through defuser) quantizes Phi-3's ``mlp.gate_up_proj`` as ``mlp.gate_proj`` and
    ``mlp.up_proj`` (its rows [:F] and [F:]). ``layers`` maps layer names to per-layer NamedTuples in
    canonical orientation (D_out first: codes, scales, zeros, bias; ints such as bits must agree);
    for every name in ``wanted`` that is missing and is a fused projection whose parts are all
    present, the parts' tensors are concatenated along D_out, in :data:`FUSED_PROJECTIONS` order.
    Exact: GPTQ quantizes the rows of a layer independently given the Hessian of its input, and the
    parts share the fused layer's input, so the joined rows are the fused layer's GPTQ rows.
    """
    out = dict(layers)
    for name in wanted:
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}" if prefix else p for p in FUSED_PROJECTIONS.get(leaf, ())]
        if name in out or not parts or not all(p in out for p in parts):
            continue
        pieces = [out.pop(p) for p in parts]
        fields = {}
        for field in pieces[0]._fields:
            values = [getattr(piece, field) for piece in pieces]
            if all(isinstance(v, torch.Tensor) for v in values):
                fields[field] = torch.cat(values, dim=0)
            elif all(v is None for v in values):
                fields[field] = None
            elif all(v == values[0] for v in values):
                fields[field] = values[0]
            else:
                raise ValueError(f"cannot join {parts} into {name}: their {field} differ ({values})")
        out[name] = pieces[0]._replace(**fields)
    return out


def find_linear_targets(model: torch.nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, torch.nn.Module]:
    """Modules whose last name component is in ``targets`` (e.g. ``q_proj``) or is a fused projection
    of target parts (:func:`target_names`), in model order.

    Raises :class:`UnsupportedModelError` for a model with stacked MoE experts (call
    :func:`defuse_experts` first; :func:`load_base_model` does).
    """
    stacked = stacked_expert_weights(model)
    if stacked:
        raise _refuse_stacked(model, stacked, "Load the model with qalora.model_io.load_base_model, or call "
                                              "qalora.model_io.defuse_experts(model), to split them first.")
    wanted = target_names(targets)
    found = {n: m for n, m in model.named_modules() if n.split(".")[-1] in wanted}
    if not found:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"no module matches target_modules={list(targets)}; linear layers here: {names}")
    return found


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def source_identity(source: str | Path) -> str:
    """A content hash of a model source: the file (GGUF), the folder's config + safetensors, or the id."""
    from qalora.manifest import sha256_bytes, sha256_file

    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        parts = [f"{f.name}:{sha256_file(f)}" for f in sorted(path.iterdir())
                 if f.suffix in (".safetensors", ".json") and f.is_file()]
        return sha256_bytes("\n".join(parts).encode())
    return sha256_bytes(str(source).encode())
