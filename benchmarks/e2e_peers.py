"""Decode end to end against what a user runs today, one process on one GPU (CUDA), LLaMA-7B shapes, random weights:

- ``hf_bf16``: a transformers ``LlamaForCausalLM`` in bf16, ``generate`` with its static cache, whose decode step
  transformers compiles itself (``torch.compile``, CUDA graphs) on a GPU;
- ``hf_tinygemm``: the same model with every projection through torch's tinygemm INT4 (``aten._weight_int4pack_mm``,
  4 bit, groups of 128; ``peers.tinygemm_pack``), the same ``generate``;
- ``ours_int4``: qalora's static decoder on a 4-bit g128 model of the same shape, and ``ours_bf16``: the same decoder
  on bf16 weights through cuBLAS (the ratio ``decode_ab.py`` reports).

    PYTHONPATH=. python3 benchmarks/e2e_peers.py --json OUT.json [--batch 1,8] [--layers 32] [--new 64] [--prompt 128]

transformers' figure: ``generate`` of ``--new`` tokens after a ``--prompt``-token prompt, less ``generate`` of one token
(the prefill and the setup), over the ``--new`` - 1 decode steps, medians of ``--reps``; one untimed run of each first
(compilation). Ours: ``qalora.bench.time_decode`` (the decode step as a CUDA graph, from position ``--prompt``,
``--new`` steps). The weights of each are random; speed does not depend on their values (``peers.py`` checks every
kernel's numbers). ``--layers`` below 32 shortens every model alike (a quicker run, the same ratios up to the
lm_head's share).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peers import random_weight, tinygemm_pack  # noqa: E402
from torch import nn  # noqa: E402

from qalora.bench import copy_bandwidth, time_decode  # noqa: E402
from qalora.decoder import SYNTHETIC, StaticDecoder, synthetic_source  # noqa: E402

SHAPE = "llama-7b"
GROUP = 128


class TinyGemmLinear(nn.Module):
    """y = x W^T, W = s (q - z) 4 bit in groups of ``group``, through torch's tinygemm INT4 kernel; random codes
    [n, k] (a replaced layer's shape)."""

    def __init__(self, n: int, k: int, group: int, seed: int) -> None:
        super().__init__()
        packed, sz = tinygemm_pack(*random_weight(n, k, 4, group, seed))
        self.register_buffer("packed", packed)
        self.register_buffer("sz", sz)
        self.n, self.group = n, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] bf16 -> [..., N]
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group, self.sz)
        return y.reshape(*x.shape[:-1], self.n)


def hf_model(layers: int, device: str = "cuda", shape: str = SHAPE):
    """A transformers LLaMA of ``shape`` with ``layers`` layers, random bf16 weights made on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = SYNTHETIC[shape]
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=layers, num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                      rms_norm_eps=c["eps"], max_position_embeddings=4096)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16: a 7B model in fp32 first would take 27 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


@torch.no_grad()
def to_tinygemm_(model, group: int = GROUP) -> int:
    """Replace every projection of ``model``'s decoder layers by a :class:`TinyGemmLinear` of its shape; returns
    how many (the bf16 weights are freed)."""
    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, nn.Linear):
                    setattr(parent, name, TinyGemmLinear(mod.out_features, mod.in_features, group, seed=count))
                    count += 1
    torch.cuda.empty_cache()
    return count


@torch.no_grad()
def hf_decode(model, batch: int, prompt: int, new: int, reps: int) -> dict[str, float]:
    """Decode figures of transformers' ``generate`` (greedy, static cache) for ``batch`` sequences: the time of
    ``new`` tokens less that of one, over ``new`` - 1 steps."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)

    def gen(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, cache_implementation="static", pad_token_id=0)
        sync()
        if out.shape != (batch, prompt + n):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, not {(batch, prompt + n)}")
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    gen(new)  # compiles the decode step
    gen(1)
    warmup = time.perf_counter() - t0
    full = statistics.median(gen(new) for _ in range(reps))
    one = statistics.median(gen(1) for _ in range(reps))
    ms = (full - one) * 1000 / (new - 1)
    return {"ms_per_step": ms, "tokens_per_s": batch * 1000 / ms, "generate_s": full, "generate_one_s": one,
            "warmup_s": warmup}


def ours_decode(layers: int, batches: list[int], prompt: int, new: int, reps: int, log=print) -> dict:
    """tok/s of qalora's static decoder, INT4 g128 and bf16 cuBLAS, ``layers`` layers of the same shape."""
    name = f"{SHAPE}@{layers}"
    SYNTHETIC[name] = dict(SYNTHETIC[SHAPE], layers=layers)
    src = synthetic_source(name, 4, GROUP, torch.device("cuda"), torch.bfloat16)
    out = {}
    for peer, mode in (("ours_int4", "lowbit"), ("ours_bf16", "dense_cublas")):
        hn = StaticDecoder(src, mode, torch.bfloat16)
        out[peer] = {str(b): time_decode(hn, b, prompt, new, reps) for b in batches}
        for b in batches:
            log(f"{peer:12s} B={b:<3d} {out[peer][str(b)]['tokens_per_s']:9.1f} tok/s")
        del hn
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", default="1", help="decode batches, e.g. 1,8 (each a compile for transformers)")
    ap.add_argument("--layers", type=int, default=SYNTHETIC[SHAPE]["layers"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.new < 2:
        ap.error("--new must be at least 2 (the time of one token is subtracted)")
    import transformers

    batches = [int(b) for b in args.batch.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "args": vars(args),
                 "copy_bandwidth_GBps": copy_bandwidth(), "runs": {}}

    def save() -> None:
        Path(args.json).write_text(json.dumps(res, indent=1))

    res["runs"].update(ours_decode(args.layers, batches, args.prompt, args.new, args.reps))
    save()
    model = hf_model(args.layers)
    for peer in ("hf_bf16", "hf_tinygemm"):
        if peer == "hf_tinygemm":
            res["tinygemm_layers"] = to_tinygemm_(model)
        res["runs"][peer] = {}
        for b in batches:
            r = res["runs"][peer][str(b)] = hf_decode(model, b, args.prompt, args.new, args.reps)
            print(f"{peer:12s} B={b:<3d} {r['tokens_per_s']:9.1f} tok/s (warm-up {r['warmup_s']:.0f} s)", flush=True)
            save()
    ours = res["runs"]["ours_int4"]
    res["ours_int4_over"] = {peer: {b: ours[b]["tokens_per_s"] / r[b]["tokens_per_s"] for b in r}
                             for peer, r in res["runs"].items() if peer != "ours_int4"}
    save()
    for peer, ratio in res["ours_int4_over"].items():
        print(f"ours_int4 / {peer}: " + ", ".join(f"B={b} {v:.2f}x" for b, v in ratio.items()), flush=True)


if __name__ == "__main__":
    main()
