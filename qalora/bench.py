"""The benchmark: decode and prefill speed of a low-bit model against the same weights in fp16/bf16,
measured in one run on the current device.

GPU (CUDA + Triton): the static decoder of :mod:`qalora.decoder` over the low-bit weights, then over
the same weights dequantized (``dense``: fused Triton GEMV twin; ``dense_cublas``: cuBLAS). One
decode step is captured in a CUDA graph and replayed, so the loop is not launch-bound. The ratio uses
the faster of the two dense variants. Prefill (batch 1) is graph-captured too and uses the large-M
path for the low-bit model, cuBLAS for the dense one, SDPA attention in both.

CPU (no CUDA): the same figures from transformers' own forward (HF cache, no graphs) with
``prepare_for_inference`` kernels against fp32 weights; small models only.

The pipeline's benchmark stage is :func:`benchmark_to_folder` (``bench.json`` + manifest); the
``qalora bench`` command line is registered by the CLI (``qalora_pipeline.cli``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from qalora.checkpoint import folder_input, load_lowbit_model
from qalora.config import BenchmarkParams
from qalora.decoder import SYNTHETIC, PROJ, Source, StaticDecoder, capture_graph, model_source, synthetic_source
from qalora.device import DTYPES, dtype_name, resolve_device
from qalora.figures import bench_figures
from qalora.kernels import prepare_for_inference
from qalora.lowbit import LowBitLinear
from qalora.manifest import atomic_output_dir, write_json_atomic, write_manifest
from qalora.model_io import UnsupportedModelError, set_submodule
from qalora.quantizers.rtn import quantize_model_rtn

RESULT = "bench.json"
# ``qalora bench`` defaults (the pipeline's come from params: benchmark.*).
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_PREFILLS = (512, 2048)
DEFAULT_CONTEXT = 128
DEFAULT_STEPS = 64
DEFAULT_REPS = 5


# ----------------------------------------------------------------------------------------------
# GPU: the static decoder, CUDA-graph timed


def time_decode(hn: StaticDecoder, batch: int, context: int, steps: int, reps: int) -> dict[str, float]:
    """Median over ``reps`` runs of ``steps`` graph replays, each run from position ``context``
    (KV cache prefilled with random values)."""
    hn.alloc(batch, context + steps + 8)
    for k, v in zip(hn.kc, hn.vc):
        k.normal_()
        v.normal_()
    hn.tok.random_(0, hn.arch.vocab)
    hn.pos.fill_(context)
    g = capture_graph(hn.decode_step)
    times = []
    for _ in range(reps):
        hn.pos.fill_(context)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(steps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / steps)
    del g
    ms = statistics.median(times)
    hn.free()
    return {"ms_per_step": ms, "tokens_per_s": batch * 1000.0 / ms, "ms_per_token": ms / batch,
            "spread_ms": max(times) - min(times)}


def time_prefill(hn: StaticDecoder, tokens: int, reps: int) -> float:
    """Median ms of a graph-captured batch-1 prefill of ``tokens`` tokens."""
    hn.alloc(1, tokens)
    ids = torch.randint(0, hn.arch.vocab, (tokens,), device=hn.embed.device)
    g = capture_graph(lambda: hn.prefill(ids), warmup=1)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    del g
    hn.free()
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), median of 10."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    del a, b
    return nbytes / statistics.median(times) / 1e6


def bench_gpu_source(src: Source, batches: list[int], prefills: list[int], dtype: torch.dtype,
                     dense: str = "both", context: int = 128, steps: int = 64, reps: int = 5,
                     log=print) -> dict[str, Any]:
    """Benchmark ``src`` low-bit, then dense (the same weights dequantized), in this process."""
    bw = copy_bandwidth()
    out: dict[str, Any] = {"copy_bandwidth_GBps": bw, "context": context, "steps": steps, "reps": reps}
    modes = ["lowbit"] + {"both": ["dense", "dense_cublas"], "triton": ["dense"], "cublas": ["dense_cublas"],
                          "none": []}[dense]
    for mode in modes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        hn = StaticDecoder(src, mode, dtype)
        res: dict[str, Any] = {"build_s": time.perf_counter() - t0,
                               "weight_GiB": (torch.cuda.memory_allocated() - base) / 2**30,
                               "bytes_per_step": hn.weight_bytes()}
        res["hbm_floor_tokens_per_s_b1"] = bw * 1e9 / res["bytes_per_step"]
        res["decode"] = {}
        for b in batches:
            r = time_decode(hn, b, context, steps, reps)
            res["decode"][str(b)] = r
            log(f"[bench] {mode:12s} decode b={b:<3d} {r['tokens_per_s']:9.1f} tok/s  {r['ms_per_step']:.3f} ms/step")
        res["prefill_ms"] = {}
        if mode != "dense_cublas":  # prefill is cuBLAS in both dense variants: time it once
            for t in prefills:
                res["prefill_ms"][str(t)] = ms = time_prefill(hn, t, reps)
                log(f"[bench] {mode:12s} prefill {t:5d} tok {ms:9.2f} ms")
        res["peak_memory_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        res["hbm_floor_fraction_b1"] = res["decode"].get("1", {}).get("tokens_per_s", math.nan) / res["hbm_floor_tokens_per_s_b1"]
        out[mode] = res
        del hn
    if len(modes) > 1:
        dense_modes = [m for m in modes if m != "lowbit"]
        ratio: dict[str, Any] = {"decode": {}, "prefill": {}}
        for b in batches:
            best = max(out[m]["decode"][str(b)]["tokens_per_s"] for m in dense_modes)
            ratio["decode"][str(b)] = out["lowbit"]["decode"][str(b)]["tokens_per_s"] / best
        pre = next((out[m]["prefill_ms"] for m in dense_modes if out[m]["prefill_ms"]), {})
        for t in prefills:
            if str(t) in pre:
                ratio["prefill"][str(t)] = pre[str(t)] / out["lowbit"]["prefill_ms"][str(t)]
        ratio["memory"] = out[dense_modes[0]]["peak_memory_GiB"] / out["lowbit"]["peak_memory_GiB"]
        out["ratio_lowbit_over_dense"] = ratio
        log(f"[bench] speedup vs best dense: decode {ratio['decode']}, prefill {ratio['prefill']}")
    return out


# ----------------------------------------------------------------------------------------------
# transformers forward: the CPU path, and the GPU path of blocks the static decoder does not run


def _time(fn, reps: int, sync=lambda: None) -> float:
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


@torch.no_grad()
def dense_(model: Any, dtype: torch.dtype) -> Any:
    """Replace (in place) every ``LowBitLinear`` of ``model`` by an ``nn.Linear`` on its device holding its
    dequantized weight and bias in ``dtype``: the same weights, dense (the benchmarks' and evaluations'
    full-precision reference). Returns the model."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowBitLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  device=mod.qweight.device, dtype=dtype)
            lin.weight.data = mod.dequantized_weight().to(dtype)
            if mod.bias is not None:
                lin.bias.data = mod.bias.to(dtype)
            set_submodule(model, name, lin)
    return model


