"""LoRARequest: which adapter a request runs with, as vLLM's ``vllm.lora.request``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class LoRARequest:
    """An adapter: ``lora_name`` (a label), ``lora_int_id`` (>= 1, unique per adapter: it keys
    the slot pool and the prefix cache) and ``lora_path`` (a PEFT adapter directory with
    adapter_config.json and adapter_model.safetensors). Equal when the names are, as in vLLM."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_int_id must be an integer "
                             f">= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is empty; give the "
                             "adapter directory (adapter_config.json + "
                             "adapter_model.safetensors)")
        self.lora_path = str(self.lora_path)

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
