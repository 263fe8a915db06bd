"""Every quantized format, packed by hpcinfer.testing.quant as its own tools pack it, gives the
greedy tokens transformers gives on the same weights dequantized to fp32 (CPU: the engine
dequantizes once at load, so the weights are the oracle's bit for bit)."""
from __future__ import annotations

import pytest

from hpcinfer.layers.linear import LinearBase
from hpcinfer.testing.quant import FORMATS


def _quant_methods(llm) -> set[str]:
    model = llm.llm_engine.runner.model
    return {type(m.quant_method).__name__ for m in model.modules() if isinstance(m, LinearBase)}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_greedy_equals_transformers_on_dequantized_weights(fmt, quantized, engine_tokens,
                                                           oracle_tokens):
    quant_dir, oracle_dir = quantized(fmt)
    got, llm = engine_tokens(quant_dir)
    # Decoder projections quantized, and nothing else (OPT-style project_in/out, lm_head).
    assert _quant_methods(llm) == {"Fp8Method" if "fp8" in fmt else "Int4Method"}
    assert got == oracle_tokens(oracle_dir)


@pytest.mark.parametrize("family, fmt", [
    ("qwen2", "awq"),               # q/k/v biases beside packed weights, tied embeddings
    ("qwen3", "fp8_block"),         # q/k norms, head_dim 32 != hidden / heads
    ("gemma", "ct_w4a16_asym"),     # one KV head, (1 + w) norms, GeGLU
    ("opt", "gptq_asym_desc_act"),  # out_proj / fc1 / fc2 with biases; project_in/out stay
])
def test_other_families(family, fmt, quantized, engine_tokens, oracle_tokens):
    quant_dir, oracle_dir = quantized(fmt, family)
    got, _ = engine_tokens(quant_dir)
    assert got == oracle_tokens(oracle_dir)


def test_online_fp8_equals_transformers_on_its_weights(base_dir, tmp_path, engine_tokens,
                                                       oracle_tokens):
    from hpcinfer.testing.quant import build_online_fp8_oracle
    oracle = build_online_fp8_oracle(base_dir, tmp_path / "online-oracle")
    got, llm = engine_tokens(str(base_dir), quantization="fp8")
    assert _quant_methods(llm) == {"Fp8OnlineMethod"}
    want = oracle_tokens(str(oracle))
    assert got == want
    plain, _ = engine_tokens(str(base_dir))
    assert plain != want, "fp8 rounding changed no token: the test could not fail"


@pytest.mark.parametrize("fmt", ["fp8_block", "ct_fp8_tensor_static", "fbgemm_fp8", "awq",
                                 "gptq_asym_desc_act", "ct_w4a16_asym"])
def test_phi3_fused_projections(fmt, quantized, engine_tokens, oracle_tokens):
    """Phi-3 stores qkv_proj and gate_up_proj fused: quantized as one layer each (one
    per-tensor scale, blocks and packs across the q|k|v rows, one act order), split into our
    merged layers' pieces at load."""
    quant_dir, oracle_dir = quantized(fmt, "phi3")
    got, llm = engine_tokens(quant_dir)
    assert _quant_methods(llm) == {"Fp8Method" if "fp8" in fmt else "Int4Method"}
    assert got == oracle_tokens(oracle_dir)
