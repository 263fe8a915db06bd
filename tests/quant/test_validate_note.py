"""`hpcinfer validate` says how the job's GPU runs a quantized checkpoint (torch-free)."""
from __future__ import annotations

import json
from types import SimpleNamespace

from hpcinfer.compile.checkpoint import quantization_note
from hpcinfer.layers.quant.config import capability_of
from hpcinfer.testing.quant import FORMATS


def _cfg(tmp_path, quant_config, gpu_type=None, device="cuda", quantization=None):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "quantization_config": quant_config}
        if quant_config else {"architectures": ["LlamaForCausalLM"]}))
    return SimpleNamespace(model=SimpleNamespace(id=str(tmp_path)),
                           engine=SimpleNamespace(quantization=quantization),
                           resources=SimpleNamespace(gpu_type=gpu_type, device=device))


def test_capability_of_slurm_gpu_types():
    assert capability_of("h100") == (9, 0) and capability_of("H100_80GB") == (9, 0)
    assert capability_of("a100") == (8, 0) and capability_of("l40s") == (8, 9)
    assert capability_of("mi250") is None and capability_of(None) is None


def test_fp8_on_an_a100_is_said_to_run_dequantized(tmp_path):
    note = quantization_note(_cfg(tmp_path, FORMATS["fp8_block"][0], gpu_type="a100"))
    assert note == ("fp8: fp8 e4m3, block-wise scales [16, 16]; a100 (compute capability 8.0) "
                    "has no FP8 matmul: the weights run dequantized to the model dtype, with no "
                    "speedup and full-size weights in memory")


def test_fp8_on_an_h100_runs_w8a8(tmp_path):
    note = quantization_note(_cfg(tmp_path, FORMATS["ct_fp8_channel"][0], gpu_type="h100"))
    assert note.endswith("W8A8 on h100 (compute capability 9.0)")


def test_online_fp8_and_int4_and_unquantized(tmp_path):
    assert quantization_note(_cfg(tmp_path, None)) is None
    online = quantization_note(_cfg(tmp_path, None, quantization="fp8", device="cpu"))
    assert online.startswith("fp8 (online") and "dequantized once at load" in online
    assert "W4A16 Triton kernel" in quantization_note(_cfg(tmp_path, FORMATS["awq"][0]))


def test_bitsandbytes_is_said_to_load_dequantized(tmp_path):
    note = quantization_note(_cfg(tmp_path, {"quant_method": "bitsandbytes",
                                             "load_in_4bit": True,
                                             "bnb_4bit_quant_type": "nf4"}, gpu_type="h100"))
    assert note == ("bitsandbytes: 4-bit nf4 weights, dequantized to the model dtype at load "
                    "(no bitsandbytes kernel: the weights take as much memory as unquantized "
                    "ones)")
