"""vLLM's ``vllm.attention`` module path (``backends.registry.AttentionBackendEnum``), for
scripts that name a vLLM attention backend; hpcinfer's attention is hpcinfer.layers.attention."""
