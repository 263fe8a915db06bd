"""Quantized GEMM kernels on a real GPU at Llama-3.1-8B / 70B layer shapes, against
kernels/quant_reference.py run on the GPU, and the quantized layers' W8A8 / W4A16 paths.

Not part of CI: run through tests/gpu/quant_checks.sh (or run_gpu_checks.sh) on a GPU.
Errors are ||out - ref|| / ||ref||; bf16 included (the CPU interpreter cannot run it).
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import quant_reference as kref
from hpcinfer.kernels.fp8_gemm import fp8_block_gemm, fp8_scaled_mm
from hpcinfer.kernels.w4a16_gemm import w4a16_gemm
from hpcinfer.testing.cuda_graphs import capture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/quant_checks.sh on a GPU")
DEVICE = "cuda"
# (K, N): 8B q/k/v, 8B down, 70B gate/up (one of the two pieces)
SHAPES = [(4096, 6144), (14336, 4096), (8192, 28672)]
TOKENS = [1, 16, 64, 256, 2048]


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaN"
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def fp8_supported() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])   # fp16/fp32: the interpreter tests
@pytest.mark.parametrize("group, desc_act", [(128, False), (32, False), (128, True)])
def test_w4a16_full_shapes(k, n, m, dtype, group, desc_act):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    codes = torch.randint(0, 16, (k, n), generator=g, device=DEVICE)
    zeros = torch.randint(0, 16, (k // group, n), generator=g, device=DEVICE, dtype=torch.int32)
    scales = torch.rand(k // group, n, generator=g, device=DEVICE) * 0.02 + 0.001
    g_idx = (torch.randperm(k, generator=g, device=DEVICE).to(torch.int32) // group
             if desc_act else None)
    qweight = kref.pack_k(codes)
    a = torch.randn(m, k, generator=g, device=DEVICE).to(dtype)
    got = w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    want = kref.w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def _w4a16_problem(k, n, m, group=128):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    qweight = kref.pack_k(torch.randint(0, 16, (k, n), generator=g, device=DEVICE))
    zeros = torch.full((k // group, n), 8, device=DEVICE, dtype=torch.int32)
    scales = torch.rand(k // group, n, generator=g, device=DEVICE) * 0.02 + 0.001
    a = torch.randn(m, k, generator=g, device=DEVICE).bfloat16()
    return a, qweight, zeros, scales


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("split_k", [1, 2, 4, 8])
@pytest.mark.parametrize("reshape", [False, True])
def test_w4a16_split_k_full_shapes(k, n, m, split_k, reshape):
    from hpcinfer.kernels.w4a16_gemm import W4A16Config
    a, qweight, zeros, scales = _w4a16_problem(k, n, m)
    cfg = W4A16Config(16 if m == 1 else 64, 64, 128, 4, split_k, reshape)
    got = w4a16_gemm(a, qweight, zeros, scales, None, 128, config=cfg)
    assert rel_err(got, kref.w4a16_gemm(a, qweight, zeros, scales, None, 128)) < 1e-2


def test_w4a16_split_k_in_a_cuda_graph():
    """Decode runs in CUDA graphs: the split-K workspace is allocated inside the capture."""
    from hpcinfer.kernels.w4a16_gemm import config_for, num_sms
    a, qweight, zeros, scales = _w4a16_problem(4096, 4096, 4)
    assert config_for(4, 4096, 4096, 128, False, num_sms(a.device)).split_k > 1
    run = lambda: w4a16_gemm(a, qweight, zeros, scales, None, 128)   # noqa: E731
    graph, out = capture(run)
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, kref.w4a16_gemm(a, qweight, zeros, scales, None, 128)) < 1e-2


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_fp8_block_full_shapes(k, n, m):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    x = torch.randn(m, k, generator=g, device=DEVICE)
    w = torch.randn(n, k, generator=g, device=DEVICE)
    block = (128, 128)
    a, a_scales = kref.quantize_per_token_group(x, 128)
    b_scales = (w.reshape(n // 128, 128, k // 128, 128).abs().amax(dim=(1, 3)) / 448)
    b = (w / b_scales.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(kref.FP8)
    got = fp8_block_gemm(a, a_scales, b, b_scales, block, torch.bfloat16)
    want = kref.fp8_block_gemm(a, a_scales, b, b_scales, block, torch.float32)
    assert rel_err(got, want) < 1e-2
    # and against the unquantized product: e4m3 rounding of both operands only
    assert rel_err(got, x @ w.t()) < 6e-2


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_fp8_rowwise_scaled_mm(k, n, m):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    x = torch.randn(m, k, generator=g, device=DEVICE).bfloat16()
    w = torch.randn(n, k, generator=g, device=DEVICE)
    w_scales = w.abs().amax(dim=1) / 448
    b = (w / w_scales[:, None]).to(kref.FP8)
    a, a_scales = kref.quantize_per_token(x)
    got = fp8_scaled_mm(a, a_scales, b.t(), w_scales.reshape(1, -1), torch.bfloat16)
    want = (a.float() * a_scales) @ (b.float() * w_scales[:, None]).t()
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("group, desc_act", [(128, False), (128, True)])
def test_w4a16_linear_full_shapes(k, n, m, group, desc_act):
    """The layers' entry: fused kernel below DEQUANT_MIN_M rows, dequantize + cuBLAS from it
    (M 256 and 2048 here); the dequantized weight equals the reference's bit for bit."""
    from hpcinfer.kernels.w4a16_gemm import DEQUANT_MIN_M, w4a16_dequantize, w4a16_linear
    assert 64 < DEQUANT_MIN_M <= 256
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m + 1)
    codes = torch.randint(0, 16, (k, n), generator=g, device=DEVICE)
    zeros = torch.randint(0, 16, (k // group, n), generator=g, device=DEVICE, dtype=torch.int32)
    scales = torch.rand(k // group, n, generator=g, device=DEVICE) * 0.02 + 0.001
    g_idx = (torch.randperm(k, generator=g, device=DEVICE).to(torch.int32) // group
             if desc_act else None)
    qweight = kref.pack_k(codes)
    a = torch.randn(m, k, generator=g, device=DEVICE).bfloat16()
    got = w4a16_linear(a, qweight, zeros, scales, g_idx, group)
    assert rel_err(got, kref.w4a16_gemm(a, qweight, zeros, scales, g_idx, group)) < 1e-2
    if m == 1:
        want = kref.w4a16_weight(qweight, zeros, scales, g_idx, group).bfloat16()
        assert torch.equal(w4a16_dequantize(qweight, zeros, scales, g_idx, group,
                                            torch.bfloat16), want)
        assert torch.equal(w4a16_dequantize(qweight, zeros, scales, g_idx, group,
                                            torch.bfloat16, 256, 1000), want[:, 256:1000])


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("group", [None, 128])
def test_quantize_fp8_full_shapes(k, m, group):
    """The fused activation quantization equals the torch reference bit for bit on the GPU."""
    from hpcinfer.kernels.fp8_gemm import quantize_fp8
    g = torch.Generator(device=DEVICE).manual_seed(k + m)
    x = (torch.randn(m, k, generator=g, device=DEVICE) * 4).bfloat16()
    q, scales = quantize_fp8(x, group)
    want_q, want_scales = kref.quantize_per_token_group(x, group or k)
    assert torch.equal(scales, want_scales)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_fp8_rowwise_linear_full_shapes(k, n, m):
    """fp8_rowwise_linear: W8A16 up to W8A16_MAX_M rows (against x @ the dequantized weight),
    W8A8 above (against the per-token-quantized product)."""
    from hpcinfer.kernels.fp8_gemm import W8A16_MAX_M, fp8_rowwise_linear
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    x = torch.randn(m, k, generator=g, device=DEVICE).bfloat16()
    w = torch.randn(n, k, generator=g, device=DEVICE)
    w_scales = w.abs().amax(dim=1) / 448
    b = (w / w_scales[:, None]).to(kref.FP8)
    w_deq = b.float() * w_scales[:, None]
    got = fp8_rowwise_linear(x, b, w_scales.reshape(1, -1))
    if m <= W8A16_MAX_M:
        assert rel_err(got, x.float() @ w_deq.t()) < 1e-2
    else:
        a, a_scales = kref.quantize_per_token(x)
        assert rel_err(got, (a.float() * a_scales) @ w_deq.t()) < 1e-2


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
def test_fp8_w8a16_split_k_in_a_cuda_graph():
    from hpcinfer.kernels.fp8_gemm import fp8_w8a16_gemm
    g = torch.Generator(device=DEVICE).manual_seed(3)
    a = torch.randn(4, 4096, generator=g, device=DEVICE).bfloat16()
    w = torch.randn(4096, 4096, generator=g, device=DEVICE)
    w_scales = w.abs().amax(dim=1) / 448
    b = (w / w_scales[:, None]).to(kref.FP8)
    run = lambda: fp8_w8a16_gemm(a, b, w_scales)   # noqa: E731
    graph, out = capture(run)
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, a.float() @ (b.float() * w_scales[:, None]).t()) < 1e-2


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_w4a16_dummy_model_on_gpu(method, tmp_path, monkeypatch):
    """load_format="dummy" with a W4A16 quantization_config at Llama-3.1-8B widths (2 layers):
    every projection is repacked for the kernel, its output equals x @ the layout's own
    dequantized dummy weights, and the engine (CUDA graphs, split-K at decode) generates."""
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.layers.linear import LinearBase
    from hpcinfer.layers.quant.int4 import Int4Method
    from hpcinfer.models import registry
    from hpcinfer.testing.llama_shapes import SHAPES, write_dummy_model
    path = write_dummy_model(tmp_path / method, {**SHAPES["llama-3.1-8b"],
                                                 "num_hidden_layers": 2},
                             max_position_embeddings=8192, quantization=method)
    dequantized, real_finish = {}, registry.finish_quantization

    def finish(model):
        for name, m in model.named_modules():
            if isinstance(m, LinearBase) and isinstance(m.quant_method, Int4Method):
                dequantized[name] = m.quant_method.dequantized(m)
        real_finish(model)
    monkeypatch.setattr(registry, "finish_quantization", finish)
    model = registry.load_model(path, dtype=torch.bfloat16, device=DEVICE, load_format="dummy")
    assert len(dequantized) == 8
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for name, m in model.named_modules():
        if name in dequantized:
            assert hasattr(m, "w4_qweight"), f"{name} fell back to dequantized weights"
            for rows in (1, 5, 300):
                x = torch.randn(rows, m.input_size, generator=g, device=DEVICE).bfloat16()
                got = m.quant_method.apply(m, x, None)
                assert rel_err(got, x.float() @ dequantized[name].t()) < 1e-2, (name, rows)
    del model, dequantized
    monkeypatch.undo()
    torch.cuda.empty_cache()
    llm = LLM(str(path), load_format="dummy", max_model_len=512, max_num_seqs=16,
              kv_cache_memory_bytes=2 * 2**30)
    outs = llm.generate([{"prompt_token_ids": list(range(100, 100 + n))} for n in (3, 40, 200)],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24, 24, 24]
    assert llm.llm_engine.runner.graphs is not None and llm.llm_engine.runner.graphs.num_replays


def test_bitsandbytes_on_gpu_equals_cpu(tmp_path):
    """A bitsandbytes nf4 checkpoint (packed without bitsandbytes, which this machine lacks:
    hpcinfer.testing.quant.pack_bnb_nf4) dequantized on the GPU as the checkpoint is read: the
    same weights and, fp32, the same greedy tokens as on the CPU, with CUDA graphs; and the
    online quantization (quantization="bitsandbytes") gives the CPU's weights within float
    rounding (the absmax mean is a reduction whose order differs by device)."""
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.quant import build_bnb_nf4_packed
    from hpcinfer.testing.tiny import tiny_checkpoint
    base = tiny_checkpoint("llama3")
    packed = build_bnb_nf4_packed(base, tmp_path / "nf4")
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(path, device, **kwargs):
        llm = LLM(str(path), device=device, dtype="float32", max_model_len=128, **kwargs)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        weights = {n: p.detach().cpu() for n, p in llm.llm_engine.runner.model.named_parameters()
                   if n.endswith("proj.weight")}
        return tokens, weights, llm
    gpu_tokens, gpu_weights, llm = run(packed, "cuda")
    assert llm.llm_engine.runner.graphs is not None
    cpu_tokens, cpu_weights, _ = run(packed, "cpu")
    assert gpu_tokens == cpu_tokens
    assert all(torch.equal(gpu_weights[n], cpu_weights[n]) for n in cpu_weights)
    _, gpu_online, _ = run(base, "cuda", quantization="bitsandbytes")
    _, cpu_online, _ = run(base, "cpu", quantization="bitsandbytes")
    for name in cpu_online:
        torch.testing.assert_close(gpu_online[name], cpu_online[name], rtol=1e-5, atol=1e-6)


# ---- FP8 KV cache at real sizes: the write (the GPU's cvt, not the interpreter's emulation)
# and the decode / prefill kernels reading e4m3 (bf16 models, Llama-3.1-8B's heads) ----------

def _e4m3_batch(seq_lens, q_lens, seed):
    import dataclasses

    from hpcinfer.kernels.random_batch import make_paged_batch
    b = make_paged_batch(seq_lens, q_lens, num_heads=32, num_kv_heads=8, head_dim=128,
                         block_size=16, dtype=torch.bfloat16, device=DEVICE, seed=seed,
                         poison=False)
    fp8 = torch.float8_e4m3fn
    return dataclasses.replace(b, k_cache=b.k_cache.to(fp8), v_cache=b.v_cache.to(fp8))


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
def test_fp8_kv_cache_write_equals_torch_cast():
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.cache import reshape_and_cache
    b = _e4m3_batch([300, 47, 1000], [300, 47, 1000], seed=3)
    b.k.mul_(100.0)                     # many values past +-448: saturation on both sides
    want_k, want_v = b.k_cache.clone(), b.v_cache.clone()
    reference.reshape_and_cache(b.k, b.v, want_k, want_v, b.slot_mapping)
    reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    assert torch.equal(b.k_cache.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(b.v_cache.view(torch.uint8), want_v.view(torch.uint8))


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("partition_size", [None, 512])
def test_fp8_kv_cache_decode_equals_reference(partition_size):
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.decode_attention import paged_decode_attention
    lens = [1, 15, 17, 300, 513, 1280] * 8
    b = _e4m3_batch(lens, [1] * len(lens), seed=4)
    want = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                            b.seq_lens, 128 ** -0.5)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens,
                                 128 ** -0.5, partition_size=partition_size)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
def test_fp8_kv_cache_prefill_equals_reference():
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.prefill_attention import paged_attention
    b = _e4m3_batch([700, 17, 1100], [700, 9, 64], seed=5)
    want = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                     b.block_tables, 128 ** -0.5)
    got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                          b.block_tables, 128 ** -0.5, max_seqlen_q=b.max_seqlen_q)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
