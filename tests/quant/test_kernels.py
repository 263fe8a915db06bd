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
    """Decode rows get thin tiles and split-K up to about one wave of SMs; prefill none."""
    from hpcinfer.kernels.w4a16_gemm import config_for
    decode = config_for(1, 4096, 4096, 128, False, sms=132)      # 64 tiles of 64 columns
    assert (decode.block_m, decode.block_n, decode.split_k) == (16, 64, 4)
    assert config_for(1, 57344, 8192, 128, False, sms=132).split_k == 1   # 70B gate_up
    assert config_for(1, 8192, 28672, 128, False, sms=132).split_k == 2   # 70B down
    assert config_for(256, 4096, 4096, 128, False, sms=132).block_m == 128
    prefill = config_for(2048, 4096, 4096, 128, False, sms=132)
    assert prefill.split_k == 1 and prefill.block_m == 128
    assert config_for(1, 4096, 4096, 32, False).block_k == 32            # one group a step
    assert config_for(1, 4096, 4096, 128, True).block_k == 128           # g_idx: any step
    assert config_for(1, 64, 256, 128, False, sms=132).split_k == 1      # 4 steps: no split


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
def test_fp8_rowwise_layer_path(fmt):
    # torch._scaled_mm runs on CPU too: the GPU path's operand layout and scale shapes
    layer, oracle = _loaded_qkv_layer(fmt)
    assert layer.quant_method._kernel_fits(layer)
    layer.quant_method._prepare_w8a8(layer)
    assert "input_scale" not in layer._parameters          # W8A8 quantizes per token
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(4))
    got = layer(x)
    a, a_scales = kref.quantize_per_token(x)
    want = (a.float() * a_scales) @ oracle.t()              # oracle = e4m3 weight x its scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
