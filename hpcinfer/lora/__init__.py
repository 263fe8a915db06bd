"""LoRA adapters (PEFT format) over one base model, many adapters in one batch.

``request`` (LoRARequest, vLLM's), ``adapter_config`` (torch-free: reads and checks an
adapter directory, also used on the login side), ``adapter`` (the tensors, checked against
the model and sliced for this rank), ``layers`` (the per-layer slot weights and the hook that
adds the delta), ``manager`` (the slot pool), ``scheduling`` (at most max_loras adapters
running at once). docs/lora.md.
"""
