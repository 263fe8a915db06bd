"""``vllm.engine.async_llm_engine`` at hpcinfer's path: AsyncLLMEngine is AsyncLLM, as in
vLLM v1 (hpcinfer.engine.async_llm)."""
from hpcinfer.engine.async_llm import AsyncLLM, AsyncLLMEngine

__all__ = ["AsyncLLM", "AsyncLLMEngine"]
