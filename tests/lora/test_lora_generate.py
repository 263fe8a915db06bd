"""LoRA adapters in the engine: greedy tokens equal transformers + peft (fp32, CPU), one row
per adapter (or the base) in one generate call, with more adapters than slots."""
from __future__ import annotations

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.lora.request import LoRARequest
from hpcinfer.testing.tiny_lora import ATTENTION, MLP

from .conftest import assert_shrink

MAX_NEW = 10


def greedy(max_new=MAX_NEW):
    return SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def make_llm(path, **kwargs):
    return LLM(path, device="cpu", enable_lora=True, max_model_len=128, **kwargs)


def test_one_adapter_equals_peft_and_base_rows_stay_base(base, adapter, oracle, prompts,
                                                         shrink):
    # alpha != rank: a wrong or missing scaling changes the tokens
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    llm = make_llm(base("llama"), max_loras=1, max_lora_rank=8)
    assert_shrink(llm, shrink)
    lora = LoRARequest("all-r8", 1, path)
    got = tokens(llm.generate(token_prompts(prompts), greedy(), use_tqdm=False,
                              lora_request=lora))
    assert got == oracle("llama", path, prompts, MAX_NEW)
    assert got != oracle("llama", None, prompts, MAX_NEW)   # the adapter changes the output
    base_rows = tokens(llm.generate(token_prompts(prompts), greedy(), use_tqdm=False))
    assert base_rows == oracle("llama", None, prompts, MAX_NEW)


def test_chat_takes_a_lora_request(base, adapter):
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    llm = make_llm(base("llama"))
    conversation = [{"role": "user", "content": "Hello, world!"}]
    lora = LoRARequest("all-r8", 1, path)
    with_lora = llm.chat(conversation, greedy(), use_tqdm=False, lora_request=lora)
    prompt_ids = with_lora[0].prompt_token_ids
    plain = llm.generate(token_prompts([prompt_ids]), greedy(), use_tqdm=False,
                         lora_request=[lora])
    assert tokens(with_lora) == tokens(plain)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_mixed_batch_more_adapters_than_slots(family, base, adapter, oracle, prompts, shrink):
    """Three adapters (ranks 4/8/16, rsLoRA, attention-only, MLP-only pieces of the fused
    gate_up) and base rows in one generate with max_loras=2: every row equals its own
    transformers + peft run, and no step holds more than two adapters."""
    specs = {
        "qv-r4": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=11),
        "all-r8-rs": dict(rank=8, alpha=4.0, use_rslora=True, targets=ATTENTION + MLP, seed=12),
        "mlp-r16": dict(rank=16, alpha=16.0, targets=("gate_proj", "down_proj"), seed=13),
    }
    paths = {name: adapter(family, name, **kw) for name, kw in specs.items()}
    requests = {name: LoRARequest(name, i + 1, paths[name]) for i, name in enumerate(specs)}
    llm = make_llm(base(family), max_loras=2, max_lora_rank=16, max_num_seqs=8)
    assert_shrink(llm, shrink)
    manager = llm.llm_engine.lora
    seen = []
    prepare = manager.prepare_step

    def record(seqs, num_new_tokens):
        seen.append({s.lora_id for s in seqs if s.lora_id})
        return prepare(seqs, num_new_tokens)
    manager.prepare_step = record

    rows = [(p, name) for p in prompts for name in (*specs, None)]   # same prompts per adapter
    outs = llm.generate(token_prompts([p for p, _ in rows]), greedy(), use_tqdm=False,
                        lora_request=[requests[n] if n else None for _, n in rows])
    for (prompt, name), got in zip(rows, tokens(outs)):
        want = oracle(family, paths[name] if name else None, [prompt], MAX_NEW)[0]
        assert got == want, f"adapter {name}, prompt of {len(prompt)} tokens"
    assert max(len(s) for s in seen) == 2 and manager.num_slot_loads >= 3
    assert len({frozenset(s) for s in seen if s}) >= 2   # the pool swapped between steps


def test_prefix_cache_never_shares_kv_between_adapters(base, adapter, oracle, prompts):
    paths = [adapter("llama", "all-r8", rank=8, alpha=24.0),
             adapter("llama", "qv-r4", rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                     seed=11)]
    long_prompt = prompts[2]      # two full blocks the cache can reuse
    llm = make_llm(base("llama"), max_loras=1)
    bm = llm.llm_engine.block_manager
    runs = [None, LoRARequest("a", 1, paths[0]), LoRARequest("b", 2, paths[1]), None,
            LoRARequest("a", 1, paths[0])]
    hits = []
    for lora in runs:
        before = bm.prefix_cache_hits
        got = tokens(llm.generate(token_prompts([long_prompt]), greedy(), use_tqdm=False,
                                  lora_request=lora))
        hits.append(bm.prefix_cache_hits - before)
        want = oracle("llama", lora.lora_path if lora else None, [long_prompt], MAX_NEW)
        assert got == want, lora
    # first runs of each adapter find nothing; the repeats (base, "a") reuse their own blocks
    assert hits[:3] == [0, 0, 0] and hits[3] > 0 and hits[4] > 0


def test_triton_kernels_in_the_engine_give_the_same_tokens(base, adapter, oracle, prompts,
                                                           monkeypatch, shrink):
    """The GPU path of the layers (Triton shrink and expand over the pieces of the merged
    qkv/gate_up output, or the expand of the stacked GEMM's output), run by the interpreter
    on CPU: same tokens as peft."""
    from hpcinfer.kernels import lora as lora_kernels
    from hpcinfer.lora import layers
    monkeypatch.setattr(layers, "_kernels", lambda x: lora_kernels)
    paths = {"all-r8-rs": adapter("qwen2", "all-r8-rs", rank=8, alpha=4.0, use_rslora=True,
                                  targets=ATTENTION + MLP, seed=12),
             "qv-r4": adapter("qwen2", "qv-r4", rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                              seed=11)}
    requests = [LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(paths.items())]
    short = [p[:9] for p in prompts[1:]]
    rows = [(p, r) for p in short for r in (*requests, None)]
    llm = make_llm(base("qwen2"), max_loras=2)
    assert_shrink(llm, shrink)
    got = tokens(llm.generate(token_prompts([p for p, _ in rows]), greedy(4), use_tqdm=False,
                              lora_request=[r for _, r in rows]))
    for (prompt, r), row in zip(rows, got):
        assert row == oracle("qwen2", r.lora_path if r else None, [prompt], 4)[0]


def test_async_llm_streams_with_an_adapter(base, adapter, oracle, prompts):
    import asyncio

    from hpcinfer import AsyncEngineArgs, AsyncLLM
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=base("llama"), max_model_len=128, device="cpu", enable_lora=True))

    async def collect(prompt, lora, request_id):
        outs = [o async for o in engine.generate({"prompt_token_ids": prompt}, greedy(),
                                                 request_id, lora_request=lora)]
        return outs[-1].outputs[0].token_ids

    async def main():
        return await asyncio.gather(collect(prompts[2], LoRARequest("a", 1, path), "a"),
                                    collect(prompts[2], None, "base"))
    try:
        with_lora, plain = asyncio.run(main())
    finally:
        engine.shutdown()
    assert with_lora == oracle("llama", path, [prompts[2]], MAX_NEW)[0]
    assert plain == oracle("llama", None, [prompts[2]], MAX_NEW)[0]
