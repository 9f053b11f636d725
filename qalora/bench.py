"""``qalora bench``: decode and prefill speed of a low-bit model against the same weights in
fp16/bf16, measured in one run on the current device.

GPU (CUDA + Triton): a lean LLaMA decoder (embedding, 32x {RMSNorm, fused QKV, RoPE + KV-cache
attention, O, RMSNorm, fused gate|up, SiLU*up, down}, final norm, lm_head) with a static KV cache;
one decode step is captured in a CUDA graph and replayed, so the loop is not launch-bound. The
low-bit model and the dense model run the same harness; only the linear layers differ:

- ``lowbit``: the CUDA tile kernels with RMSNorm (prologue), SiLU(gate)*up (epilogue of the
  gate|up kernel) and the residual add fused into them;
- ``dense``: the same fusions in a Triton fp16/bf16 GEMV twin (``dense_gemv``);
- ``dense_cublas``: cuBLAS matmuls plus separate norm/act/add kernels.

The ratio uses the faster of the two dense variants. Prefill (batch 1) is graph-captured too and
uses the large-M path for the low-bit model, cuBLAS for the dense one, SDPA attention in both.

CPU (no CUDA): the same figures from transformers' own forward (HF cache, no graphs) with
``prepare_for_inference`` kernels against fp32 weights; small models only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qalora.lowbit import LowBitLinear, dequantize, unpack_codes

SYNTHETIC: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                     rope_theta=10000.0, eps=1e-6),
    "llama-13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000,
                      rope_theta=10000.0, eps=1e-6),
    "tiny": dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=512,
                 rope_theta=10000.0, eps=1e-6),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    eps: float
    inv_freq: torch.Tensor  # fp32 [head_dim / 2]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class Canon:
    """Canonical buffers of one (possibly stacked) low-bit weight."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @staticmethod
    def cat(parts: list["Canon"]) -> "Canon":
        p = parts[0]
        return Canon(torch.cat([c.qweight for c in parts]), torch.cat([c.scales for c in parts]),
                     torch.cat([c.zeros for c in parts]), p.bits, p.group_size, p.in_features)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(unpack_codes(self.qweight, self.bits), self.scales, self.zeros, self.group_size).to(dtype)


@dataclass
class Source:
    """A LLaMA-style model as canonical low-bit projections plus its dense parts."""

    arch: Arch
    embed: torch.Tensor  # [V, D]
    lm_head: torch.Tensor  # [V, D]
    final_norm: torch.Tensor  # [D]
    norms: list[tuple[torch.Tensor, torch.Tensor]]  # (input_layernorm, post_attention_layernorm)
    qkv: list[Canon]
    o: list[Canon]
    gate_up: list[Canon]
    down: list[Canon]
    meta: dict[str, Any] = field(default_factory=dict)


