"""The one experiment schema: a params YAML (``params/default.yaml``) plus ``--set key=value``.

Unknown keys and bad values raise :class:`ParamsError` naming the dotted key and what is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qalora.lowbit import SUPPORTED_BITS
from qalora.model_io import DEFAULT_TARGETS
from qalora.paths import EMBEDDED_MODEL


class ParamsError(ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(_Section):
    source: str = Field(EMBEDDED_MODEL, description="HF folder, .gguf file, hub id in the local cache, or the embedded default")
    trust_remote_code: bool = False


class DataParams(_Section):
    """Paths relative to the project dir; the defaults are the DVC-versioned data/ (`qalora data build`)."""

    train: str = Field("data/train/alpaca_en_demo.json", description="Alpaca JSON/JSONL (instruction/input/output)")
    calibration: str = Field("data/calibration/c4_demo.jsonl", description="calibration text: .txt or .jsonl with a 'text' field")
    heldout: str = Field("data/heldout/wiki_demo.txt", description="held-out text for perplexity")
    eval_dir: str = Field("data/eval", description="folder of the local HF eval datasets")


class QuantizeParams(_Section):
    method: Literal["gptq", "rtn"] = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    calib_samples: int = Field(32, ge=1)
    calib_seq_len: int = Field(512, ge=16)
    damp_percent: float = Field(0.05, gt=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where GPTQ runs (its Hessians and solves): auto = CUDA when there is one, else CPU; "
                            "fp32 either way. RTN runs on the CPU")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits={v} is not supported; valid: {list(SUPPORTED_BITS)}")
        return v

    @property
    def tag(self) -> str:
        """Self-describing artifact name, e.g. ``int4.g64``."""
        return f"int{self.bits}.g{self.group_size}"


class TuneParams(_Section):
    steps: int = Field(40, ge=1, description="optimizer steps")
    lr: float = Field(2e-4, gt=0)
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(256, ge=8)
    warmup_steps: int = Field(4, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU (exact)")
    dequant_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="keep each frozen layer's dequantized weight resident: auto = on CPU, "
                            "off on CUDA (dequantize per call, the base stays low-bit on the GPU)")
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every: int = Field(10, ge=1, description="checkpoint every N steps (resumable)")
    seed: int = 0


class CheckParams(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    rel_tol: float = Field(1e-3, gt=0, description="max relative L2 error, merged vs unmerged logits (fp32)")
    max_new_tokens: int = Field(16, ge=1)
    prompts: list[str] = Field(
        default_factory=lambda: [
            "Give three tips for staying healthy.",
            "What is the capital of France?",
            "Write a haiku about low-bit quantization.",
            "Explain why the sky is blue in one sentence.",
        ]
    )


class BenchmarkParams(_Section):
    enabled: bool = True
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4])
    decode_tokens: int = Field(32, ge=1, description="tokens decoded per measurement")
    prefill_lengths: list[int] = Field(default_factory=lambda: [128])
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvaluateParams(_Section):
    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: ["mmlu", "arc_easy", "hellaswag", "piqa", "winogrande",
                                                        "boolq", "arc_challenge", "openbookqa"])
    num_fewshot: int | None = Field(None, ge=0, description="null = lm-eval's default per task (MMLU 5, others 0)")
    limit: int | None = Field(20, ge=1, description="examples per task (per subject for MMLU); null = all")
    limit_per_task: dict[str, int] = Field(default_factory=lambda: {"mmlu": 2},
                                           description="task -> limit, overriding `limit` (MMLU: per subject)")
    batch_size: int = Field(8, ge=1)
    perplexity: bool = True
    perplexity_context: int = Field(512, ge=16)
    perplexity_max_tokens: int | None = Field(40_000, ge=16, description="first N tokens of the held-out text; null = all")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA (bf16, weights kept low-bit) "
                                                   "when there is one, else CPU (fp32)")
    baselines: list[Literal["fp", "base"]] = Field(
        default_factory=lambda: ["fp", "base"],
        description="also score, on the same questions, the full-precision source model (fp) and the untuned "
                    "quantized base (base): what quantization cost and what tuning bought. Cached by model, "
                    "so each costs once per base")

    def limits(self) -> dict[str, int | None]:
        """The limit of every requested task."""
        return {t: self.limit_per_task.get(t, self.limit) for t in self.tasks}


class GateParams(_Section):
    """Promotion rules; every failed rule is reported with its figures."""

    require_bit_exact: bool = True
    max_logit_rel_error: float = Field(1e-3, gt=0)
    min_decode_speedup: float | None = Field(None, gt=0, description="low-bit vs fp16/fp32 decode tok/s at batch 1, same run; null = no rule")
    metric_tolerance: float = Field(0.02, ge=0, description="allowed relative perplexity rise vs the champion; also the "
                                    "allowed accuracy drop when either model has no per-question record")
    # Accuracy is judged on the questions both models answered (qalora.paired): promote unless the challenger
    # is significantly worse, and only when enough questions were asked to see a drop of max_accuracy_drop.
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided confidence of the paired test (McNemar)")
    max_accuracy_drop: float = Field(0.05, gt=0, lt=1, description="the accuracy drop the gate must be able to detect "
                                     "(80% power); a comparison that cannot fails as underpowered")
    allow_underpowered: bool = Field(False, description="decide anyway when too few questions were compared "
                                     "(the rule then passes with 'underpowered' in its message)")
    # The aggregates the no-regression rule compares. Per-subject MMLU slices (a few questions each at
    # CPU-sized limits) are noise: one question flips 50% of a 2-question subject, so gating on them
    # rejects good models at random. They stay run metrics and in eval.json.
    regression_tasks: list[str] = Field(
        default_factory=lambda: ["mmlu", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem",
                                 "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq",
                                 "openbookqa", "wiki_ppl"],
        description="tasks/groups (fnmatch patterns) whose eval metrics must not regress vs the champion")
    floors: dict[str, float] = Field(default_factory=dict, description="metric -> minimum, e.g. eval.arc_easy.acc: 0.3")
    max_perplexity: float | None = Field(None, gt=0)


class ExportParams(_Section):
    """Exports of a promoted model (qalora.export): each written next to the stages, its error measured
    by its consumer, logged to MLflow under ``exports/<format>`` and stated in the report."""

    formats: list[Literal["gguf", "hqq"]] = Field(default_factory=list, description="on promotion; [] = none")
    max_new_tokens: int = Field(16, ge=1, description="greedy tokens compared per check prompt")


class TrackingParams(_Section):
    tracking_uri: str | None = Field(None, description="MLflow URI; null = sqlite under $QALORA_HOME")
    experiment: str = "qalora"
    registered_model: str = "qalora-smollm2-135m"


SWEEP_METHODS = ("qalora", "qlora_gptq", "lora_fp", "gptq")


class SweepParams(_Section):
    """The accuracy sweep (``qalora sweep``): each method at each bit width and group size, with the same
    data, token budget (``tune``), seed, calibration (``quantize``) and evaluation (``evaluate``).

    Methods: ``qalora`` (GPTQ base, QA-LoRA, merged into the zeros); ``qlora_gptq`` (LoRA over an NF4 base,
    merged into the fp weights, then GPTQ); ``lora_fp`` (LoRA on the fp model, not quantized: the upper
    reference, one per sweep); ``gptq`` (the quantized base, untuned). The fp model itself is always scored.
    """

    methods: list[Literal["qalora", "qlora_gptq", "lora_fp", "gptq"]] = Field(default_factory=lambda: list(SWEEP_METHODS))
    bits: list[int] = Field(default_factory=lambda: [4, 3, 2])
    group_sizes: list[int] = Field(default_factory=lambda: [64, 32], description="run in this order")
    experiment: str = Field("qalora-sweep", description="MLflow experiment of the sweep's runs (one per variant)")
    report: str = Field("reports/accuracy.md", description="where `qalora sweep` writes the report (+ .png), "
                        "relative to the project dir")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"bits {bad} not supported; valid: {list(SUPPORTED_BITS)}")
        return v


class Params(_Section):
    name: str = "default"
    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams = Field(default_factory=DataParams)
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    check: CheckParams = Field(default_factory=CheckParams)
    benchmark: BenchmarkParams = Field(default_factory=BenchmarkParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    gate: GateParams = Field(default_factory=GateParams)
    export: ExportParams = Field(default_factory=ExportParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    sweep: SweepParams = Field(default_factory=SweepParams)


def _format_errors(err: ValidationError, origin: str) -> str:
    """One line: every offending key with what is wrong, ``; ``-separated."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        else:
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid params in {origin}: " + "; ".join(problems)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``tune.lr=2e-4`` -> (["tune", "lr"], 2e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. tune.lr=2e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"params file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(raw, dict):
            raise ParamsError(f"{path}: top level must be a mapping of sections")
        origin = str(path)
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, origin + (" + --set" if overrides else ""))) from None
