"""LLM.beam_search with LoRA adapters: every beam of a prompt runs with the prompt's adapter,
so the sequences equal transformers + peft's beam search (fp32, CPU); prompts with and
without an adapter share one call."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.lora.request import LoRARequest
from hpcinfer.sampling_params import BeamSearchParams

WIDTH, MAX_NEW = 3, 6


def peft_beams(base_dir, adapter_dir, prompt):
    """transformers (+ peft) beam search, EOS never ending a beam: generated tokens, best
    first."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                             num_beams=WIDTH, num_return_sequences=WIDTH,
                             max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[:, len(prompt):].tolist()


def beams(out, prompt):
    return [seq.tokens[len(prompt):] for seq in out.sequences]


def test_beam_search_runs_each_prompt_with_its_adapter(base, adapter, prompts):
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128, max_loras=1,
              max_lora_rank=8)
    lora = LoRARequest("all-r8", 1, path)
    params = BeamSearchParams(beam_width=WIDTH, max_tokens=MAX_NEW, ignore_eos=True)
    chosen = prompts[1:]
    token_prompts = [{"prompt_token_ids": p} for p in chosen]
    with_adapter = llm.beam_search(token_prompts, params, lora_request=lora)
    for prompt, out in zip(chosen, with_adapter):
        assert beams(out, prompt) == peft_beams(base("llama"), path, prompt)
    assert beams(with_adapter[0], chosen[0]) != peft_beams(base("llama"), None, chosen[0])
    # one adapter per prompt: the first with it, the second on the base
    mixed = llm.beam_search(token_prompts, params, lora_request=[lora, None],
                            concurrency_limit=1)
    assert beams(mixed[0], chosen[0]) == beams(with_adapter[0], chosen[0])
    assert beams(mixed[1], chosen[1]) == peft_beams(base("llama"), None, chosen[1])


def test_beam_search_lora_errors_name_the_prompt(base, adapter, prompts, tmp_path):
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    plain = LLM(base("llama"), device="cpu", max_model_len=128)
    with pytest.raises(ValueError, match="prompt 0: .*LoRA is off.*enable_lora=True"):
        plain.beam_search([prompts[1]], params, lora_request=LoRARequest("a", 1, path))
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128)
    with pytest.raises(ValueError, match="prompt 1: "):
        llm.beam_search([prompts[1], prompts[2]], params,
                        lora_request=[None, LoRARequest("gone", 2, str(tmp_path / "none"))])
    with pytest.raises(ValueError, match="1 lora_request entries for 2 prompts"):
        llm.beam_search([prompts[1], prompts[2]], params,
                        lora_request=[LoRARequest("a", 1, path)])