def _rand_canon(n: int, k: int, bits: int, g: int, device: torch.device, gen: torch.Generator) -> Canon:
    q = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, device=device, generator=gen)
    s = (torch.rand(n, k // g, device=device, generator=gen) * 0.004 + 0.001).to(torch.float16)
    z = torch.rand(n, k // g, device=device, generator=gen) * ((1 << bits) - 1)
    return Canon(q, s, z, bits, g, k)


def synthetic_source(name: str, bits: int, group_size: int, device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> Source:
    """Random weights with the named shapes (uniform random codes, realistic scale magnitudes)."""
    c = SYNTHETIC[name]
    gen = torch.Generator(device=device).manual_seed(seed)
    d, f, h, hk = c["hidden"], c["intermediate"], c["heads"], c["kv_heads"]
    dh = d // h
    arch = Arch(d, f, c["layers"], h, hk, c["vocab"], c["eps"],
                1.0 / c["rope_theta"] ** (torch.arange(0, dh, 2, dtype=torch.float32, device=device) / dh))
    src = Source(arch, (torch.randn(c["vocab"], d, device=device, generator=gen) * 0.02).to(dtype),
                 (torch.randn(c["vocab"], d, device=device, generator=gen) * 0.02).to(dtype),
                 torch.ones(d, device=device), [], [], [], [], [], meta={"synthetic": name})
    for _ in range(c["layers"]):
        src.norms.append((1 + 0.1 * torch.randn(d, device=device, generator=gen),
                          1 + 0.1 * torch.randn(d, device=device, generator=gen)))
        src.qkv.append(_rand_canon((h + 2 * hk) * dh, d, bits, group_size, device, gen))
        src.o.append(_rand_canon(d, d, bits, group_size, device, gen))
        src.gate_up.append(_rand_canon(2 * f, d, bits, group_size, device, gen))
        src.down.append(_rand_canon(d, f, bits, group_size, device, gen))
    return src


def _canon(layer: Any, name: str) -> Canon:
    if not isinstance(layer, LowBitLinear):
        raise ValueError(f"{name} is {type(layer).__name__}, not a LowBitLinear: bench needs all 7 projections quantized")
    if layer.bias is not None:
        raise ValueError(f"{name} has a bias: the GPU harness supports LLaMA-style bias-free projections")
    return Canon(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)


def model_source(model: Any, device: torch.device, dtype: torch.dtype) -> Source:
    """A transformers LLaMA-style model whose 7 projections are LowBitLinear."""
    cfg = model.config
    inner = model.model
    rot = inner.rotary_emb
    if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
        raise ValueError("rope attention scaling != 1 is not supported by the bench harness")
    d = cfg.hidden_size
    hk = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    arch = Arch(d, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, hk, cfg.vocab_size,
                float(cfg.rms_norm_eps), rot.inv_freq.detach().float().to(device))
    if getattr(cfg, "head_dim", None) not in (None, d // cfg.num_attention_heads):
        raise ValueError("head_dim != hidden/heads is not supported by the bench harness")
    src = Source(arch, inner.embed_tokens.weight.detach().to(device, dtype), model.lm_head.weight.detach().to(device, dtype),
                 inner.norm.weight.detach().float().to(device), [], [], [], [], [])
    for i, blk in enumerate(inner.layers):
        at, mlp = blk.self_attn, blk.mlp
        mv = lambda c: Canon(c.qweight.to(device), c.scales.to(device), c.zeros.to(device), c.bits, c.group_size,  # noqa: E731
                             c.in_features)
        src.norms.append((blk.input_layernorm.weight.detach().float().to(device),
                          blk.post_attention_layernorm.weight.detach().float().to(device)))
        src.qkv.append(mv(Canon.cat([_canon(getattr(at, p), f"layers.{i}.{p}") for p in PROJ[:3]])))
        src.o.append(mv(_canon(at.o_proj, f"layers.{i}.o_proj")))
        src.gate_up.append(mv(Canon.cat([_canon(getattr(mlp, p), f"layers.{i}.{p}") for p in PROJ[4:6]])))
        src.down.append(mv(_canon(mlp.down_proj, f"layers.{i}.down_proj")))
    return src


# ----------------------------------------------------------------------------------------------
# GPU harness


class Harness:
    """A static-shape LLaMA decoder over one weight format (``mode``: lowbit, dense, dense_cublas)."""

    def __init__(self, src: Source, mode: str, dtype: torch.dtype) -> None:
        from qalora.kernels.prepared import prepare_weight

        self.mode, self.dtype, self.arch = mode, dtype, src.arch
        a = src.arch
        dev = src.embed.device
        self.lowbit = mode == "lowbit"
        self.embed = src.embed.clone()  # own copies: the harness's memory is self-contained
        self.lm_head = src.lm_head.clone()
        self.final_norm = src.final_norm.clone()
        self.layers: list[dict[str, Any]] = []
        for i in range(a.layers):
            ln1, ln2 = src.norms[i]
            lay: dict[str, Any] = {"ln1": ln1.clone(), "ln2": ln2.clone()}
            if self.lowbit:
                for key in ("qkv", "o", "gate_up", "down"):
                    c = getattr(src, key)[i]
                    pw = prepare_weight(c.qweight, c.scales, c.zeros, c.bits, c.group_size, c.in_features,
                                        glu=key == "gate_up")  # gate|up emits silu(gate) * up
                    pw.drop_canonical()  # the kernels never read the canonical copies
                    lay[key] = pw
            else:
                for key in ("qkv", "o", "gate_up", "down"):
                    lay[key] = getattr(src, key)[i].dense(dtype)
            self.layers.append(lay)
        self.batch = 0

    def weight_bytes(self) -> int:
        """Bytes one decode step must read: every projection, the lm_head, one embedding row."""
        n = self.lm_head.numel() * self.lm_head.element_size()
        for lay in self.layers:
            for key in ("qkv", "o", "gate_up", "down"):
                w = lay[key]
                n += w.nbytes() if self.lowbit else w.numel() * w.element_size()
            n += 2 * lay["ln1"].numel() * 4
        return n

    def alloc(self, batch: int, max_seq: int) -> None:
        a, dev, dt = self.arch, self.embed.device, self.dtype
        self.batch, self.max_seq = batch, max_seq
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
        self.h = torch.zeros(batch, a.hidden, device=dev)
        self.qkv = torch.empty(batch, (a.heads + 2 * a.kv_heads) * a.head_dim, device=dev, dtype=dt)
        self.attn = torch.empty(batch, a.hidden, device=dev, dtype=dt)
        self.gu = torch.empty(batch, 2 * a.intermediate, device=dev, dtype=dt)
        self.xn = torch.empty(batch, a.hidden, device=dev, dtype=dt)
        self.act = torch.empty(batch, a.intermediate, device=dev, dtype=dt)
        self.o = torch.empty(batch, a.hidden, device=dev, dtype=dt)
        self.logits = torch.empty(batch, a.vocab, device=dev, dtype=dt)
        self.kc = [torch.empty(batch, a.kv_heads, max_seq, a.head_dim, device=dev, dtype=dt) for _ in self.layers]
        self.vc = [torch.empty_like(k) for k in self.kc]

    def free(self) -> None:
        for name in ("tok", "pos", "h", "qkv", "attn", "gu", "xn", "act", "o", "logits", "kc", "vc"):
            setattr(self, name, None)

    def decode_step(self) -> None:
        """Embed ``self.tok``, run all layers at position ``self.pos``, write the argmax to
        ``self.tok`` and the logits to ``self.logits``; pos += 1. Graph-capturable."""
        from qalora.kernels import gpu
        from qalora.kernels.triton_decode import attn_decode, rmsnorm, silu_mul

        a, dt = self.arch, self.dtype
        self.h.copy_(self.embed[self.tok])
        for i, lay in enumerate(self.layers):
            if self.mode == "lowbit":
                gpu.gemv(self.h, lay["qkv"], out=self.qkv, norm_weight=lay["ln1"], eps=a.eps, dtype=dt)
            elif self.mode == "dense":
                gpu.dense_gemv(self.h, lay["qkv"], out=self.qkv, norm_weight=lay["ln1"], eps=a.eps)
            else:
                rmsnorm(self.h, lay["ln1"], a.eps, self.xn)
                torch.matmul(self.xn, lay["qkv"].t(), out=self.qkv)
            attn_decode(self.qkv, self.kc[i], self.vc[i], self.attn, self.pos, a.inv_freq, a.heads, a.kv_heads)
            if self.mode == "lowbit":
                gpu.gemv(self.attn, lay["o"], out=self.h, accumulate=True)
                gpu.gemv(self.h, lay["gate_up"], out=self.act, norm_weight=lay["ln2"], eps=a.eps, dtype=dt)
                gpu.gemv(self.act, lay["down"], out=self.h, accumulate=True)
            elif self.mode == "dense":
                gpu.dense_gemv(self.attn, lay["o"], out=self.h, accumulate=True)
                gpu.dense_gemv(self.h, lay["gate_up"], out=self.gu, norm_weight=lay["ln2"], eps=a.eps)
                gpu.dense_gemv(self.gu, lay["down"], out=self.h, accumulate=True, act=True)
            else:
                torch.matmul(self.attn, lay["o"].t(), out=self.o)
                self.h.add_(self.o)
                rmsnorm(self.h, lay["ln2"], a.eps, self.xn)
                torch.matmul(self.xn, lay["gate_up"].t(), out=self.gu)
                silu_mul(self.gu, self.act)
                torch.matmul(self.act, lay["down"].t(), out=self.o)
                self.h.add_(self.o)
        rmsnorm(self.h, self.final_norm, a.eps, self.xn)
        torch.matmul(self.xn, self.lm_head.t(), out=self.logits)
        torch.argmax(self.logits, dim=-1, out=self.tok)
        self.pos.add_(1)

    def _linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        if self.lowbit:
            from qalora.kernels import gpu

            return gpu.matmul(x, w)
        return F.linear(x, w)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Batch-1 prompt ``ids`` [T] from position 0: fills the KV cache (batch row 0), returns
        the last position's logits [V]. Graph-capturable."""
        from qalora.kernels.triton_decode import rmsnorm, silu_mul

        a, dt = self.arch, self.dtype
        t = ids.shape[0]
        dh, half = a.head_dim, a.head_dim // 2
        ang = torch.arange(t, device=ids.device, dtype=torch.float32)[:, None] * a.inv_freq[None, :]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        h = self.embed[ids].float()
        xn = torch.empty(t, a.hidden, device=ids.device, dtype=dt)
        act = torch.empty(t, a.intermediate, device=ids.device, dtype=dt)

        def rope(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., :half].float(), x[..., half:].float()
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(dt)

        for i, lay in enumerate(self.layers):
            rmsnorm(h, lay["ln1"], a.eps, xn)
            qkv = self._linear(xn, lay["qkv"])
            q = rope(qkv[:, : a.heads * dh].view(t, a.heads, dh))
            k = rope(qkv[:, a.heads * dh:(a.heads + a.kv_heads) * dh].view(t, a.kv_heads, dh))
            v = qkv[:, (a.heads + a.kv_heads) * dh:].view(t, a.kv_heads, dh)
            self.kc[i][0, :, :t].copy_(k.transpose(0, 1))
            self.vc[i][0, :, :t].copy_(v.transpose(0, 1))
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=True,
                                               enable_gqa=a.heads != a.kv_heads)
            h += self._linear(o[0].transpose(0, 1).reshape(t, a.hidden), lay["o"])
            rmsnorm(h, lay["ln2"], a.eps, xn)
            if self.lowbit:
                act = self._linear(xn, lay["gate_up"])  # glu weight: silu(gate) * up
            else:
                silu_mul(self._linear(xn, lay["gate_up"]), act)
            h += self._linear(act, lay["down"])
        hn = torch.empty(1, a.hidden, device=ids.device, dtype=dt)
        rmsnorm(h[-1:], self.final_norm, a.eps, hn)
        return (hn @ self.lm_head.t())[0]


def _graph(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_decode(hn: Harness, batch: int, context: int, steps: int, reps: int) -> dict[str, float]:
    """Median over ``reps`` runs of ``steps`` graph replays, each run from position ``context``
    (KV cache prefilled with random values)."""
    hn.alloc(batch, context + steps + 8)
    for k, v in zip(hn.kc, hn.vc):
        k.normal_()
        v.normal_()
    hn.tok.random_(0, hn.arch.vocab)
    hn.pos.fill_(context)
    g = _graph(hn.decode_step)
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


def time_prefill(hn: Harness, tokens: int, reps: int) -> float:
    """Median ms of a graph-captured batch-1 prefill of ``tokens`` tokens."""
    hn.alloc(1, tokens)
    ids = torch.randint(0, hn.arch.vocab, (tokens,), device=hn.embed.device)
    g = _graph(lambda: hn.prefill(ids), warmup=1)
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
        hn = Harness(src, mode, dtype)
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
# CPU fallback (transformers forward)


def _time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


@torch.no_grad()
def bench_cpu_model(model: Any, batches: list[int], prefills: list[int], steps: int = 8, reps: int = 3,
                    log=print) -> dict[str, Any]:
    """CPU figures for a transformers model with LowBitLinear layers: prepared kernels vs fp32."""
    import copy

    from qalora.kernels import prepare_for_inference

    out: dict[str, Any] = {"steps": steps, "reps": reps}
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, LowBitLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantized_weight()
            if mod.bias is not None:
                lin.bias.data = mod.bias.float()
            from qalora.model_io import set_submodule

            set_submodule(dense, name, lin)
    fast = prepare_for_inference(copy.deepcopy(model))
    vocab = model.config.vocab_size
    for mode, m in (("lowbit", fast), ("dense", dense)):
        res: dict[str, Any] = {"decode": {}, "prefill_ms": {}}
        for b in batches:
            ids = torch.randint(0, vocab, (b, 8))

            def run() -> None:
                pkv = None
                x = ids
                for _ in range(steps):
                    o = m(input_ids=x, past_key_values=pkv, use_cache=True)
                    pkv, x = o.past_key_values, o.logits[:, -1:].argmax(-1)

            ms = _time(run, reps) / steps
            res["decode"][str(b)] = {"ms_per_step": ms, "tokens_per_s": b * 1000 / ms, "ms_per_token": ms / b}
            log(f"[bench] cpu {mode:6s} decode b={b} {b * 1000 / ms:.1f} tok/s")
        for t in prefills:
            ids = torch.randint(0, vocab, (1, t))
            res["prefill_ms"][str(t)] = _time(lambda: m(input_ids=ids, use_cache=False), reps)
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
    batches: list[int] | tuple[int, ...] = (1, 8, 32),
    prefills: list[int] | tuple[int, ...] = (512, 2048),
    dtype: str = "bfloat16",
    dense: str = "both",
    context: int = 128,
    steps: int = 64,
    reps: int = 5,
    device: str | None = None,
    log=print,
) -> dict[str, Any]:
    """The benchmark: returns a JSON-able dict (figures per model variant, ratios, environment).

    ``model``: a low-bit folder (``qalora.checkpoint``); or ``synthetic``: a name in
    ``SYNTHETIC`` with random weights at ``bits``/``group_size``. Runs the GPU harness on CUDA
    (needs triton), else the CPU fallback (model folders or the "tiny" synthetic only).
    """
    if (model is None) == (synthetic is None):
        raise ValueError("pass exactly one of model / synthetic")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
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
            from qalora.checkpoint import load_lowbit_model

            m, _, quant = load_lowbit_model(model, dtype=torch.float32, device="cpu")
            src = model_source(m, dev, dt)
            del m
            lay = next(iter(quant["layers"].values()))
            out["model"] = {"path": str(model), "bits": lay["bits"], "group_size": lay["group_size"]}
        with torch.no_grad():
            out.update(bench_gpu_source(src, list(batches), list(prefills), dt, dense, context, steps, reps, log))
        return out
    if synthetic is not None and synthetic != "tiny":
        raise ValueError("on CPU only --synthetic tiny or --model DIR are supported")
    if synthetic is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from qalora.quantize import quantize_model_rtn

        c = SYNTHETIC["tiny"]
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                                         num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                         num_key_value_heads=c["kv_heads"])).eval()
        quantize_model_rtn(m, bits, group_size, PROJ, progress=False)
        out["model"] = {"synthetic": "tiny", "bits": bits, "group_size": group_size}
    else:
        from qalora.checkpoint import load_lowbit_model

        m, _, quant = load_lowbit_model(model, dtype=torch.float32, device="cpu")
        out["model"] = {"path": str(model)}
    out.update(bench_cpu_model(m, list(batches), list(prefills), steps=min(steps, 8), reps=min(reps, 3), log=log))
    return out


def benchmark_stage(model_dir: str | Path, **kw: Any) -> dict[str, Any]:
    """The pipeline's benchmark stage: :func:`run_bench` on the current device (JSON-able dict)."""
    return run_bench(model=model_dir, **kw)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object."""
    p = subparsers.add_parser("bench", help="decode/prefill speed of a low-bit model vs the same weights in fp16/bf16")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="low-bit model folder")
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random weights with these shapes")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4), help="synthetic only")
    p.add_argument("--group-size", type=int, default=128, help="synthetic only")
    p.add_argument("--batch", type=_ints, default=[1, 8, 32], help="decode batch sizes, e.g. 1,8,32")
    p.add_argument("--prefill", type=_ints, default=[512, 2048], help="prefill lengths, e.g. 512,2048")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--dense", default="both", choices=("both", "triton", "cublas", "none"),
                   help="dense baselines to run (the ratio uses the fastest)")
    p.add_argument("--context", type=int, default=128, help="KV positions before the timed decode steps")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed run")
    p.add_argument("--reps", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--json", help="write the result dict here")
    p.set_defaults(func=_cli_main)
    return p


def _cli_main(args: argparse.Namespace) -> int:
    res = run_bench(model=args.model, synthetic=args.synthetic, bits=args.bits, group_size=args.group_size,
                    batches=args.batch, prefills=args.prefill, dtype=args.dtype, dense=args.dense,
                    context=args.context, steps=args.steps, reps=args.reps)
    text = json.dumps(res, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qalora")
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["bench", *(argv or [])] if argv is None or argv[:1] != ["bench"] else argv)
    return args.func(args)


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
