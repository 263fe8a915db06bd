"""vLLM's ``vllm.v1.attention`` module path; see hpcinfer.attention."""
