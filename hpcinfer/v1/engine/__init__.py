"""``vllm.v1.engine`` at hpcinfer's path (``async_llm.AsyncLLM``)."""
