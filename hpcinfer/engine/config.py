"""EngineConfig: the user's engine knobs, frozen and validated once.

Derived values (the resolved max_model_len, the number of KV blocks, EOS ids) live in the
runtime objects that compute them (ModelRunner, LLMEngine), never back in here.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    async_scheduling: bool = True         # launch step N+1 before reading N's tokens (inflight.py)
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1       # see docs/multi-node.md
    pipeline_micro_batches: int | None = None  # per step with PP; None: automatic (multi-node.md)
    enable_expert_parallel: bool = False  # MoE: whole experts per TP rank (docs/models.md)
    num_gpu_blocks_override: int | None = None  # KV pool size in blocks (tests, tuning)
    device: str = "auto"
    attention_backend: str = "auto"
    tokenizer: str | None = None          # a tokenizer directory other than the model's
    skip_tokenizer_init: bool = False     # no tokenizer: token ids in and out (python-api.md)
    trust_remote_code: bool = False       # accepted for vLLM scripts; no remote code is run
    max_logprobs: int = 20                # most logprobs a request may ask for (vLLM's default)
    quantization: str | None = None       # None: the checkpoint's; "fp8" also quantizes online
    kv_cache_dtype: str = "auto"          # "fp8"/"fp8_e4m3": e4m3 cache, scale 1.0 (quantization.md)
    load_format: str = "auto"             # "dummy": random weights from config.json alone
    enable_lora: bool = False             # LoRA adapters per request (docs/lora.md)
    max_loras: int = 1                    # adapters in the slot pool (distinct ones per step)
    max_lora_rank: int = 16               # largest adapter rank accepted
    max_cpu_loras: int | None = None      # adapters kept read on the CPU; None: max_loras

    def __post_init__(self) -> None:
        _positive_int(self, "max_num_seqs")
        _positive_int(self, "max_num_batched_tokens")
        _positive_int(self, "block_size")
        if self.max_model_len is not None:
            _positive_int(self, "max_model_len")
        if self.kv_cache_memory_bytes is not None:
            _positive_int(self, "kv_cache_memory_bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization!r} must be "
                             "in (0, 1]")
        _positive_int(self, "tensor_parallel_size")
        _positive_int(self, "pipeline_parallel_size")
        if self.pipeline_micro_batches is not None:
            _positive_int(self, "pipeline_micro_batches")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs={self.max_logprobs!r} must be an integer >= 0 "
                             "(-1: up to the vocabulary size)")
        if self.num_gpu_blocks_override is not None:
            _positive_int(self, "num_gpu_blocks_override")
        _check_quantization(self.quantization)
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: use "
                             "auto (the model's dtype), fp8 or fp8_e4m3")
        _check_lora(self)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r} is not supported: use auto or "
                             "safetensors (the checkpoint's safetensors; bitsandbytes, vLLM's "
                             "older name for a bitsandbytes checkpoint, is the same) or dummy "
                             "(random weights from config.json alone, for benchmarks)")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype!r} is not supported: use one of "
                             f"{sorted(DTYPE_NAMES)}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        """Build from ``LLM(**kwargs)``; unknown keys raise TypeError with a did-you-mean.

        vLLM arguments that change nothing here (swap space, stats logging, ...) are accepted
        with a logged note, and those naming a feature hpcinfer lacks raise ValueError: the one
        table of both is hpcinfer.engine.vllm_args."""
        from hpcinfer.engine.vllm_args import drop_vllm_only
        kwargs = drop_vllm_only(dict(kwargs))
        known = {f.name for f in fields(cls)}
        # None means "the engine's default", as in vLLM's EngineArgs (the CLI passes None for
        # every flag not given).
        kwargs = {k: v for k, v in kwargs.items()
                  if not (v is None and k in known and _default_of(cls, k) is not None)}
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"LLM() got an unexpected keyword argument {key!r}{hint}; "
                                f"valid arguments: {', '.join(sorted(known))}")
        return cls(model=str(model), **kwargs)


def _default_of(cls, name: str):
    return next(f.default for f in fields(cls) if f.name == name)

# "bitsandbytes": vLLM's older name for reading a bitsandbytes checkpoint; the same as auto
LOAD_FORMATS = ("auto", "safetensors", "dummy", "bitsandbytes")
DTYPE_NAMES = {"auto", "float32", "float", "float16", "half", "bfloat16", "fp32", "fp16", "bf16"}


def _check_quantization(value) -> None:
    from hpcinfer.layers.quant.config import SUPPORTED_QUANT_METHODS, SUPPORTED_TEXT
    if value not in (None, "auto", *SUPPORTED_QUANT_METHODS):
        raise ValueError(f"quantization={value!r} is not supported; hpcinfer supports "
                         f"{SUPPORTED_TEXT}")


def _check_lora(config: EngineConfig) -> None:
    if config.enable_lora and config.pipeline_parallel_size > 1:
        raise ValueError("enable_lora=True with pipeline_parallel_size > 1 is not supported "
                         "yet: use tensor_parallel_size only (docs/lora.md)")
    _positive_int(config, "max_loras")
    _positive_int(config, "max_lora_rank")
    if config.max_cpu_loras is not None:
        _positive_int(config, "max_cpu_loras")
        if config.max_cpu_loras < config.max_loras:
            raise ValueError(f"max_cpu_loras={config.max_cpu_loras} must be >= max_loras="
                             f"{config.max_loras}: raise it or leave it None")


def _positive_int(config: EngineConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
