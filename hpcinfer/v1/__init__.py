"""vLLM's ``vllm.v1`` module paths that scripts import (``hpcinfer.v1.metrics.reader``,
``hpcinfer.v1.engine.async_llm``); the engine itself is hpcinfer.engine."""
