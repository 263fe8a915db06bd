"""vLLM's ``vllm.assets``: the public test images its example scripts load by name."""
