"""The quantized GEMM kernels against their torch references (Triton interpreter on CPU, tiny
shapes; full shapes on the GPU: tests/gpu/test_quant_gpu.py), and the layers' kernel paths
(repacking in process_after_loading, activation quantization in apply) against the
dequantized matmul the CPU path runs."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import quant_reference as kref
from hpcinfer.kernels.fp8_gemm import fp8_block_gemm
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.w4a16_gemm import w4a16_gemm


def _int4_weight(k, n, group, desc_act, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g)
    groups = k // group
    zeros = torch.randint(0, 16, (groups, n), generator=g, dtype=torch.int32)
    scales = torch.rand(groups, n, generator=g) * 0.05 + 0.01
    g_idx = (torch.randperm(k, generator=g).to(torch.int32) // group) if desc_act else None
    return kref.pack_k(codes), codes, zeros, scales, g_idx


def test_pack_k_layout():
    codes = torch.arange(16).repeat(2).reshape(8, 4) % 16       # k rows 0..7, 4 columns
    packed = kref.pack_k(codes)
    assert packed.shape == (1, 4)
    # nibble i of the word holds k = i: column 0 has codes 0, 4, 8, 12, 0, 4, 8, 12
    assert packed[0, 0].item() == int("c840c840", 16) - (1 << 32)
    assert torch.equal(kref.unpack_k(packed), codes)


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group, desc_act", [(32, False), (64, True), (128, False)])
def test_w4a16_kernel_matches_reference(m, dtype, group, desc_act):
    k, n = 256, 80                                       # N not a multiple of the tile
    qweight, _, zeros, scales, g_idx = _int4_weight(k, n, group, desc_act)
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    want = kref.w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("split_k", [2, 3, 4])
@pytest.mark.parametrize("group, desc_act", [(32, False), (64, True), (128, False)])
@pytest.mark.parametrize("reshape", [False, True])
def test_w4a16_split_k_matches_reference(m, split_k, group, desc_act, reshape):
    """Split-K (disjoint K ranges, fp32 partials summed): K=512 in 64-wide steps is 8 steps,
    3 splits leave a short last one; both ways of reading the packed words."""
    from hpcinfer.kernels.w4a16_gemm import W4A16Config
    k, n = 512, 48
    qweight, _, zeros, scales, g_idx = _int4_weight(k, n, group, desc_act, seed=split_k)
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    cfg = W4A16Config(16, 32, 64, 4, split_k, reshape)
    got = w4a16_gemm(a, qweight, zeros, scales, g_idx, group, config=cfg)
    want = kref.w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-2)
    single = w4a16_gemm(a, qweight, zeros, scales, g_idx, group, config=cfg._replace(split_k=1))
    assert not torch.equal(got, torch.zeros_like(got))
    torch.testing.assert_close(got.float(), single.float(), rtol=2e-3, atol=2e-2)


def test_w4a16_config_table_by_m():
    """The launches the H200 sweep (bench/results/kernels-w4a16-sweep-nvidia-h200-2026-12-03
    .json) measured best or within 7% of it: [16, 128] x 128 tiles at M <= 16, split-K to
    about 4 waves of SMs at decode M (2 at M > 64), packed words read once and reshaped."""
    from hpcinfer.kernels.w4a16_gemm import config_for
    def pick(m, n, k, group=128, g_idx=False):
        c = config_for(m, n, k, group, g_idx, sms=132)
        return (c.block_m, c.block_n, c.block_k, c.num_warps, c.split_k, c.unpack_reshape)
    assert pick(1, 4096, 14336) == (16, 128, 128, 4, 8, True)       # 8B down: 0.038 ms best
    assert pick(1, 8192, 28672) == (16, 128, 128, 4, 8, True)       # 70B down: 0.109 best
    assert pick(16, 57344, 8192) == (16, 128, 128, 4, 2, True)      # 70B gate_up: 0.205 best
    assert pick(64, 4096, 14336) == (64, 128, 64, 4, 8, True)       # 8B down: 0.047 best
    assert pick(64, 8192, 28672) == (64, 128, 64, 4, 8, True)       # 70B down: 0.132 best
    assert pick(256, 8192, 28672)[:5] == (128, 128, 64, 8, 4)   # 70B down: 0.376 (best 0.373)
    assert pick(256, 57344, 8192)[4] == 1                           # 70B gate_up: 0.701 best
    assert pick(2048, 4096, 4096)[4] == 1                           # prefill: grid is full
    assert pick(1, 4096, 4096, group=32)[2] == 32                   # one group a step
    assert pick(1, 4096, 4096, g_idx=True)[2] == 128                # g_idx: any step
    assert pick(1, 64, 256)[4] == 1                                 # 2 steps: no split


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group, desc_act", [(32, False), (64, True)])
def test_w4a16_dequantize_equals_reference(dtype, group, desc_act):
    """The large-M path's dequantize pass: whole weight and column slices (a ragged last
    tile), each element rounded once from fp32 as the reference's weight .to(dtype)."""
    from hpcinfer.kernels.w4a16_gemm import w4a16_dequantize
    k, n = 256, 200
    qweight, _, zeros, scales, g_idx = _int4_weight(k, n, group, desc_act)
    want = kref.w4a16_weight(qweight, zeros, scales, g_idx, group).to(dtype)
    got = w4a16_dequantize(qweight, zeros, scales, g_idx, group, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    for start, end in ((0, 128), (128, 200), (40, 77)):
        part = w4a16_dequantize(qweight, zeros, scales, g_idx, group, dtype, start, end)
        assert torch.equal(part, want[:, start:end]), (start, end)


@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("group, desc_act", [(32, False), (64, True)])
def test_w4a16_linear_picks_kernel_or_dequantize_by_m(monkeypatch, m, group, desc_act):
    """w4a16_linear: the fused kernel below DEQUANT_MIN_M rows, dequantize + matmul from it
    on (here in 128-column slices, the last one ragged); both equal the reference."""
    from hpcinfer.kernels import w4a16_gemm as mod
    k, n = 256, 200
    qweight, _, zeros, scales, g_idx = _int4_weight(k, n, group, desc_act)
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    monkeypatch.setattr(mod, "DEQUANT_MIN_M", 32)
    monkeypatch.setattr(mod, "DEQUANT_CHUNK_BYTES", k * 2 * 128)
    calls = []
    for name in ("w4a16_gemm", "w4a16_dequantize"):
        monkeypatch.setattr(mod, name, lambda *a, f=getattr(mod, name), name=name, **kw:
                            calls.append(name) or f(*a, **kw))
    got = mod.w4a16_linear(a, qweight, zeros, scales, g_idx, group)
    want = kref.w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-2)
    assert got.shape == (m, n) and got.dtype == torch.float16
    assert calls == (["w4a16_gemm"] if m < 32 else ["w4a16_dequantize"] * 2)


