"""The static decoder (qalora.decoder) against transformers' forward on a tiny quantized LLaMA (CUDA),
and the CLI/CPU fallback of ``qalora bench`` (CPU, small)."""

import json

import pytest
import torch

from qalora.kernels import cuda_kernels_available, triton_available
from qalora.lowbit import LowBitLinear
from qalora.model_io import set_submodule
from conftest import tiny_llama

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_minmax(model, bits, g):
    """Min-max RTN with float zeros, as after a QA-LoRA merge."""
    for name, mod in list(model.named_modules()):
        if name.split(".")[-1] in PROJ:
            w = mod.weight.detach().float().reshape(mod.out_features, -1, g)
            lo, hi = w.amin(-1), w.amax(-1)
            s = ((hi - lo) / ((1 << bits) - 1)).clamp(min=1e-6).half().float()
            z = -lo / s + 0.25  # a float zero, as after a QA-LoRA merge
            q = torch.clamp(torch.round(w / s[..., None] + z[..., None]), 0, (1 << bits) - 1)
            lay = LowBitLinear(mod.in_features, mod.out_features, bits, g)
            lay.set_quantized(q.reshape(mod.out_features, -1), s, z)
            set_submodule(model, name, lay)


@pytest.mark.gpu
@pytest.mark.skipif(not (triton_available() and cuda_kernels_available()), reason="needs CUDA, triton and nvcc")
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_decoder_matches_transformers(bits):
    """Prefill and graph-replayed decode of each weight format against transformers' logits; the low-bit
    decoder at batch 1 with and without the residual adds writing the next norm's input (``norm_epilogue``,
    which takes effect at 4 bit only)."""
    from qalora.decoder import StaticDecoder, capture_graph, model_source
    from qalora.kernels import gpu_matmul

    m = tiny_llama(seed=bits)
    quantize_minmax(m, bits, 32)
    m = m.cuda()
    ids = torch.randint(0, 256, (12,), device="cuda")
    with torch.no_grad():
        ref = m(input_ids=ids[None]).logits[0].double()
    dt = torch.bfloat16
    src = model_source(m, torch.device("cuda"), dt)
    assert gpu_matmul.stages_x(1, m.config.hidden_size)  # the fused norms, so norm_epilogue applies
    for mode, epilogue in (("lowbit", True), ("lowbit", False), ("dense", False), ("dense_cublas", False)):
        hn = StaticDecoder(src, mode, dt)
        hn.norm_epilogue = epilogue
        hn.alloc(1, 32)
        with torch.no_grad():
            lp = hn.prefill(ids)
            assert float((lp.double() - ref[-1]).norm() / ref[-1].norm()) < 3e-2, mode
            hn.pos.fill_(0)
            g = capture_graph(hn.decode_step, warmup=0)
            for i in range(len(ids)):
                hn.tok.fill_(int(ids[i]))
                g.replay()
                err = float((hn.logits[0].double() - ref[i]).norm() / ref[i].norm())
                assert err < 3e-2, (mode, epilogue, i, err)
        assert int(hn.pos) == len(ids)


@pytest.mark.gpu
@pytest.mark.skipif(not (triton_available() and cuda_kernels_available()), reason="needs CUDA, triton and nvcc")
def test_decoder_batch_rows_match_transformers():
    """At batch 8 the low-bit decoder normalizes x in its own pass (the kernel does not stage 8 rows):
    every row fed the same tokens must give transformers' logits, and the same bits whichever of the
    norm and the GEMVs are dependent launches (norm, GEMVs reading the normed stream, GEMVs adding into it)."""
    from qalora.decoder import StaticDecoder, capture_graph, model_source
    from qalora.kernels import gpu_matmul

    m = tiny_llama(seed=5)
    quantize_minmax(m, 4, 32)
    m = m.cuda()
    ids = torch.randint(0, 256, (6,), device="cuda")
    with torch.no_grad():
        ref = m(input_ids=ids[None]).logits[0].double()
    hn = StaticDecoder(model_source(m, torch.device("cuda"), torch.bfloat16), "lowbit", torch.bfloat16)
    assert not gpu_matmul.stages_x(8, m.config.hidden_size)
    first = None
    for norm_pdl, gemv_pdl in ((False, (False, False)), (True, (True, True)), (True, (True, False))):
        hn.norm_pdl, hn.gemv_pdl = norm_pdl, gemv_pdl
        hn.alloc(8, 16)
        logits = []
        with torch.no_grad():
            g = capture_graph(hn.decode_step, warmup=0)
            for i in range(len(ids)):
                hn.tok.fill_(int(ids[i]))
                g.replay()
                logits.append(hn.logits.clone())
                for r in range(8):
                    err = float((hn.logits[r].double() - ref[i]).norm() / ref[i].norm())
                    assert err < 3e-2, (norm_pdl, gemv_pdl, i, r, err)
        first = first or logits
        assert all(torch.equal(a, b) for a, b in zip(logits, first)), (norm_pdl, gemv_pdl)
        hn.free()


def test_bench_cli_cpu_tiny(tmp_path, monkeypatch):
    import argparse

    from qalora_pipeline.cli import stages

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    stages.add_bench(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "b.json"
    args = parser.parse_args(["bench", "--synthetic", "tiny", "--bits", "4", "--group-size", "64", "--batch", "1,2",
                              "--prefill", "16", "--steps", "2", "--reps", "1", "--json", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert res["env"]["device"] == "cpu"
    for mode in ("lowbit", "dense"):
        assert set(res[mode]["decode"]) == {"1", "2"}
        assert res[mode]["decode"]["1"]["tokens_per_s"] > 0
        assert res[mode]["prefill_ms"]["16"] > 0
    assert set(res["ratio_lowbit_over_dense"]["decode"]) == {"1", "2"}


@pytest.mark.gpu
@pytest.mark.skipif(not (triton_available() and cuda_kernels_available()), reason="needs CUDA, triton and nvcc")
@pytest.mark.parametrize("family, harness", [("llama", "static-decoder"), ("qwen2", "transformers")])
def test_gpu_bench_of_a_model_folder_names_its_harness(tmp_path, family, harness):
    """LLaMA blocks run the static decoder; a Qwen2 folder (biases, tied head) is timed through
    transformers' forward with our kernels, and bench.json says so."""
    from families import tiny_model
    from qalora.bench import run_bench
    from qalora.checkpoint import save_lowbit_model
    from qalora.quantizers.rtn import quantize_model_rtn
    from conftest import tiny_tokenizer

    model = tiny_model(family)
    quantize_model_rtn(model, 4, 32, list(PROJ), progress=False)
    folder = tmp_path / family
    save_lowbit_model(model, tiny_tokenizer(), folder, method="rtn", stage="quantize", params={}, inputs={})
    out = run_bench(model=folder, batches=[1, 2], prefills=[16], steps=4, reps=2, device="cuda", log=lambda *a: None)
    assert out["harness"] == harness and out["model"]["model_type"] == family
    if harness == "transformers":
        assert out["device"].startswith("cuda") and out["dtype"] == "bfloat16"
        assert set(out["lowbit"]["decode"]) == {"1", "2"} and all(
            r["tokens_per_s"] > 0 for r in out["lowbit"]["decode"].values())
