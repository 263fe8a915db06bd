"""hpcinfer: offline batch LLM inference on Slurm/HPC clusters.

The vLLM-compatible engine API (``LLM``, ``SamplingParams``, ...) is imported lazily, so
``import hpcinfer`` on a login node does not pull in torch or transformers.
"""
from __future__ import annotations

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "LLM": "hpcinfer.engine.llm",
    "LLMEngine": "hpcinfer.engine.llm_engine",
    "EngineArgs": "hpcinfer.engine.arg_utils",
    "AsyncEngineArgs": "hpcinfer.engine.arg_utils",
    "AsyncLLMEngine": "hpcinfer.engine.async_llm",
    "AsyncLLM": "hpcinfer.engine.async_llm",
    "SamplingParams": "hpcinfer.engine.params",
    "RequestOutputKind": "hpcinfer.engine.params",
    "TextPrompt": "hpcinfer.inputs",
    "TokensPrompt": "hpcinfer.inputs",
    "PromptType": "hpcinfer.inputs",
    "RequestOutput": "hpcinfer.engine.outputs",
    "CompletionOutput": "hpcinfer.engine.outputs",
    "PoolingParams": "hpcinfer.engine.pooling",
    "PoolingRequestOutput": "hpcinfer.engine.outputs",
    "EmbeddingRequestOutput": "hpcinfer.engine.outputs",
    "ClassificationRequestOutput": "hpcinfer.engine.outputs",
    "ScoringRequestOutput": "hpcinfer.engine.outputs",
    "submit": "hpcinfer.slurm.api",
    "Job": "hpcinfer.slurm.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hpcinfer' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
