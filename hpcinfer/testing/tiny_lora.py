"""Tiny PEFT LoRA adapters for tests, and transformers + peft as their greedy oracle.

PEFT initialises B to zero (an untrained adapter changes nothing), which would make any
adapter test pass with LoRA ignored; ``build_tiny_adapter`` draws A and B at random, at a
size where the delta flips greedy tokens.
"""
from __future__ import annotations

from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def build_tiny_adapter(base_dir: str | Path, out_dir: str | Path, *, targets=ATTENTION + MLP,
                       rank: int = 8, alpha: float = 16.0, use_rslora: bool = False,
                       seed: int = 1, scale: float = 1.0) -> Path:
    """Write a PEFT LoRA adapter of the checkpoint at base_dir to out_dir (random A, B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora,
                        target_modules=list(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                fan_in = param.shape[1]
                param.copy_(scale * torch.randn(param.shape, generator=gen) / fan_in ** 0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    return out_dir


def peft_greedy(base_dir: str | Path, adapter_dir: str | Path | None,
                prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers (+ peft when adapter_dir is given) greedy continuations, never stopping
    at EOS: what our engine must reproduce token for token (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(input_ids=torch.tensor([p]), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=0, eos_token_id=None,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
    return out
