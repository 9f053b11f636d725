"""Tuning throughput on one GPU: qalora's QA-LoRA over a low-bit base vs PEFT LoRA (bf16) and PEFT
QLoRA-NF4 (bitsandbytes), same model shape, batches and optimizer, in one run; plus a GPU
reproducibility check of ``qalora.tune``. Writes one JSON.

    python benchmarks/tune_throughput.py --json $OUT/tune_throughput_h200.json
    python benchmarks/tune_throughput.py --smoke --json /tmp/smoke.json     # tiny shapes, CPU ok

Setup (every method): LLaMA-7B-shaped random-weight model (hidden 4096, intermediate 11008, 32
heads, vocab 32000), frozen float tensors in bf16, rank 64 (alpha 16, dropout 0.05) on all 7
projections, bf16 autocast, micro-batch 4 x 512 tokens (labels = inputs), AdamW (lr 2e-4) on the
adapter and grad-norm clipping at 1.0, as ``qalora.tune`` does. Configurations: 8 layers without
gradient checkpointing, 32 layers (the full 7B) with gradient checkpointing (non-reentrant).

- ``ours``: RTN W4 g128 ``LowBitLinear`` + ``QALoRALinear``, the base kept low-bit on the GPU
  (``dequant_cache=off``, what ``tune`` picks on CUDA): each layer dequantizes per call (one
  Triton kernel) and re-dequantizes in backward for the input gradient.
- ``ours-cached``: the same with ``dequant_cache=on`` (a resident bf16 copy of the base).
- ``peft-lora-bf16``: bf16 base, PEFT LoRA (fp32 adapter weights, PEFT's default).
- ``qlora-nf4``: bitsandbytes Linear4bit NF4, double quantization, bf16 compute, PEFT LoRA on it
  (no ``prepare_model_for_kbit_training``: it would upcast norms to fp32, slower and larger).

Figures: label tokens/s (labels != -100, as ``tune`` counts them) over timed steps after warm-up,
peak allocated GPU memory over those steps (model, optimizer state and activations included; the
build of the model is not), and MFU = useful FLOPs / time / 989 TFLOP/s (H100/H200 dense bf16
datasheet), the useful FLOPs being those of the frozen base's matmuls: 4 * N * tokens (forward 2N,
input gradient 2N; no weight gradient), N = the decoder's linear weights + lm_head.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet
TARGETS_VS_QLORA_SPEED = 1.3
TARGETS_VS_PEFT_SPEED = 1.0


def log(*a):
    print(*a, flush=True)


# --- environment ---------------------------------------------------------------------------------

def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            env[name] = f"not importable: {type(e).__name__}: {str(e)[:200]}"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
            env["nvidia_smi_query"] = q
            name, driver, mem = [s.strip() for s in q.splitlines()[0].split(",")]
            env.update(nvidia_smi_gpu=name, driver_version=driver, gpu_memory=mem)
            head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
            env["nvidia_smi_cuda_version"] = head.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in head else None
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi_error"] = repr(e)
    return env


# --- models --------------------------------------------------------------------------------------

def llama_config(layers: int, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                           tie_word_embeddings=False, use_cache=False)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)


def bf16_model(cfg, device):
    """Random-weight LLaMA, bf16, built on ``device`` (same seed: the same weights every time)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def base_matmul_params(cfg) -> int:
    """N: weights of the decoder's target linears + lm_head (the frozen matmuls each token runs)."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return n * per_layer + cfg.vocab_size * h


def build_ours(cfg, device, cache: str):
    from qalora.adapter import apply_qalora
    from qalora.quantizers.rtn import quantize_model_rtn
    from qalora.tune import set_dequant_cache

    model = bf16_model(cfg, device)
    quantize_model_rtn(model, 4, 128, TARGETS, progress=False)  # LowBitLinear: fp16 scales, fp32 zeros
    model.to(device)
    torch.manual_seed(0)
    layers = apply_qalora(model, 64, 16.0, 0.05, TARGETS)
    cached = set_dequant_cache(model, torch.device(device), cache)
    trainable = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    return model, trainable, {"dequant_cache": cached, "bits": 4, "group_size": 128, "quantizer": "rtn"}


def _peft(model):
    import peft
    from peft import LoraConfig, get_peft_model

    for name, mod in list(sys.modules.items()):  # no GPTQ layers here; skips a broken optional import
        if name.startswith("peft") and hasattr(mod, "is_gptqmodel_available"):
            mod.is_gptqmodel_available = lambda: False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype) for p in trainable})
    return model, trainable, {"peft": peft.__version__, "adapter_dtypes": dtypes}


def build_peft_lora(cfg, device):
    return _peft(bf16_model(cfg, device))


def build_qlora(cfg, device):
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit, Params4bit

    from qalora.model_io import find_linear_targets, set_submodule

    model = bf16_model(cfg, device)
    for name, lin in find_linear_targets(model, TARGETS).items():
        q = Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                       compress_statistics=True, quant_type="nf4", device="meta")
        w = Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q)
        q.weight = w._quantize(torch.device(device))
        set_submodule(model, name, q)
        del lin
    model.is_loaded_in_4bit = True
    gc.collect()
    torch.cuda.empty_cache()
    model, trainable, info = _peft(model)
    info.update(bitsandbytes=bnb.__version__, quant_type="nf4", double_quant=True, compute_dtype="bf16")
    return model, trainable, info


BUILDERS = {
    "ours": lambda cfg, dev: build_ours(cfg, dev, "off"),
    "ours-cached": lambda cfg, dev: build_ours(cfg, dev, "on"),
    "ours-jit-launch": lambda cfg, dev: build_ours(cfg, dev, "off"),  # Triton's JIT dispatcher every call
    "peft-lora-bf16": build_peft_lora,
    "qlora-nf4": build_qlora,
}


# --- one measurement -----------------------------------------------------------------------------

def measure(method: str, layers: int, checkpointing: bool, args, profile: bool = False) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = llama_config(layers, args.smoke)
    batch, seq = (2, 64) if args.smoke else (args.batch, args.seq)
    rec = {"method": method, "layers": layers, "gradient_checkpointing": checkpointing,
           "micro_batch": batch, "seq_len": seq, "device": device}
    cuda = device == "cuda"
    from qalora import lowbit

    lowbit.TRITON_FAST_LAUNCH = method != "ours-jit-launch"
    t_build = time.perf_counter()
    model, trainable, info = BUILDERS[method](cfg, device)
    rec.update(info)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    rec["build_s"] = round(time.perf_counter() - t_build, 1)
    rec["trainable_params"] = sum(p.numel() for p in trainable)
    n_base = base_matmul_params(cfg)
    rec["base_matmul_params"] = n_base

    g = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(4)]
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        rec["resident_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
        torch.cuda.reset_peak_memory_stats()

    def step(ids):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    warm, timed = (1, 2) if args.smoke else (args.warmup, args.steps)
    losses = []
    for i in range(warm):
        losses.append(float(step(batches[i % 4])))
    if cuda:
        torch.cuda.synchronize()
    times = []
    tokens = 0
    for i in range(timed):
        t0 = time.perf_counter()
        loss = step(batches[i % 4])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        tokens += int((batches[i % 4] != -100).sum())
    total = sum(times)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=acts) as prof:
            for i in range(2):
                step(batches[i % 4])
            if cuda:
                torch.cuda.synchronize()
        rec["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                                   row_limit=30, max_name_column_width=70)
    rec["step_ms_median"] = round(1e3 * sorted(times)[len(times) // 2], 2)
    rec["label_tokens_per_s"] = round(tokens / total, 1)
    rec["mfu"] = round(4 * n_base * tokens / total / (PEAK_BF16_TFLOPS * 1e12), 4)
    rec["losses"] = [round(x, 4) for x in losses]
    rec["finite"] = all(x == x and abs(x) < 1e4 for x in losses)
    if cuda:
        rec["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        rec["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
    if method.startswith("ours"):
        lowbits = [m for m in model.modules() if type(m).__name__ == "LowBitLinear"]
        rec["layers_holding_dequantized_weight"] = sum(m._cached is not None for m in lowbits)
        rec["triton_fast_launch"] = lowbit.TRITON_FAST_LAUNCH
    lowbit.TRITON_FAST_LAUNCH = True
    del model, opt, trainable, batches
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


# --- the dequant kernel: exactness and speed on a 7B-shaped weight -------------------------------

SWEEP = [(16, 512, 8), (32, 256, 4), (32, 128, 4), (16, 256, 4)]


def dequant_facts(smoke: bool = False) -> dict:
    """Bit-exactness of the Triton dequant vs the reference, and its speed on the 7B shapes (a
    sweep of tile shapes for int4; the runs use qalora's default tile)."""
    from qalora import lowbit

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"triton_available": bool(lowbit._triton_kernels()) and (dev == "cuda" or smoke)}
    if not out["triton_available"]:
        return out
    g = torch.Generator().manual_seed(0)
    shapes = [(256, 512), (512, 256)] if smoke else [(11008, 4096), (4096, 11008), (4096, 4096)]
    big = shapes[0]

    def make(bits, n, k):
        layer = lowbit.LowBitLinear(k, n, bits, 128)
        layer.set_quantized(torch.randint(0, 1 << bits, (n, k), generator=g),
                            torch.rand(n, k // 128, generator=g) * 0.02 + 0.001,
                            torch.rand(n, k // 128, generator=g) * ((1 << bits) - 1))
        return layer.to(dev)

    layers4 = [make(4, n, k) for n, k in shapes]
    sweep = {}
    for bn, bk, nw in SWEEP[:2] if smoke else SWEEP:
        try:
            us = [_time_us(lambda la=la: lowbit._triton_dequant(la.qweight, la.scales, la.zeros, 4, 128, torch.bfloat16,
                                                                 kernel="tiled", block_n=bn, block_k=bk,
                                                                 num_warps=nw)) for la in layers4]
            sweep[f"{bn}x{bk}w{nw}"] = {"us": us, "total_us": round(sum(us), 1)}
        except Exception as e:  # noqa: BLE001
            sweep[f"{bn}x{bk}w{nw}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["int4_tiled_sweep"] = sweep
    out["int4_element_us"] = [_time_us(lambda la=la: lowbit._triton_dequant(
        la.qweight, la.scales, la.zeros, 4, 128, torch.bfloat16, kernel="element", block_n=16, block_k=256,
        num_warps=4)) for la in layers4]
    ok = {k: v["total_us"] for k, v in sweep.items() if "total_us" in v}
    best = min(ok, key=ok.get)
    bn, rest = best.split("x")
    bk, nw = rest.split("w")
    out["sweep_best"] = {"block_n": int(bn), "block_k": int(bk), "num_warps": int(nw)}
    out["default_tile"] = dict(lowbit.TRITON_TILE)  # what the runs below use (qalora's shipped default)
    bw = {}
    for (n, k), la in zip(shapes, layers4):
        t = _time_us(lambda la=la: lowbit._triton_dequant(la.qweight, la.scales, la.zeros, 4, 128, torch.bfloat16))
        bw[f"{n}x{k}"] = {"us": t, "write_GBps": round(n * k * 2 / t / 1e3, 1)}
    out["int4_default_tile"] = bw
    for bits in (2, 3, 4, 8):
        la = make(bits, *big) if bits != 4 else layers4[0]
        ref = la.dequantized_weight()
        exact = {}
        for kernel in ("tiled", "element"):
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                ws = [lowbit._triton_dequant(la.qweight, la.scales, la.zeros, bits, 128, dt, kernel=kernel)
                      for _ in range(2)]  # JIT-compiled launch, then the direct relaunch
                exact[f"{kernel}/{str(dt).split('.')[-1]}"] = all(bool(torch.equal(w, ref.to(dt))) for w in ws)
        out[f"int{bits}"] = {"bit_identical_to_reference": exact, "shape": list(big),
                             "triton_us": _time_us(lambda: lowbit._triton_dequant(
                                 la.qweight, la.scales, la.zeros, bits, 128, torch.bfloat16)),
                             "reference_torch_us": _time_us(lambda: lowbit.dequantize_packed(
                                 la.qweight, la.scales, la.zeros, bits, 128, torch.bfloat16, use_triton=False))}
    out["fast_launch_after_checks"] = lowbit.TRITON_FAST_LAUNCH
    out["compiled_kernels_cached"] = len(lowbit._COMPILED)
    return out


def _time_us(fn, reps: int = 20) -> float:
    if not torch.cuda.is_available():  # (smoke test on CPU: the Triton interpreter)
        t0 = time.perf_counter()
        fn()
        return round((time.perf_counter() - t0) * 1e6, 1)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1e3 / reps, 1)


# --- reproducibility: the same tiny tune twice in one process ------------------------------------

def repro_worker(args) -> None:
    """Runs in a subprocess (so CUBLAS_WORKSPACE_CONFIG is set before CUDA starts): the same tune
    twice per model size; prints one JSON line."""
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_base, write_alpaca

    from qalora.config import TuneParams
    from qalora.tune import tune

    res = {"deterministic": args.deterministic, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
           "sizes": {}}
    sizes = {"tiny": dict(hidden=128, intermediate=256, layers=2, group_size=32),
             "small": dict(hidden=1024, intermediate=2816, layers=4, group_size=64)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_alpaca(tmp / "a.json", n=48)
        for name, kw in sizes.items():
            group = kw.pop("group_size")
            base = save_tiny_base(tmp / f"base-{name}", bits=4, group_size=group, seed=0, **kw)
            p = TuneParams(steps=args.repro_steps, lr=1e-3, warmup_steps=2, micro_batch_size=4, save_every=1000,
                           seed=0, gradient_checkpointing=name == "small")
            entry = {"params": {"steps": p.steps, "micro_batch_size": p.micro_batch_size, "dropout": p.dropout,
                                "gradient_checkpointing": p.gradient_checkpointing, "bits": 4, "group_size": group,
                                **kw}}
            try:
                hashes, manifests = [], []
                for run in range(2):
                    m = tune(base, data, tmp / f"ad-{name}-{run}", p, progress=False)
                    manifests.append(m)
                    hashes.append(hashlib.sha256((tmp / f"ad-{name}-{run}" / "adapter.safetensors").read_bytes())
                                  .hexdigest())
                entry.update(adapter_sha256=hashes, identical=hashes[0] == hashes[1],
                             compute=manifests[0].get("compute"),
                             final_loss=[m["metrics"]["final_loss"] for m in manifests])
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"[:1000]
            res["sizes"][name] = entry
    print("REPRO_JSON " + json.dumps(res), flush=True)


def reproducibility(args) -> dict:
    out = {}
    for det in (False, True):
        env = dict(os.environ)
        if det:
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        else:
            env.pop("CUBLAS_WORKSPACE_CONFIG", None)
        cmd = [sys.executable, __file__, "--repro-worker", "--repro-steps", str(args.repro_steps)] + \
            (["--deterministic"] if det else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.repro_timeout)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPRO_JSON ")]
        key = "deterministic" if det else "default"
        if line:
            out[key] = json.loads(line[-1][len("REPRO_JSON "):])
        else:
            out[key] = {"error": f"rc={proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    try:  # the same bytes with and without deterministic algorithms?
        for size in out["default"]["sizes"]:
            a = out["default"]["sizes"][size].get("adapter_sha256", [None])[0]
            b = out["deterministic"]["sizes"][size].get("adapter_sha256", [None])[0]
            out.setdefault("default_equals_deterministic", {})[size] = a is not None and a == b
    except (KeyError, TypeError):
        pass
    return out


# --- main ----------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    rows = ["| layers | GC | method | label tok/s | step ms | peak GB | MFU | trainable |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['layers']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['method']} | "
                        f"error: {r['error'][:80]} | | | | |")
            continue
        rows.append(f"| {r['layers']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['method']} | "
                    f"{r['label_tokens_per_s']:,.0f} | {r['step_ms_median']} | {r.get('peak_gb', '-')} | "
                    f"{100 * r['mfu']:.1f}% | {r['trainable_params'] / 1e6:.1f}M |")
    return "\n".join(rows)


def verdicts(results: list[dict]) -> list[dict]:
    out = []
    groups = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["layers"], r["gradient_checkpointing"]), {})[r["method"]] = r
    for (layers, gc_on), g in groups.items():
        ours = g.get("ours")
        if ours is None:
            continue
        v = {"layers": layers, "gradient_checkpointing": gc_on}
        if "qlora-nf4" in g:
            q = g["qlora-nf4"]
            v["speed_vs_qlora"] = round(ours["label_tokens_per_s"] / q["label_tokens_per_s"], 3)
            v["speed_vs_qlora_met"] = v["speed_vs_qlora"] >= TARGETS_VS_QLORA_SPEED
            if "peak_gb" in ours:
                v["peak_gb_minus_qlora"] = round(ours["peak_gb"] - q["peak_gb"], 3)
                v["peak_le_qlora_met"] = ours["peak_gb"] <= q["peak_gb"]
        if "peft-lora-bf16" in g:
            v["speed_vs_peft_lora"] = round(ours["label_tokens_per_s"] / g["peft-lora-bf16"]["label_tokens_per_s"], 3)
            v["speed_vs_peft_lora_met"] = v["speed_vs_peft_lora"] >= TARGETS_VS_PEFT_SPEED
        out.append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="output JSON (default $OUT/tune_throughput_h200.json or ./)")
    ap.add_argument("--configs", default="8:nogc:ours,ours-jit-launch,ours-cached,peft-lora-bf16,qlora-nf4;"
                                          "32:gc:ours,ours-cached,peft-lora-bf16,qlora-nf4",
                    help="LAYERS:gc|nogc:METHOD,... separated by ';'")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU-sized) to test the script")
    ap.add_argument("--profile-configs", default="", help="configs (as --configs) run after the others with 2 "
                    "more steps under torch.profiler (CUDA), tables in <json stem>_profile.txt")
    ap.add_argument("--no-repro", action="store_true")
    ap.add_argument("--no-dequant-facts", action="store_true")
    ap.add_argument("--repro-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repro-steps", type=int, default=10)
    ap.add_argument("--repro-timeout", type=int, default=300)
    args = ap.parse_args()
    if args.repro_worker:
        repro_worker(args)
        return
    path = Path(args.json or Path(os.environ.get("OUT", ".")) / "tune_throughput_h200.json")
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "environment": environment(),
              "setup": {"batch": args.batch, "seq": args.seq, "rank": 64, "alpha": 16, "dropout": 0.05,
                        "targets": TARGETS, "autocast": "bf16", "frozen_float_dtype": "bf16", "optimizer": "AdamW lr 2e-4",
                        "grad_clip": 1.0, "warmup_steps": args.warmup, "timed_steps": args.steps,
                        "peak_tflops_for_mfu": PEAK_BF16_TFLOPS, "smoke": args.smoke},
              "runs": [], "profile_runs": []}

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))

    log(json.dumps(result["environment"]))
    if (torch.cuda.is_available() or args.smoke) and not args.no_dequant_facts:
        try:
            result["dequant_kernel"] = dequant_facts(args.smoke)
        except Exception as e:  # noqa: BLE001
            result["dequant_kernel"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        log("dequant:", json.dumps(result["dequant_kernel"]))
        save()
    specs = [(spec, False) for spec in args.configs.split(";") if spec]
    specs += [(spec, True) for spec in args.profile_configs.split(";") if spec]
    for spec, profile in specs:
        layers, gc_mode, methods = spec.split(":")
        for method in methods.split(","):
            t0 = time.perf_counter()
            try:
                rec = measure(method, int(layers), gc_mode == "gc", args, profile)
            except Exception as e:  # noqa: BLE001
                rec = {"method": method, "layers": int(layers), "gradient_checkpointing": gc_mode == "gc",
                       "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            rec["profiled"] = profile
            result["profile_runs" if profile else "runs"].append(rec)
            if "profile" in rec:
                prof_path = path.with_name(path.stem + "_profile.txt")
                with prof_path.open("a") as f:
                    f.write(f"\n=== {method} layers={layers} {gc_mode} ===\n{rec.pop('profile')}\n")
            log(json.dumps({k: v for k, v in rec.items() if k not in ("losses", "trace")}))
            save()
    result["targets"] = verdicts(result["runs"])
    save()
    if not args.no_repro:
        t0 = time.perf_counter()
        result["reproducibility"] = reproducibility(args)
        result["reproducibility"]["wall_s"] = round(time.perf_counter() - t0, 1)
        save()
        log("repro:", json.dumps(result["reproducibility"]))
    log(table(result["runs"]))
    log(json.dumps(result["targets"]))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
