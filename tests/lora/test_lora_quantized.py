"""LoRA adapters over a quantized base (what a QLoRA-style adapter on an AWQ/GPTQ/FP8 release
needs): the hooks add the delta to the quantized layer's output, so greedy tokens equal
transformers + peft on the same base with its weights dequantized to fp32 (the quantization
tests' oracle). Quantized layers never stack the shrink under their weight, even when asked."""
from __future__ import annotations

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.lora.request import LoRARequest

PROMPTS = [[5, 17, 33, 101, 7], [9, 8, 250, 3, 44, 61, 12, 19, 2, 88, 71]]
MAX_NEW = 8


@pytest.mark.parametrize("fmt", ["awq", "gptq_asym_desc_act", "fp8_block"])
def test_adapter_over_a_quantized_base_equals_peft_on_the_dequantized_base(
        fmt, base, tmp_path_factory, monkeypatch):
    from hpcinfer.testing.quant import build_quantized
    from hpcinfer.testing.tiny_lora import build_tiny_adapter, peft_greedy
    monkeypatch.setenv("HPCINFER_LORA_SHRINK", "stacked")
    tmp = tmp_path_factory.mktemp(f"lora-{fmt}")
    quantized, oracle = build_quantized(base("llama"), fmt, tmp)
    adapter = build_tiny_adapter(oracle, tmp / "adapter", rank=8, alpha=16.0, seed=3)
    llm = LLM(str(quantized), device="cpu", enable_lora=True, max_model_len=64, max_loras=1,
              max_lora_rank=8)
    assert not any(layer.stacked for layer in llm.llm_engine.lora.layers)
    lora = LoRARequest("a", 1, str(adapter))
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS] * 2,
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                        use_tqdm=False, lora_request=[lora] * 2 + [None] * 2)
    got = [o.outputs[0].token_ids for o in outs]
    with_adapter = peft_greedy(oracle, adapter, PROMPTS, MAX_NEW)
    assert got[:2] == with_adapter
    assert got[2:] == peft_greedy(oracle, None, PROMPTS, MAX_NEW)
    assert with_adapter != got[2:]   # the adapter changes the output