@torch.no_grad()
def bench_hf_model(model: Any, batches: list[int], prefills: list[int], steps: int = 8, reps: int = 3,
                   log=print) -> dict[str, Any]:
    """Figures for a transformers model with LowBitLinear layers, on the model's device, through
    transformers' own forward (KV cache): our prepared kernels (``lowbit``) vs the same weights
    dequantized into dense ``nn.Linear`` layers (``dense``), in the dtype of the model's float tensors."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"steps": steps, "reps": reps, "device": str(device),
                           "dtype": str(dtype).removeprefix("torch.")}
    dense = dense_(copy.deepcopy(model), dtype)
    fast = prepare_for_inference(copy.deepcopy(model))
    vocab = model.config.vocab_size
    for mode, m in (("lowbit", fast), ("dense", dense)):
        res: dict[str, Any] = {"decode": {}, "prefill_ms": {}}
        for b in batches:
            ids = torch.randint(0, vocab, (b, 8), device=device)

            def run() -> None:
                pkv = None
                x = ids
                for _ in range(steps):
                    o = m(input_ids=x, past_key_values=pkv, use_cache=True)
                    pkv, x = o.past_key_values, o.logits[:, -1:].argmax(-1)

            run()  # warm-up: kernel compilation, allocator
            ms = _time(run, reps, sync) / steps
            res["decode"][str(b)] = {"ms_per_step": ms, "tokens_per_s": b * 1000 / ms, "ms_per_token": ms / b}
            log(f"[bench] {device.type} {mode:6s} decode b={b} {b * 1000 / ms:.1f} tok/s")
        for t in prefills:
            ids = torch.randint(0, vocab, (1, t), device=device)
            res["prefill_ms"][str(t)] = _time(lambda: m(input_ids=ids, use_cache=False), reps, sync)
        out[mode] = res
    out["ratio_lowbit_over_dense"] = {
        "decode": {b: out["lowbit"]["decode"][b]["tokens_per_s"] / out["dense"]["decode"][b]["tokens_per_s"]
                   for b in out["lowbit"]["decode"]},
        "prefill": {t: out["dense"]["prefill_ms"][t] / out["lowbit"]["prefill_ms"][t] for t in out["lowbit"]["prefill_ms"]},
    }
    return out


# ----------------------------------------------------------------------------------------------
# entry points


def _env() -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device"] = "cpu"
    return env


def run_bench(
    model: str | Path | None = None,
    synthetic: str | None = None,
    bits: int = 4,
    group_size: int = 128,
    batches: list[int] | tuple[int, ...] = DEFAULT_BATCHES,
    prefills: list[int] | tuple[int, ...] = DEFAULT_PREFILLS,
    dtype: str = "bfloat16",
    dense: str = "both",
    context: int = DEFAULT_CONTEXT,
    steps: int = DEFAULT_STEPS,
    reps: int = DEFAULT_REPS,
    device: str | None = None,
    log=print,
) -> dict[str, Any]:
    """The benchmark: returns a JSON-able dict (figures per model variant, ratios, environment).

    ``model``: a low-bit folder (``qalora.checkpoint``); or ``synthetic``: a name in ``SYNTHETIC``
    (:mod:`qalora.decoder`) with random weights at ``bits``/``group_size``. Runs the static decoder on
    CUDA (needs triton), else the CPU fallback (model folders or the "tiny" synthetic only).
    """
    if (model is None) == (synthetic is None):
        raise ValueError("pass exactly one of model / synthetic")
    device = resolve_device(device)
    dt = DTYPES[dtype_name(dtype)]
    if dt not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype!r}: the benchmark compares against fp16/bf16 (valid: bfloat16, float16)")
    out: dict[str, Any] = {"env": _env(), "dtype": str(dt).replace("torch.", ""), "batches": list(batches),
                           "prefill_tokens": list(prefills)}
    if device == "cuda":
        from qalora.kernels import cuda_kernels_available, triton_available

        if not (triton_available() and cuda_kernels_available()):
            raise RuntimeError("the GPU benchmark needs triton and a CUDA compiler")
        dev = torch.device("cuda")
        if synthetic is not None:
            if synthetic not in SYNTHETIC:
                raise ValueError(f"unknown synthetic model {synthetic!r}; valid: {', '.join(SYNTHETIC)}")
            src = synthetic_source(synthetic, bits, group_size, dev, dt)
            out["model"] = {"synthetic": synthetic, "bits": bits, "group_size": group_size, **SYNTHETIC[synthetic]}
        else:
            m, _, quant = load_lowbit_model(model, dtype=torch.float32, device="cpu")
            lay = next(iter(quant["layers"].values()))
            out["model"] = {"path": str(model), "model_type": m.config.model_type, "bits": lay["bits"],
                            "group_size": lay["group_size"]}
            try:
                src = model_source(m, dev, dt)
            except UnsupportedModelError as e:
                # Not a LLaMA-layout block: timed through transformers' forward with our kernels instead.
                del m
                m, _, _ = load_lowbit_model(model, dtype=dt, device=dev)
                out.update(harness="transformers", harness_reason=str(e).split(":")[0] + ": not LLaMA-layout")
                out.update(bench_hf_model(m, list(batches), list(prefills), steps=min(steps, 16), reps=reps, log=log))
                return out
            del m
        out["harness"] = "static-decoder"
        with torch.no_grad():
            out.update(bench_gpu_source(src, list(batches), list(prefills), dt, dense, context, steps, reps, log))
        return out
    if synthetic is not None and synthetic != "tiny":
        raise ValueError("on CPU only --synthetic tiny or --model DIR are supported")
    if synthetic is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        c = SYNTHETIC["tiny"]
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                         num_key_value_heads=c["kv_heads"])).eval()
        quantize_model_rtn(m, bits, group_size, PROJ, progress=False)
        out["model"] = {"synthetic": "tiny", "bits": bits, "group_size": group_size}
    else:
        m, _, quant = load_lowbit_model(model, dtype=torch.float32, device="cpu")
        out["model"] = {"path": str(model)}
    out["harness"] = "transformers"
    out.update(bench_hf_model(m, list(batches), list(prefills), steps=min(steps, 8), reps=min(reps, 3), log=log))
    return out


def benchmark_to_folder(merged_dir: str | Path, out: str | Path, params: BenchmarkParams,
                        device: str | None = None) -> dict[str, Any]:
    """The benchmark stage: :func:`run_bench` on ``merged_dir`` (fp16 dense baseline) with the params'
    batch sizes, prefill lengths and decode steps; writes ``bench.json`` and the manifest (metrics: the
    figures of :func:`qalora.figures.bench_figures`) atomically to ``out``. ``device`` overrides
    ``params.device``. Returns the manifest."""
    device = resolve_device(device or params.device, key="benchmark.device")
    result = run_bench(model=merged_dir, batches=params.batch_sizes, prefills=params.prefill_lengths,
                       steps=params.decode_tokens, device=device, dtype="fp16")
    with atomic_output_dir(out, "benchmark") as tmp:
        write_json_atomic(tmp / RESULT, result)
        return write_manifest(tmp, "benchmark", params.model_dump(), inputs={"merged": folder_input(merged_dir)},
                              extra={"metrics": bench_figures(result), "device": device})
