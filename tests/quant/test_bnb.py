"""bitsandbytes checkpoints, written by transformers + bitsandbytes themselves (4-bit nf4 with
double quantization, 4-bit fp4, 8-bit LLM.int8), load dequantized and give the greedy tokens
transformers gives on the same model dequantized by bitsandbytes; the dequantizer equals
bitsandbytes' own bit for bit; incomplete checkpoints and bad configs are refused before any
weight is read, on the login node with the same words."""
from __future__ import annotations

import json

import pytest
import torch

from hpcinfer.compile.checkpoint import checkpoint_problem, quantization_problem
from hpcinfer.layers.quant.config import QuantConfigError, quant_spec_of
from hpcinfer.testing.quant import BNB_CONFIGS


@pytest.mark.parametrize("fmt", sorted(BNB_CONFIGS))
def test_greedy_equals_transformers_on_the_bnb_dequantized_model(fmt, bnb, engine_tokens,
                                                                 oracle_tokens):
    quant_dir, oracle_dir = bnb(fmt)
    assert "quantization_config" in json.loads((quant_dir / "config.json").read_text())
    got, llm = engine_tokens(str(quant_dir))
    assert got == oracle_tokens(str(oracle_dir))
    from safetensors.torch import load_file
    oracle = load_file(str(oracle_dir / "model.safetensors"))
    params = dict(llm.llm_engine.runner.model.named_parameters())
    # the loaded q piece of the merged qkv is bitsandbytes' dequantized q_proj, bit for bit
    q = oracle["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(params["model.layers.0.self_attn.qkv_proj.weight"][:q.shape[0]], q)


@pytest.mark.parametrize("shape, quant_type, double", [
    ((64, 100), "nf4", True),     # 100 absmax blocks: the last nested block of 256 is partial
    ((48, 64), "fp4", False), ((96, 640), "nf4", True)])
def test_dequantize_4bit_equals_bitsandbytes(shape, quant_type, double):
    import bitsandbytes.functional as bnbf

    from hpcinfer.layers.quant.bnb import dequantize_4bit
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                       compress_statistics=double)
    parts = state.as_dict(packed=True)
    key = next(k for k in parts if k.startswith("quant_state."))
    meta = json.loads(bytes(parts[key].tolist()).decode())
    ours = dequantize_4bit(packed, parts["absmax"], parts["quant_map"], meta,
                           parts.get("nested_absmax"), parts.get("nested_quant_map"))
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state).float())


def test_a_missing_absmax_is_refused_before_loading(bnb, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file
    quant_dir, _ = bnb("bnb_nf4_double")
    broken = tmp_path / "broken"
    shutil.copytree(quant_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight.absmax"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((broken / "config.json").read_text())
    words = "has no model.layers.1.mlp.down_proj.weight.absmax"
    assert words in quantization_problem(hf, str(broken))
    import hpcinfer.models.registry as registry

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the checkpoint was refused")
    monkeypatch.setattr(registry, "load_weights", refuse)
    from hpcinfer import LLM
    with pytest.raises(QuantConfigError, match=words):
        LLM(str(broken), device="cpu", max_model_len=64)


def test_configs_read_and_refused():
    spec = quant_spec_of({"quantization_config": {"quant_method": "bitsandbytes",
                                                  "_load_in_4bit": True, "load_in_4bit": True,
                                                  "bnb_4bit_quant_type": "nf4",
                                                  "llm_int8_skip_modules": ["lm_head"]}})
    assert spec.is_bnb and spec.layout == "nf4" and spec.ignore == ("lm_head",)
    assert "dequantized to the model dtype at load" in spec.describe()
    assert quant_spec_of({"quantization_config": {"quant_method": "bitsandbytes",
                                                  "load_in_8bit": True}}).scheme == "bnb8"
    hf = {"architectures": ["LlamaForCausalLM"],
          "quantization_config": {"quant_method": "bitsandbytes"}}
    problem = checkpoint_problem(hf, 1, 1, None)
    assert problem is not None and "neither (or both) of load_in_4bit" in problem[1]
    with pytest.raises(QuantConfigError, match="bnb_4bit_quant_type 'int4'"):
        quant_spec_of({"quantization_config": {"quant_method": "bitsandbytes",
                                               "load_in_4bit": True,
                                               "bnb_4bit_quant_type": "int4"}})


def test_online_nf4_rounds_as_bitsandbytes_quantizes():
    # bitsandbytes' reference quantizer (torch) is what nf4_round_trip mirrors; its compiled
    # CPU kernel picks the neighbouring 8-bit code for a few double-quantized absmax values
    # (4-10 of 4,096 here), so a few blocks differ by one step of that code.
    import bitsandbytes.functional as bnbf

    from hpcinfer.layers.quant.bnb import dynamic_map, nf4_round_trip
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    for shape in [(3, 70), (64, 100), (256, 1024)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
        ref, ours = bnbf.dequantize_4bit(packed, state), nf4_round_trip(w)
        assert (ours == ref).float().mean() > 0.99
        torch.testing.assert_close(ours, ref, rtol=2e-2, atol=1e-6)


def test_online_bitsandbytes_rounds_the_decoder_projections(base_dir, tmp_path, engine_tokens,
                                                            oracle_tokens):
    from hpcinfer.layers.quant.config import quant_spec_of
    from hpcinfer.testing.quant import build_online_nf4_oracle
    oracle = build_online_nf4_oracle(base_dir, tmp_path / "oracle")
    got, _ = engine_tokens(str(base_dir), quantization="bitsandbytes")
    assert got == oracle_tokens(str(oracle))
    assert got != oracle_tokens(str(base_dir))   # the rounding changes the tokens
    assert "online" in quant_spec_of({}, "bitsandbytes").describe()


def test_the_gpu_tests_packer_writes_what_bitsandbytes_reads(base_dir, tmp_path):
    # tests/gpu packs without bitsandbytes (hpcinfer.testing.quant.pack_bnb_nf4): the
    # layout must be the one bitsandbytes (and so our loader) reads
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    from hpcinfer.testing.quant import pack_bnb_nf4
    w = torch.randn(96, 640, generator=torch.Generator().manual_seed(2))
    parts = pack_bnb_nf4(w)
    state = QuantState.from_dict({k.removeprefix(".weight."): v for k, v in parts.items()
                                  if k != ".weight"}, device="cpu")
    from hpcinfer.layers.quant.bnb import nf4_round_trip
    assert torch.equal(bnbf.dequantize_4bit(parts[".weight"], state), nf4_round_trip(w))
