"""A quantization the engine cannot run is refused with one message naming what is supported,
before any weight is read, and ``hpcinfer validate`` (hpcinfer.compile.checkpoint, torch-free)
refuses it with the same words."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from hpcinfer.compile.checkpoint import checkpoint_problem, quantization_problem
from hpcinfer.layers.quant.config import SUPPORTED_TEXT, QuantConfigError
from hpcinfer.testing.quant import FORMATS, build_quantized


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if the engine starts reading tensors."""
    import hpcinfer.models.registry as registry

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the quantization was refused")
    monkeypatch.setattr(registry, "load_weights", refuse)


def _engine_error(path, **kwargs) -> str:
    from hpcinfer import LLM
    with pytest.raises(QuantConfigError) as info:
        LLM(str(path), max_model_len=64, **kwargs)
    return str(info.value)


def _with_config(base_dir, tmp_path, fmt, **changes):
    quant_config = {**FORMATS[fmt][0], **changes}
    quant_dir, _ = build_quantized(base_dir, fmt, tmp_path, quantization_config=quant_config)
    return quant_dir


def _login_message(path, tensor=1, quantization=None) -> str | None:
    hf = json.loads((path / "config.json").read_text())
    problem = checkpoint_problem(hf, tensor, 1, quantization)
    if problem is not None:
        return problem[1]
    return quantization_problem(hf, str(path), quantization)


@pytest.mark.parametrize("fmt, changes, words", [
    ("awq", {"quant_method": "hqq"}, "unknown quant_method 'hqq'"),
    ("fp8_block", {"weight_block_size": [24, 24]}, "weight block size [24, 24] does not divide "
                                                   "qkv_proj"),
    ("gptq_sym", {"bits": 8}, "8-bit weights (only 4-bit)"),
    ("gptq_sym", {"group_size": 48}, "group_size 48"),
    ("awq", {"version": "gemv"}, "version 'gemv'"),
])
def test_bad_config_fails_before_loading(fmt, changes, words, base_dir, tmp_path,
                                         no_weight_reads):
    path = _with_config(base_dir, tmp_path, fmt, **changes)
    message = _engine_error(path)
    assert words in message
    if "unknown" in words or "bit" in words or "version" in words or "group_size" in words:
        assert SUPPORTED_TEXT in message     # names what is supported
    assert _login_message(path) == message  # validate says the same


def test_block_that_divides_one_rank_but_not_two(base_dir, tmp_path, no_weight_reads):
    # [16, 32]: fine at TP=1 (k and v are 32 rows, hidden 64); at TP=2 each rank holds 16 KV
    # rows, half a block.
    path = _with_config(base_dir, tmp_path, "fp8_block", weight_block_size=[32, 16])
    assert _login_message(path) is None
    message = _login_message(path, tensor=2)
    assert "weight block size [32, 16] does not divide qkv_proj" in message
    assert "tensor parallel size 2" in message


def test_missing_scales_fail_before_loading(base_dir, tmp_path, no_weight_reads):
    path, _ = build_quantized(base_dir, "fp8_block", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(tensors, str(path / "model.safetensors"))
    message = _engine_error(path)
    assert message == ("quantization fp8: the checkpoint has no weight_scale_inv for 1 quantized "
                       "layer(s), e.g. model.layers.1.mlp.down_proj.weight_scale_inv: it is "
                       "incomplete, or its quantization_config does not describe its tensors")
    assert _login_message(path) == message


def test_missing_g_idx_of_gptq(base_dir, tmp_path, no_weight_reads):
    path, _ = build_quantized(base_dir, "gptq_asym_desc_act", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.g_idx"]
    save_file(tensors, str(path / "model.safetensors"))
    assert "no g_idx for 1 quantized layer(s), e.g. model.layers.0.self_attn.k_proj.g_idx" \
        in _engine_error(path)


def test_quantization_argument_must_match_the_checkpoint(base_dir, quantized,
                                                         no_weight_reads):
    awq_dir, _ = quantized("awq")
    message = _engine_error(awq_dir, quantization="gptq")
    assert "the checkpoint is quantized with awq" in message
    message = _engine_error(base_dir, quantization="awq")
    assert "needs a checkpoint quantized that way" in message


def test_unknown_quantization_argument_names_the_supported():
    from hpcinfer.engine.config import EngineConfig
    with pytest.raises(ValueError, match="quantization='int3' is not supported; hpcinfer "
                                         "supports fp8"):
        EngineConfig(model="x", quantization="int3")
