"""LoRA on the other families that use the wrapped layers (q/k/v, o, gate/up, down): one
adapter on every projection of a dense model (attention only on the mixtures of experts,
whose experts take no LoRA), mixed with base rows in one generate: greedy tokens equal
transformers + peft (fp32, CPU), and so do the first step's top two logprobs, which is how
the test sees the adapter act on the tiny Gemma 2/3 models (their greedy tokens repeat the
prompt's last token whatever the adapter)."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.lora.request import LoRARequest
from hpcinfer.testing.tiny_lora import ATTENTION, MLP

MAX_NEW = 8


def peft_first_logprobs(base_dir, adapter_dir, prompts) -> list[list[float]]:
    """transformers (+ peft): the two largest log-softmax values after each prompt."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(),
                                  -1).topk(2).values.tolist() for p in prompts]


@pytest.mark.parametrize("family, targets", [
    ("mistral", ATTENTION + MLP),
    ("qwen3", ATTENTION + MLP),      # q/k norms, head_dim apart from hidden / heads
    ("gemma", ATTENTION + MLP),      # (1 + w) norms, GeGLU, one KV head, tied embeddings
    ("gemma2", ATTENTION + MLP),     # soft-capping, sliding + global layers
    ("gemma3", ATTENTION + MLP),     # q/k norms, local rope base
    ("mixtral", ATTENTION),          # MoE: the attention projections
    ("qwen3_moe", ATTENTION),
])
def test_adapter_and_base_rows_equal_peft(family, targets, base, adapter, oracle, prompts):
    path = adapter(family, "fam-r8", rank=8, alpha=64.0, targets=targets, seed=21, scale=3.0)
    llm = LLM(base(family), device="cpu", enable_lora=True, max_model_len=128, max_loras=1,
              max_lora_rank=8)
    lora = LoRARequest("fam-r8", 1, path)
    n = len(prompts)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts] * 2,
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                       logprobs=2),
                        use_tqdm=False, lora_request=[lora] * n + [None] * n)
    got = [o.outputs[0].token_ids for o in outs]
    assert got[:n] == oracle(family, path, prompts, MAX_NEW)
    assert got[n:] == oracle(family, None, prompts, MAX_NEW)
    # the first step's top two logprobs (the second one sees the adapter even where the top
    # token's probability rounds to 1 in fp32, as on the tiny Gemma 3)
    first = [sorted((lp.logprob for lp in o.outputs[0].logprobs[0].values()), reverse=True)[:2]
             for o in outs]
    want = (peft_first_logprobs(base(family), path, prompts)
            + peft_first_logprobs(base(family), None, prompts))
    for row, expected in zip(first, want):
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # the adapter acts
    assert max(abs(x - y) for a, b in zip(first[:n], first[n:]) for x, y in zip(a, b)) > 1e-2
