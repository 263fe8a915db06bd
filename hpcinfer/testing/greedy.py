"""Transformers as the oracle for greedy decoding: random token-id prompts and the
``generate(do_sample=False)`` continuations our engine must reproduce exactly (fp32).

Shared by the GPU engine tests (tests/gpu/test_engine_gpu.py, test_nccl_world1.py), which run
through tests/gpu/run_gpu_checks.sh and cannot import each other.
"""
from __future__ import annotations

PROMPT_LENGTHS = (1, 3, 9, 17, 40, 77, 130, 200)   # 1 token, block boundaries, > 128
MAX_NEW = 32


def random_prompts(lengths=PROMPT_LENGTHS, seed: int = 0, high: int = 380) -> list[list[int]]:
    """Seeded random ids in [6, high): clear of the tiny tokenizers' pad/bos/eos ids."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, high, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(path: str, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time, never stopping at EOS."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
    return out
