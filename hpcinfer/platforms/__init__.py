"""vLLM's ``vllm.platforms.current_platform``, for scripts that ask which device they run on
(vLLM's examples check ``current_platform.is_rocm()`` before choosing an attention backend).
hpcinfer runs on CUDA GPUs and CPUs; nothing here imports torch until a method is called."""
from __future__ import annotations


class Platform:
    """The machine this process runs on, answered the way vLLM's platform object does."""

    @staticmethod
    def is_cuda() -> bool:
        import torch
        return torch.cuda.is_available() and torch.version.hip is None

    @staticmethod
    def is_rocm() -> bool:
        import torch
        return torch.version.hip is not None

    @staticmethod
    def is_cpu() -> bool:
        import torch
        return not torch.cuda.is_available()

    @staticmethod
    def is_tpu() -> bool:
        return False

    @staticmethod
    def is_xpu() -> bool:
        return False

    @property
    def device_type(self) -> str:
        return "cuda" if self.is_cuda() else "cpu"


current_platform = Platform()
