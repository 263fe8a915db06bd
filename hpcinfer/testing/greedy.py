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


class ForcedSampler:
    """Wraps an engine's sampler (synchronous steps): records each row's argmax and its
    top-1/top-2 logit gap (nats); with ``forced`` it then feeds the row the forced token
    instead, so two backends decode the same context (teacher forcing through the real
    decode path)."""

    def __init__(self, inner, forced: list[list[int]] | None):
        self.inner, self.forced = inner, forced
        self.argmax: dict[int, list[int]] = {}
        self.gaps: dict[int, list[float]] = {}

    def __call__(self, logits, seqs, eos_token_ids, grammar_mask=None, all_plain=False):
        out = self.inner(logits, seqs, eos_token_ids, grammar_mask, all_plain=all_plain)
        top = logits.float().topk(2, dim=-1).values
        gaps = (top[:, 0] - top[:, 1]).tolist()
        for i, seq in enumerate(seqs):
            rid = int(seq.request_id)
            self.argmax.setdefault(rid, []).append(out.token_ids[i])
            self.gaps.setdefault(rid, []).append(gaps[i])
            if self.forced is not None:
                out.token_ids[i] = self.forced[rid][seq.num_output_tokens]
        return out


def linear_forms(model) -> dict[str, int]:
    """How the linear layers run, counted: "<method>: w4a16 kernel" (packed 4-bit weights),
    "<method>: w8a8" (e4m3 weights) or "<method>: <dtype> weight" (plain or dequantized)."""
    import torch

    from hpcinfer.layers.linear import LinearBase
    forms: dict[str, int] = {}
    for m in model.modules():
        if not isinstance(m, LinearBase):
            continue
        name = type(m.quant_method).__name__
        weight = m._parameters.get("weight")
        if hasattr(m, "w4_qweight"):
            form = "w4a16 kernel"
        elif weight is not None and weight.dtype == torch.float8_e4m3fn:
            form = "w8a8"
        else:
            form = f"{str(weight.dtype).removeprefix('torch.')} weight"
        forms[f"{name}: {form}"] = forms.get(f"{name}: {form}", 0) + 1
    return forms


def agreement_run(path: str, prompts: list[list[int]], *, fast: bool, forced=None,
                  dtype: str = "bfloat16", device: str = "cuda", max_num_seqs: int = 64,
                  max_model_len: int = 512, max_new: int = MAX_NEW,
                  **engine_kwargs) -> ForcedSampler:
    """One greedy ``max_new``-step run of the bf16 agreement checks (tests/gpu/test_engine_gpu.py,
    agreement_probe.py): fast = Triton + CUDA graphs, else torch_ref attention + torch ops
    (eager). Synchronous steps so the wrapper sees every row. ``engine_kwargs``: more LLM
    arguments (quantization, kv_cache_dtype: bench/real_model_agreement.py --quant). Returns
    the wrapper."""
    import gc
    import os

    import torch

    from hpcinfer import LLM, SamplingParams
    from hpcinfer.layers import ops
    if not fast:
        os.environ["HPCINFER_TORCH_OPS"] = "1"
    ops._triton_ops.cache_clear()
    try:
        kwargs = dict(engine_kwargs) if fast else {"enforce_eager": True,
                                                   "attention_backend": "torch_ref",
                                                   **engine_kwargs}
        llm = LLM(path, device=device, dtype=dtype, max_model_len=max_model_len,
                  max_num_seqs=max_num_seqs, async_scheduling=False, **kwargs)
        engine = llm.llm_engine
        wrapper = ForcedSampler(engine.sampler, forced)
        engine.sampler = wrapper
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True),
                     use_tqdm=False)
        if fast and device == "cuda" and not kwargs.get("enforce_eager"):
            assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0
        wrapper.linear_forms = linear_forms(engine.runner.model)
    finally:
        os.environ.pop("HPCINFER_TORCH_OPS", None)
        ops._triton_ops.cache_clear()
    del llm, engine
    gc.collect()   # the next engine sizes its KV pool from free memory
    if device == "cuda":
        torch.cuda.empty_cache()
    return wrapper
