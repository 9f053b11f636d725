"""Shared by the GPU kernel tests: random prepared weights and the float64 reference they are checked against."""

import torch

from qalora.kernels.prepared import prepare_weight, reference_dequant
from qalora.lowbit import pack_codes

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}  # relative Frobenius error, by compute dtype


def random_prepared(n, k, bits, g, seed, bias=False, glu=False, device="cuda"):
    """A prepared [n, k] weight of random codes, scales and fractional float zeros (+ bias, glu)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, device=device).to(torch.uint8)
    s = (torch.rand(n, k // g, generator=gen, device=device) * 0.02 + 0.001).half()
    z = torch.rand(n, k // g, generator=gen, device=device) * ((1 << bits) - 1) + 0.3 * torch.randn(
        n, k // g, generator=gen, device=device)
    b = torch.randn(n, generator=gen, device=device) if bias else None
    return prepare_weight(pack_codes(codes, bits), s, z, bits, g, k, bias=b, glu=glu)


def reference(x, pw):
    """float64 x @ W^T (+ bias) from the canonical buffers; silu(gate) * up for glu weights."""
    y = x.double() @ reference_dequant(pw).double().t()
    if pw.ref_bias is not None:
        y = y + pw.ref_bias.double()
    if pw.glu:
        f = y.shape[-1] // 2
        y = torch.nn.functional.silu(y[..., :f]) * y[..., f:]
    return y


def rel_err(y, ref):
    assert torch.isfinite(y).all()
    return float((y.double() - ref).norm() / ref.norm())


def assert_graph_replays(fn, out, expected, reps=3):
    """``fn`` captured in a CUDA graph writes ``expected`` into ``out`` on every replay (``out`` poisoned with
    NaN before each, so a replay that writes nothing fails)."""
    from qalora.decoder import capture_graph

    graph = capture_graph(fn)
    for _ in range(reps):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
