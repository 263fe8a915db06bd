"""EngineArgs and AsyncEngineArgs at vLLM's import path (``vllm.engine.arg_utils``).

A thin dataclass over the same knobs ``LLM(**kwargs)`` takes, so vLLM's scripts run unchanged:
``EngineArgs.add_cli_args(parser)`` adds vLLM's flag names and defaults, ``from_cli_args``
reads them back, and ``LLM(**vars(args))``, ``LLM(**dataclasses.asdict(engine_args))`` and
``LLMEngine.from_engine_args(engine_args)`` all land in ``EngineConfig.from_kwargs``.

The fields are not a second list: they are ``EngineConfig``'s fields, the arguments ``LLM``
reads itself, and the ignored/refused vLLM arguments of ``hpcinfer.engine.vllm_args``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.vllm_args import IGNORED, LLM_ARGS, REFUSED

# Where vLLM's default differs from EngineConfig's, EngineArgs carries vLLM's; None means
# "the engine's default" (EngineConfig.from_kwargs drops it).
_VLLM_DEFAULTS: dict[str, Any] = {
    "model": "facebook/opt-125m",
    "max_num_seqs": None,
    "max_num_batched_tokens": None,
    "block_size": None,
    "enable_prefix_caching": None,
    "async_scheduling": None,
}
# vLLM's short aliases.
_ALIASES = {"tensor_parallel_size": ["-tp"], "pipeline_parallel_size": ["-pp"],
            "quantization": ["-q"], "data_parallel_size": ["-dp"]}
_ENGINE_TYPES = {"model": str, "dtype": str, "max_model_len": int, "max_num_seqs": int,
                 "max_num_batched_tokens": int, "block_size": int, "enable_prefix_caching": bool,
                 "gpu_memory_utilization": float, "kv_cache_memory_bytes": int,
                 "enforce_eager": bool, "async_scheduling": bool, "seed": int,
                 "tensor_parallel_size": int, "pipeline_parallel_size": int,
                 "pipeline_micro_batches": int, "enable_expert_parallel": bool,
                 "num_gpu_blocks_override": int, "device": str,
                 "attention_backend": str, "tokenizer": str, "trust_remote_code": bool,
                 "skip_tokenizer_init": bool,
                 "max_logprobs": int, "quantization": str,
                 "kv_cache_dtype": str, "load_format": str, "enable_lora": bool,
                 "max_loras": int, "max_lora_rank": int, "max_cpu_loras": int}


def _field_specs() -> list[tuple[str, Any, type | str, str]]:
    """(name, default, argparse type, help) for every EngineArgs field, in flag order."""
    specs = []
    for f in dataclasses.fields(EngineConfig):
        default = _VLLM_DEFAULTS.get(f.name, f.default)
        kind = _ENGINE_TYPES.get(f.name)
        if kind is None:  # a new EngineConfig field must say its CLI type here
            raise TypeError(f"EngineConfig.{f.name} has no entry in arg_utils._ENGINE_TYPES")
        specs.append((f.name, default, kind, "see docs/python-api.md"))
    for name, (default, kind) in LLM_ARGS.items():
        specs.append((name, default, kind, "read by LLM (docs/python-api.md)"))
    for name, arg in IGNORED.items():
        specs.append((name, arg.default, arg.kind, f"accepted and ignored: {arg.note}"))
    for name, arg in REFUSED.items():
        specs.append((name, arg.default, arg.kind, f"refused unless {arg.default!r}: {arg.note}"))
    return specs


def _json_or_str(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def add_cli_args(parser, specs=None):
    """Add one ``--kebab-case`` flag per EngineArgs field to ``parser`` (or an argument group)
    and return it. Booleans get ``--flag`` / ``--no-flag``; dict-valued ones take JSON."""
    for name, default, kind, help_text in specs or _field_specs():
        flags = [f"--{name.replace('_', '-')}", *_ALIASES.get(name, [])]
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, default=default, help=help_text,
                                type=_json_or_str if kind == "json" else kind)
    return parser


def _engine_args_namespace() -> dict:
    def add_cli_args_method(cls, parser):
        return add_cli_args(parser)

    def from_cli_args(cls, args: argparse.Namespace):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                      if hasattr(args, f.name)})

    def create_engine_config(self) -> EngineConfig:
        """EngineConfig for LLMEngine: the ignored/refused vLLM arguments are applied, the
        arguments only LLM reads must be at their defaults."""
        from hpcinfer.engine.hf_overrides import with_hf_overrides
        from hpcinfer.hub.offline import model_dir
        kwargs = dataclasses.asdict(self)
        kwargs["model"] = with_hf_overrides(model_dir(kwargs["model"], kwargs.pop("revision")),
                                            kwargs.pop("hf_overrides"))
        if isinstance(kwargs.get("tokenizer"), str):
            kwargs["tokenizer"] = model_dir(kwargs["tokenizer"], kwargs.pop("tokenizer_revision"))
        for name, (default, _) in LLM_ARGS.items():
            if name not in kwargs:
                continue
            value = kwargs.pop(name)
            allowed = (default, "generate") if name in ("task", "runner") else (default,)
            if value not in allowed:
                raise ValueError(f"EngineArgs.{name}={value!r} is read by LLM, not LLMEngine: "
                                 f"use LLM(**dataclasses.asdict(engine_args)) for it")
        return EngineConfig.from_kwargs(kwargs.pop("model"), **kwargs)

    return {"add_cli_args": classmethod(add_cli_args_method),
            "from_cli_args": classmethod(from_cli_args),
            "create_engine_config": create_engine_config,
            "__doc__": "vLLM's EngineArgs: every argument LLM accepts, as a dataclass and as "
                       "command-line flags (add_cli_args / from_cli_args)."}


EngineArgs = dataclasses.make_dataclass(
    "EngineArgs", [(name, Any, dataclasses.field(default=default))
                   for name, default, _, _ in _field_specs()],
    namespace=_engine_args_namespace())
EngineArgs.__module__ = __name__


@dataclasses.dataclass
class AsyncEngineArgs(EngineArgs):
    """vLLM's AsyncEngineArgs: the same arguments, for AsyncLLM.from_engine_args."""