def test_w4a16_launcher_checks():
    qweight, _, zeros, scales, _ = _int4_weight(128, 64, 32, False)
    with pytest.raises(KernelArgumentError, match="packs 128 input features, a has 64"):
        w4a16_gemm(torch.randn(2, 64), qweight, zeros, scales, None, 32)
    with pytest.raises(KernelArgumentError, match="scales has dtype torch.float16"):
        w4a16_gemm(torch.randn(2, 128), qweight, zeros, scales.half(), None, 32)


def _fp8_weight(n, k, block, seed=0):
    bn, bk = block
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    padded = torch.nn.functional.pad(w, (0, 0, 0, -n % bn))
    scales = (padded.reshape(-1, bn, k // bk, bk).abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
    full = scales.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n]
    return (w / full).clamp(-448, 448).to(kref.FP8), scales


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("n, k, block", [(96, 128, (32, 32)), (80, 256, (64, 128))])
def test_fp8_block_kernel_matches_reference(m, n, k, block):
    b, b_scales = _fp8_weight(n, k, block)             # 80 rows: a partial last block
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    a, a_scales = kref.quantize_per_token_group(x, block[1])
    got = fp8_block_gemm(a, a_scales, b, b_scales, block, torch.float32)
    want = kref.fp8_block_gemm(a, a_scales, b, b_scales, block, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fp8_block_launcher_checks():
    b, b_scales = _fp8_weight(64, 128, (32, 32))
    a, a_scales = kref.quantize_per_token_group(torch.randn(3, 128), 32)
    with pytest.raises(KernelArgumentError, match=r"b_scales must be \[ceil\(N/64\), K/32\]"):
        fp8_block_gemm(a, a_scales, b, b_scales, (64, 32), torch.float32)
    with pytest.raises(KernelArgumentError, match="a has dtype torch.float32"):
        fp8_block_gemm(a.float(), a_scales, b, b_scales, (32, 32), torch.float32)


# ---- the layers' kernel paths, run on CPU tensors through the interpreter ------------------

def _loaded_qkv_layer(fmt):
    """A QKV layer (hidden 128, 4 heads of 32, 2 KV heads) with ``fmt``'s method, filled from
    tensors packed by hpcinfer.testing.quant; returns (layer, the oracle weight [out, in])."""
    from hpcinfer.layers.linear import QKVParallelLinear
    from hpcinfer.layers.quant.apply import method_for
    from hpcinfer.layers.quant.config import quant_spec_of
    from hpcinfer.testing.quant import FORMATS, quantize_tensors
    spec = quant_spec_of({"quantization_config": FORMATS[fmt][0]})
    layer = QKVParallelLinear(128, 32, 4, 2)
    layer.set_quant_method(method_for(spec), torch.float32)
    g = torch.Generator().manual_seed(3)
    weights = {f"model.layers.0.self_attn.{p}_proj.weight": torch.randn(rows, 128, generator=g)
               / 8 for p, rows in (("q", 128), ("k", 64), ("v", 64))}
    tensors, oracle = quantize_tensors(weights, fmt)
    for name, tensor in tensors.items():
        piece, _, param = name.removeprefix("model.layers.0.self_attn.").partition("_proj.")
        if param in layer.shardings:
            layer.weight_loader(getattr(layer, param), tensor, piece)
    return layer, torch.cat([oracle[f"model.layers.0.self_attn.{p}_proj.weight"]
                             for p in "qkv"])


@pytest.mark.parametrize("fmt", ["awq", "gptq_asym_desc_act", "gptq_sym", "ct_w4a16_asym"])
def test_int4_layer_kernel_path_equals_dequantized(fmt):
    layer, oracle = _loaded_qkv_layer(fmt)
    torch.testing.assert_close(layer.quant_method.dequantized(layer), oracle, rtol=0, atol=0)
    drop = tuple(n for n in layer.shardings if n != "bias")
    assert layer.quant_method._prepare_kernel(layer, drop)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(4))
    got = layer(x)
    torch.testing.assert_close(got, x @ oracle.t(), rtol=1e-4, atol=1e-4)


def test_fp8_block_layer_kernel_path():
    layer, oracle = _loaded_qkv_layer("fp8_block")
    assert layer.quant_method._kernel_fits(layer)
    layer.quant_method._prepare_w8a8(layer)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(4))
    got = layer(x)
    a, a_scales = kref.quantize_per_token_group(x, 16)
    want = kref.fp8_block_gemm(a, a_scales, layer.weight, layer.fp8_block_scales, (16, 16),
                               torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and close to the unquantized-activation matmul (the activations' e4m3 rounding only)
    err = (got - x @ oracle.t()).norm() / (x @ oracle.t()).norm()
    assert err < 0.05, err


def test_merged_pieces_with_different_act_orders_fall_back_to_dequantized():
    layer, _ = _loaded_qkv_layer("gptq_asym_desc_act")
    layer.g_idx.data[1] = layer.g_idx.data[1].flip(0)     # k's act order differs from q's
    drop = tuple(n for n in layer.shardings if n != "bias")
    assert not layer.quant_method._prepare_kernel(layer, drop)


@pytest.mark.parametrize("fmt", ["ct_fp8_channel", "ct_fp8_tensor_static", "fbgemm_fp8"])
@pytest.mark.parametrize("m", [7, 70])
def test_fp8_rowwise_layer_path(fmt, m):
    # torch._scaled_mm runs on CPU too: the GPU path's operand layout and scale shapes.
    # 7 rows: W8A16 (the e4m3 weight upcast, activations as they are); 70 rows (above
    # W8A16_MAX_M): W8A8, activations quantized per token by the fused kernel.
    from hpcinfer.kernels.fp8_gemm import W8A16_MAX_M
    assert 7 <= W8A16_MAX_M < 70
    layer, oracle = _loaded_qkv_layer(fmt)
    assert layer.quant_method._kernel_fits(layer)
    layer.quant_method._prepare_w8a8(layer)
    assert "input_scale" not in layer._parameters          # W8A8 quantizes per token
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(4))
    got = layer(x)
    if m <= W8A16_MAX_M:
        want = x @ oracle.t()                               # oracle = e4m3 weight x its scale
    else:
        a, a_scales = kref.quantize_per_token(x)
        want = (a.float() * a_scales) @ oracle.t()
        assert (got - x @ oracle.t()).abs().max() > 1e-3  # the activations' rounding shows
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k, group", [(256, None), (256, 64), (8192, None), (384, 128)])
def test_quantize_fp8_equals_reference(dtype, k, group):
    """The fused per-token(-group) quantization: the same scales and e4m3 codes as the torch
    reference, bit for bit (one-pass groups <= 4096, two-pass 8192; a zero row keeps the
    1e-12 floor; values that round up across a power of two, e.g. 127.2 -> 128)."""
    from hpcinfer.kernels.fp8_gemm import quantize_fp8
    x = (torch.randn(6, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    x[2] = 0
    x[3, :4] = torch.tensor([448.0, 127.2, -31.9, 1e-3])
    q, scales = quantize_fp8(x, group)
    want_q, want_scales = kref.quantize_per_token_group(x, group or k)
    assert q.dtype == kref.FP8 and scales.shape == (6, k // (group or k))
    assert torch.equal(scales, want_scales)
    assert torch.equal(q.float(), want_q.float())
    strided = torch.cat([x, x], dim=1)[:, :k]                # row stride 2K
    q2, s2 = quantize_fp8(strided, group)
    assert torch.equal(q2.float(), want_q.float()) and torch.equal(s2, want_scales)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_w8a16_kernel_matches_reference(m, dtype):
    """W8A16 (decode M): a @ (e4m3 weight x per-channel scale)^T, split-K included (K=1024:
    8 steps of 128 split in 2 at M <= 16, 16 of 64 split in 4 at M=33), ragged N, bias."""
    from hpcinfer.kernels.fp8_gemm import fp8_w8a16_gemm
    n, k = 80, 1024
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6))
    w_scales = w.abs().amax(dim=1) / 448
    b = (w / w_scales[:, None]).to(kref.FP8)
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(n).to(dtype)
    got = fp8_w8a16_gemm(a, b, w_scales.reshape(1, -1), bias)
    want = a.float() @ (b.float() * w_scales[:, None]).t() + bias.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * 10)
    with pytest.raises(KernelArgumentError, match="b_scales must have N=80 entries"):
        fp8_w8a16_gemm(a, b, w_scales[:40])
