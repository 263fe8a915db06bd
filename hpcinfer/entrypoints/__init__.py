"""vLLM's ``vllm.entrypoints`` paths that batch users call (``openai.run_batch``)."""
