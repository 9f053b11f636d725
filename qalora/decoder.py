"""A lean static-shape LLaMA decoder over the low-bit kernels, and the weights it runs on.

The decoder (:class:`StaticDecoder`: embedding, per layer {RMSNorm, fused QKV, RoPE + KV-cache
attention, O, RMSNorm, fused gate|up, SiLU*up, down}, final norm, lm_head) has a static KV cache, so
one decode step can be captured in a CUDA graph and replayed (:mod:`qalora.bench` times it). It runs
one weight format per instance (``mode``), with only the linear layers differing:

- ``lowbit``: the CUDA tile kernels with RMSNorm (prologue), SiLU(gate)*up (epilogue of the gate|up
  kernel) and the residual add fused into them;
- ``dense``: the same fusions in a Triton fp16/bf16 GEMV twin (``dense_gemv``);
- ``dense_cublas``: cuBLAS matmuls plus separate norm/act/add kernels.

Its weights are a :class:`Source`: canonical low-bit projections (:class:`Canon`, q/k/v and gate/up
stacked) plus the dense parts, read from a transformers LLaMA-style model (:func:`model_source`) or
random with named shapes (:func:`synthetic_source`). CUDA + Triton only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qalora.lowbit import LowBitLinear, dequantize_packed

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
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype,
                                 use_triton=False)


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
        raise ValueError(f"{name} is {type(layer).__name__}, not a LowBitLinear: the static decoder needs all 7 projections quantized")
    if layer.bias is not None:
        raise ValueError(f"{name} has a bias: the static decoder supports LLaMA-style bias-free projections")
    return Canon(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)


def model_source(model: Any, device: torch.device, dtype: torch.dtype) -> Source:
    """A transformers LLaMA-style model whose 7 projections are LowBitLinear."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral"):  # README "Model families"
        from qalora.model_io import UnsupportedModelError

        raise UnsupportedModelError(
            f"{getattr(cfg, 'model_type', type(model).__name__)}: the static decoder (the GPU benchmark) runs "
            "LLaMA-layout blocks only (llama, mistral); this family's blocks differ (biases, fused projections, "
            "offset or extra norms, scaled embeddings, soft-capping or experts), so they would be timed with "
            "other math or fail: benchmark it on the CPU path (device cpu)")
    inner = model.model
    rot = inner.rotary_emb
    if float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
        raise ValueError("rope attention scaling != 1 is not supported by the static decoder")
    d = cfg.hidden_size
    hk = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    arch = Arch(d, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, hk, cfg.vocab_size,
                float(cfg.rms_norm_eps), rot.inv_freq.detach().float().to(device))
    if getattr(cfg, "head_dim", None) not in (None, d // cfg.num_attention_heads):
        raise ValueError("head_dim != hidden/heads is not supported by the static decoder")
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


def gemv_pdl(bits: int, staged: bool) -> tuple[bool, bool]:
    """Which of the decode step's GEMVs are programmatic dependent launches: (qkv and gate_up, which read the
    normalized stream; o and down, which add into it). ``staged``: the GEMVs stage x and fuse the RMSNorm
    (``gpu_matmul.stages_x``, batch <= 2 on LLaMA-7B).

    A dependent launch lets a kernel's blocks take SM slots and queue their first weight loads while the kernel
    before it drains; that pays where it hides the next GEMV's ramp and costs where the early blocks crowd the
    last ones of the kernel before. Measured, not derived (H200, synthetic LLaMA-7B g128, tok/s, every pair in
    one run; benchmarks/RESULTS.md round 10): batch 8 with the norm in its own pass, (on, off) against
    (on, on): 3334 / 3089 at 4 bit, 3331 / 3093 at 3 bit, 3694 / 3652 at 2 bit; batch 1, (on, on) at 4 and 3
    bit (489 / 509, the others 466-497), (off, on) at 2 bit (569 against 500 with both on)."""
    return not (staged and bits == 2), staged


def norm_epilogue(bits: int) -> bool:
    """Whether, where the GEMVs fuse the RMSNorm (batch <= 2), o and down also write the next norm's input
    (``gpu_matmul.NextNorm``), so that gate_up and the next qkv stage 16-bit x * weight and partial sums of
    squares instead of the fp32 stream and the fp32 weight. Measured (H200, synthetic LLaMA-7B g128, tok/s,
    on / off in one run, benchmarks/RESULTS.md round 14): 4 bit 536 / 527 at batch 1, 911 / 893 at batch 2;
    3 bit 535 / 541 and 2 bit 553 / 562 at batch 1, so only at 4 bit."""
    return bits == 4


class StaticDecoder:
    """A static-shape LLaMA decoder over one weight format (``mode``: lowbit, dense, dense_cublas)."""

    def __init__(self, src: Source, mode: str, dtype: torch.dtype) -> None:
        from qalora.kernels.prepared import prepare_weight

        self.mode, self.dtype, self.arch = mode, dtype, src.arch
        a = src.arch
        dev = src.embed.device
        self.lowbit = mode == "lowbit"
        self.embed = src.embed.clone()  # own copies: the decoder's memory is self-contained
        self.lm_head = src.lm_head.clone()
        self.final_norm = src.final_norm.clone()
        self.layers: list[dict[str, Any]] = []
        # knobs the benchmarks compare: the large-M path of prefill (gpu_matmul.large_m_path), the decode
        # attention's context splits (None: decoder_triton.attn_splits), and which decode kernels are
        # programmatic dependent launches: the attention, the RMSNorm passes, and the GEMVs (a pair: those
        # that read the normalized stream, qkv and gate_up; those that add into it, o and down; None:
        # ``gemv_pdl``'s rule)
        self.large_m, self.attn_split_count, self.attn_pdl = "auto", None, False
        self.attn_kw: dict[str, Any] = {}  # more attn_decode arguments (block_s, num_warps, ...)
        # the norm's dependent launch lets the low-bit GEMV after it start early (batch 8: +5-8%); before
        # cuBLAS it measured 1% slower (round 10)
        self.norm_pdl: bool = self.lowbit
        self.gemv_pdl: tuple[bool, bool] | None = None
        # where the GEMVs fuse the norm (batch <= 2), whether o and down also write the next norm's input
        # (gpu_matmul.NextNorm; None: ``norm_epilogue``'s rule; True holds for gpu_matmul.NORM_SUMSQ_BITS only,
        # the one width whose kernels read it)
        self.norm_epilogue: bool | None = None
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
        self.ss = torch.empty(batch, -(-a.hidden // 16), device=dev)  # xn's partial sums of squares (NextNorm)
        self.act = torch.empty(batch, a.intermediate, device=dev, dtype=dt)
        self.o = torch.empty(batch, a.hidden, device=dev, dtype=dt)
        self.logits = torch.empty(batch, a.vocab, device=dev, dtype=dt)
        self.kc = [torch.empty(batch, a.kv_heads, max_seq, a.head_dim, device=dev, dtype=dt) for _ in self.layers]
        self.vc = [torch.empty_like(k) for k in self.kc]
        from qalora.kernels.decoder_triton import attn_scratch, attn_splits

        splits = self.attn_split_count or attn_splits(batch, a.heads, max_seq,
                                                      torch.cuda.get_device_properties(dev).multi_processor_count)
        self.attn_scratch = attn_scratch(batch, a.heads, a.head_dim, splits, dev)  # shared by the layers

    def free(self) -> None:
        for name in ("tok", "pos", "h", "qkv", "attn", "gu", "xn", "ss", "act", "o", "logits", "kc", "vc",
                     "attn_scratch"):
            setattr(self, name, None)

    def decode_step(self) -> None:
        """Embed ``self.tok``, run all layers at position ``self.pos``, write the argmax to
        ``self.tok`` and the logits to ``self.logits``; pos += 1. Graph-capturable."""
        from qalora.kernels import gpu_matmul as gpu
        from qalora.kernels.decoder_triton import attn_decode, rmsnorm, silu_mul

        a = self.arch
        staged = self.lowbit and gpu.stages_x(self.batch, a.hidden)
        bits = self.layers[0]["qkv"].bits if self.lowbit else 16
        pdl_in, pdl_res = self.gemv_pdl or (gemv_pdl(bits, staged) if self.lowbit else (False, False))
        wanted = norm_epilogue(bits) if self.norm_epilogue is None else self.norm_epilogue
        epi = staged and wanted and bits == gpu.NORM_SUMSQ_BITS  # the GEMV after reads it at that width only

        def next_norm(weight: torch.Tensor) -> gpu.NextNorm | None:
            return gpu.NextNorm(weight, self.xn, self.ss) if epi else None

        self.h.copy_(self.embed[self.tok])
        for i, lay in enumerate(self.layers):
            if self.mode == "lowbit":
                self._norm_gemv(lay["qkv"], lay["ln1"], self.qkv, pdl_in, epi and i > 0)
            elif self.mode == "dense":
                gpu.dense_gemv(self.h, lay["qkv"], out=self.qkv, norm_weight=lay["ln1"], eps=a.eps)
            else:
                rmsnorm(self.h, lay["ln1"], a.eps, self.xn, self.norm_pdl)
                torch.matmul(self.xn, lay["qkv"].t(), out=self.qkv)
            attn_decode(self.qkv, self.kc[i], self.vc[i], self.attn, self.pos, a.inv_freq, a.heads, a.kv_heads,
                        scratch=self.attn_scratch, pdl=self.attn_pdl, **self.attn_kw)
            if self.mode == "lowbit":
                gpu.gemv(self.attn, lay["o"], out=self.h, accumulate=True, pdl=pdl_res, next_norm=next_norm(lay["ln2"]))
                self._norm_gemv(lay["gate_up"], lay["ln2"], self.act, pdl_in, epi)
                last = i + 1 == len(self.layers)
                gpu.gemv(self.act, lay["down"], out=self.h, accumulate=True, pdl=pdl_res,
                         next_norm=None if last else next_norm(self.layers[i + 1]["ln1"]))
            elif self.mode == "dense":
                gpu.dense_gemv(self.attn, lay["o"], out=self.h, accumulate=True)
                gpu.dense_gemv(self.h, lay["gate_up"], out=self.gu, norm_weight=lay["ln2"], eps=a.eps)
                gpu.dense_gemv(self.gu, lay["down"], out=self.h, accumulate=True, act=True)
            else:
                torch.matmul(self.attn, lay["o"].t(), out=self.o)
                self.h.add_(self.o)
                rmsnorm(self.h, lay["ln2"], a.eps, self.xn, self.norm_pdl)
                torch.matmul(self.xn, lay["gate_up"].t(), out=self.gu)
                silu_mul(self.gu, self.act)
                torch.matmul(self.act, lay["down"].t(), out=self.o)
                self.h.add_(self.o)
        rmsnorm(self.h, self.final_norm, a.eps, self.xn, self.norm_pdl)
        torch.matmul(self.xn, self.lm_head.t(), out=self.logits)
        torch.argmax(self.logits, dim=-1, out=self.tok)
        self.pos.add_(1)

    def _norm_gemv(self, w: Any, norm_weight: torch.Tensor, out: torch.Tensor, pdl: bool, written: bool) -> None:
        """out = rmsnorm(self.h) @ w^T: fused into the low-bit kernel while it stages x (a few rows,
        ``gpu_matmul.stages_x``), from the norm's input the GEMV before wrote (``written``: ``self.xn`` and
        ``self.ss``, a ``NextNorm``) or from the stream; else a separate RMSNorm pass into ``self.xn``."""
        from qalora.kernels import gpu_matmul as gpu
        from qalora.kernels.decoder_triton import rmsnorm

        if written:
            gpu.gemv(self.xn, w, out=out, norm_sumsq=self.ss, eps=self.arch.eps, dtype=self.dtype, pdl=pdl)
        elif gpu.stages_x(self.batch, self.arch.hidden):
            gpu.gemv(self.h, w, out=out, norm_weight=norm_weight, eps=self.arch.eps, dtype=self.dtype, pdl=pdl)
        else:
            gpu.gemv(rmsnorm(self.h, norm_weight, self.arch.eps, self.xn, self.norm_pdl), w, out=out, pdl=pdl)

    def _linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        if self.lowbit:
            from qalora.kernels.gpu_matmul import matmul

            return matmul(x, w, self.large_m)
        return F.linear(x, w)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Batch-1 prompt ``ids`` [T] from position 0: fills the KV cache (batch row 0), returns
        the last position's logits [V]. Graph-capturable."""
        from qalora.kernels.decoder_triton import rmsnorm, silu_mul

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


def capture_graph(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """``fn`` (e.g. ``decoder.decode_step``) run ``warmup`` times on a side stream, then captured in a CUDA graph."""
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
