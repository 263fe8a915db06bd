"""``vllm.v1.engine.async_llm`` at hpcinfer's path: AsyncLLM (hpcinfer.engine.async_llm)."""
from hpcinfer.engine.async_llm import AsyncLLM, EngineDeadError

__all__ = ["AsyncLLM", "EngineDeadError"]
