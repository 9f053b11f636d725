"""The decoder's Triton attention against a torch reference (skipped without CUDA and triton)."""

import math

import pytest
import torch
from lowbit_ref import assert_graph_replays

from qalora.kernels import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason="needs CUDA and triton")]


def _ref(qkv, kc, vc, pos, inv_freq, h, hkv):
    """float64 RoPE + attention over [0, pos) and the new token; returns (out [B, H DH], rotated k [B, HKV, DH])."""
    b, dh = qkv.shape[0], kc.shape[-1]
    half = dh // 2
    ang = pos * inv_freq.double()
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    q = rope(qkv[:, : h * dh].view(b, h, dh).double())
    k = rope(qkv[:, h * dh:(h + hkv) * dh].view(b, hkv, dh).double())
    v = qkv[:, (h + hkv) * dh:].view(b, hkv, dh).double()
    keys = torch.cat([kc[:, :, :pos].double(), k[:, :, None]], 2).repeat_interleave(h // hkv, 1)
    vals = torch.cat([vc[:, :, :pos].double(), v[:, :, None]], 2).repeat_interleave(h // hkv, 1)
    att = torch.softmax(q[:, :, None] @ keys.transpose(-1, -2) / math.sqrt(dh), -1)
    return (att @ vals)[:, :, 0].reshape(b, h * dh), k


@pytest.mark.parametrize("pdl", [False, True])
def test_attention_context_splits(pdl):
    """Every split count gives the reference's output and cache write, for empty, partial and full
    splits (pos 0, below and above the splits); split runs give the same bits on every call (the
    merge is in a fixed order and the counters return to zero), eagerly and replayed in a CUDA graph."""
    from qalora.kernels.decoder_triton import attn_decode, attn_scratch

    torch.manual_seed(0)
    b, h, hkv, dh, s_max = 3, 8, 2, 64, 300
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dh, 2, device="cuda").float() / dh)
    for pos in (0, 3, 100, 299):
        qkv = torch.randn(b, (h + 2 * hkv) * dh, device="cuda", dtype=torch.bfloat16)
        kc0 = torch.randn(b, hkv, s_max, dh, device="cuda", dtype=torch.bfloat16)
        vc0 = torch.randn_like(kc0)
        ref, k_new = _ref(qkv, kc0, vc0, pos, inv_freq, h, hkv)
        p = torch.tensor([pos], dtype=torch.int32, device="cuda")
        for splits in (1, 2, 4, 8):
            kc, vc = kc0.clone(), vc0.clone()
            out = torch.empty(b, h * dh, device="cuda", dtype=torch.bfloat16)
            sc = attn_scratch(b, h, dh, splits, torch.device("cuda"))
            attn_decode(qkv, kc, vc, out, p, inv_freq, h, hkv, scratch=sc, pdl=pdl)
            err = float((out.double() - ref).abs().max())
            assert err < 2e-2, (pos, splits, err)
            torch.testing.assert_close(kc[:, :, pos].double(), k_new, atol=2e-2, rtol=1e-2)
            assert torch.equal(vc[:, :, pos], qkv[:, (h + hkv) * dh:].view(b, hkv, dh))
            if sc is not None:
                assert int(sc.count.abs().sum()) == 0
            first = out.clone()

            def step():
                attn_decode(qkv, kc, vc, out, p, inv_freq, h, hkv, scratch=sc, pdl=pdl)

            for _ in range(3):
                step()
                assert torch.equal(out, first)
            assert_graph_replays(step, out, first)


def test_attn_splits_fill_the_gpu():
    from qalora.kernels.decoder_triton import attn_block_s, attn_splits

    assert attn_splits(1, 32, 200, 132) == 8  # 32 heads x 8 splits >= 2 x 132 SMs, 25 positions each
    assert attn_splits(1, 32, 40, 132) == 2  # no split under 16 positions
    assert attn_splits(1, 32, 4096, 132) == 16
    assert attn_splits(8, 32, 4096, 132) == 2
    assert attn_splits(32, 32, 4096, 132) == 1
    # positions per loop step: 32 with over 6 programs per SM, else what a split's share fills, 32..128
    assert attn_block_s(32 * 32, 200, 1, 132) == 32
    assert attn_block_s(16 * 32, 200, 1, 132) == 128
    assert attn_block_s(32 * 16, 1096, 16, 132) == 64
    assert attn_block_s(32 * 8, 200, 8, 132) == 32


def test_rmsnorm_dependent_launch_reads_its_predecessors_output():
    """The RMSNorm as a dependent launch right after the kernels that write its input (adds into the stream)
    gives the plain launch's bits and the fp64 reference's values, eagerly and replayed in a CUDA graph.
    (The adds never trigger early; a predecessor that does is the decoder's GEMV, covered by the batch-8
    decoder test in test_bench_harness.py.)"""
    from qalora.kernels.decoder_triton import rmsnorm

    torch.manual_seed(0)
    r, d = 8, 4096
    h0 = torch.randn(r, d, device="cuda")
    w = 1 + 0.1 * torch.randn(d, device="cuda")
    big = torch.randn(r, d, device="cuda")
    outs = {}
    for pdl in (False, True):
        h = h0.clone()
        out = torch.empty(r, d, device="cuda", dtype=torch.bfloat16)

        def step():
            h.copy_(h0)
            for _ in range(4):
                h.add_(big)
            rmsnorm(h, w, 1e-6, out, pdl=pdl)

        step()
        torch.cuda.synchronize()
        outs[pdl] = out.clone()
        assert_graph_replays(step, out, outs[pdl])
    assert torch.equal(outs[True], outs[False])
    hr = (h0 + 4 * big).double()
    ref = hr * torch.rsqrt(hr.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert float((outs[True].double() - ref).abs().max()) < 3e-2
