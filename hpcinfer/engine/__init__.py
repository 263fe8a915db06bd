"""Our continuous-batching paged-attention engine (nano-vLLM mould, device-agnostic torch).

One concept per module: ``params`` (SamplingParams), ``config`` (EngineConfig), ``sequence``,
``block_manager`` (paged KV bookkeeping, prefix cache), ``scheduler`` (one token budget,
chunked prefill, preemption), ``model_runner`` (flattened batch -> model), ``sampler``,
``penalties`` (the sampler's device counts per sequence), ``detokenizer``,
``prompt_logprobs``, ``llm_engine`` (the step loop), ``beam_search`` (on top of the step
loop) and ``llm`` (the vLLM-compatible facade).
Imported lazily: ``from hpcinfer import LLM, SamplingParams``.
"""
