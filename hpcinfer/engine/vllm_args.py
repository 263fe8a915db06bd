"""The one table of vLLM engine arguments that hpcinfer does not implement as an engine knob.

Every vLLM argument a script may pass to ``LLM(...)``, ``EngineArgs(...)`` or the command
line (``EngineArgs.add_cli_args``) is one of three kinds:

- **supported**: a field of ``EngineConfig`` or one ``LLM`` reads itself (``LLM_ARGS``);
- **ignored**: changes nothing here (``IGNORED``), so it is accepted with one log line when
  set to anything but vLLM's default;
- **refused**: names a feature hpcinfer lacks (``REFUSED``): its vLLM default is accepted
  (``LLM(**vars(args))`` passes every flag), any other value raises ValueError naming it.

``EngineConfig.from_kwargs`` applies this table to ``LLM(**kwargs)``; ``EngineArgs`` builds its
fields and flags from it; docs/vllm-compat.md lists it and a test checks the two agree.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmArg:
    default: Any        # vLLM's default (what the CLI passes when the flag is not given)
    kind: type | str    # argparse type: bool, int, float, str or "json"
    note: str           # why it is ignored / which feature it names


def _ignored(default, kind, note) -> VllmArg:
    return VllmArg(default, kind, note)


IGNORED: dict[str, VllmArg] = {
    "swap_space": _ignored(4, float, "no CPU swap space: a preempted sequence is recomputed"),
    "cpu_offload_gb": _ignored(0, float, "weights stay on the device"),
    "disable_log_stats": _ignored(False, bool, "stats are always kept (LLM.get_metrics)"),
    "disable_log_requests": _ignored(True, bool, "requests are not logged"),
    "enable_log_requests": _ignored(False, bool, "requests are not logged"),
    "disable_custom_all_reduce": _ignored(False, bool, "all-reduce is torch.distributed's"),
    "max_seq_len_to_capture": _ignored(8192, int, "CUDA graphs cover decode batch sizes"),
    "tokenizer_mode": _ignored("auto", str, "the tokenizer is transformers' AutoTokenizer"),
    "download_dir": _ignored(None, str, "models are local snapshots (hpcinfer download)"),
    "distributed_executor_backend": _ignored(None, str,
                                             "ranks are spawned or MPI-launched (docs/multi-node.md)"),
    "code_revision": _ignored(None, str, "no remote code is run"),
    "served_model_name": _ignored(None, str, "no server"),
    "hf_token": _ignored(None, str, "no hub access at run time"),
    "model_impl": _ignored("auto", str, "every model is hpcinfer's own implementation"),
    "enable_chunked_prefill": _ignored(None, bool, "prefill is always chunked under "
                                                   "max_num_batched_tokens; outputs are the same"),
    "max_num_partial_prefills": _ignored(1, int, "one token budget per step covers prefills"),
    "preemption_mode": _ignored(None, str, "preemption always recomputes"),
    "scheduling_policy": _ignored("fcfs", str, "requests are served first come, first served"),
    "disable_cascade_attn": _ignored(False, bool, "no cascade attention"),
    "calculate_kv_scales": _ignored(False, bool, "an fp8 KV cache uses scale "
                                                     "1.0"),
    "compilation_config": _ignored(None, "json", "CUDA graphs follow enforce_eager"),
    "attention_config": _ignored(None, "json", "one attention implementation per device "
                                               "(hpcinfer.config.AttentionConfig is accepted)"),
    "guided_decoding_backend": _ignored("auto", str, "structured outputs always use xgrammar "
                                                     "(docs/structured-outputs.md)"),
    "max_parallel_loading_workers": _ignored(None, int, "each rank reads its own slices"),
    "use_tqdm_on_load": _ignored(True, bool, "loading is logged, not drawn"),
    "disable_mm_preprocessor_cache": _ignored(False, bool, "no preprocessor cache: each "
                                                           "request's images are preprocessed "
                                                           "once"),
    "mm_processor_cache_gb": _ignored(4, float, "no preprocessor cache: each request's "
                                                "images are preprocessed once"),
    "interleave_mm_strings": _ignored(False, bool, "image parts are placed by the "
                                                   "processor's chat template"),
    "config_format": _ignored("auto", str, "config.json is read with transformers"),
    "use_v2_block_manager": _ignored(True, bool, "one block manager"),
    "num_lookahead_slots": _ignored(0, int, "no speculative decoding"),
    "ray_workers_use_nsight": _ignored(False, bool, "no Ray"),
    "tokenizer_pool_size": _ignored(0, int, "tokenization runs in the engine's process"),
    "tokenizer_pool_type": _ignored("ray", str, "no tokenizer pool"),
    "tokenizer_pool_extra_config": _ignored(None, "json", "no tokenizer pool"),
    "logits_processor_pattern": _ignored(None, str, "no custom logits processors"),
    "disable_async_output_proc": _ignored(False, bool, "see async_scheduling"),
    "num_scheduler_steps": _ignored(1, int, "one scheduling step per forward"),
    "multi_step_stream_outputs": _ignored(True, bool, "one scheduling step per forward"),
    "scheduler_delay_factor": _ignored(0.0, float, "requests are admitted at once"),
    "long_prefill_token_threshold": _ignored(0, int, "one token budget per step"),
    "max_long_partial_prefills": _ignored(1, int, "one token budget per step"),
    "cuda_graph_sizes": _ignored(None, "json", "graphs are captured for the decode batch "
                                              "sizes up to max_num_seqs"),
    "max_cudagraph_capture_size": _ignored(None, int, "graphs cover batch sizes up to "
                                                      "max_num_seqs"),
    "disable_hybrid_kv_cache_manager": _ignored(False, bool, "one KV cache manager"),
    "prefix_caching_hash_algo": _ignored("builtin", str, "prefix blocks use chained hashes "
                                                         "checked against their tokens"),
    "kv_sharing_fast_prefill": _ignored(False, bool, "no cross-layer KV sharing"),
    "kv_events_config": _ignored(None, "json", "no KV events are published"),
    "otlp_traces_endpoint": _ignored(None, str, "no tracing"),
    "collect_detailed_traces": _ignored(None, "json", "no tracing"),
    "show_hidden_metrics_for_version": _ignored(None, str, "no metrics server"),
    "reasoning_parser": _ignored("", str, "no server: the output text is returned as is"),
    "pt_load_map_location": _ignored("cpu", str, "weights load from safetensors"),
    "ignore_patterns": _ignored(None, "json", "weights are read from the snapshot's index"),
    "model_loader_extra_config": _ignored(None, "json", "one loader"),
    "worker_cls": _ignored("auto", str, "one worker implementation"),
    "worker_extension_cls": _ignored("", str, "one worker implementation"),
    "additional_config": _ignored(None, "json", "no platform plugins"),
    "data_parallel_rank": _ignored(None, int, "only with data_parallel_size > 1"),
    "data_parallel_size_local": _ignored(None, int, "only with data_parallel_size > 1"),
    "data_parallel_address": _ignored(None, str, "only with data_parallel_size > 1"),
    "data_parallel_rpc_port": _ignored(None, int, "only with data_parallel_size > 1"),
    "data_parallel_backend": _ignored("mp", str, "only with data_parallel_size > 1"),
    "fully_sharded_loras": _ignored(False, bool, "LoRA shards B (column layers) or A (row "
                                                 "layers) like the base layer (docs/lora.md)"),
    "lora_dtype": _ignored("auto", str, "adapters run in the model's dtype"),
    "lora_extra_vocab_size": _ignored(256, int, "adapters with extra vocabulary are refused"),
    "enable_dbo": _ignored(False, bool, "no dual-batch overlap"),
    "mm_encoder_tp_mode": _ignored("weights", str, "images with tensor parallelism are "
                                                   "refused (docs/vision.md)"),
    "structured_outputs_config": _ignored(None, "json", "structured outputs use xgrammar; "
                                                        "whitespace is set per request "
                                                        "(StructuredOutputsParams)"),
}


def _refused(default, kind, feature) -> VllmArg:
    return VllmArg(default, kind, feature)


REFUSED: dict[str, VllmArg] = {
    "speculative_config": _refused(None, "json", "speculative decoding"),
    "data_parallel_size": _refused(1, int, "data parallelism inside one LLM: run one Slurm "
                                           "array task per replica instead (docs/slurm.md)"),
    "enable_sleep_mode": _refused(False, bool, "sleep mode"),
    "enable_prompt_embeds": _refused(False, bool, "prompt embeddings as input"),
    "kv_transfer_config": _refused(None, "json", "KV transfer (disaggregated prefill)"),
    "logits_processors": _refused(None, "json", "custom logits processor classes"),
    "disable_sliding_window": _refused(False, bool, "disabling the sliding window"),
    "rope_scaling": _refused(None, "json", "rope_scaling argument: pass "
                                           "hf_overrides={'rope_scaling': {...}}"),
    "rope_theta": _refused(None, float, "rope_theta argument: pass "
                                        "hf_overrides={'rope_theta': ...}"),
    "enable_eplb": _refused(False, bool, "expert-parallel load balancing (MoE)"),
    "qlora_adapter_name_or_path": _refused(None, str, "QLoRA adapters"),
    "enable_prompt_adapter": _refused(False, bool, "prompt adapters"),
    "speculative_model": _refused(None, str, "speculative decoding"),
    "num_speculative_tokens": _refused(None, int, "speculative decoding"),
    "logprobs_mode": _refused("raw_logprobs", str, "logprobs modes other than raw_logprobs "
                                                   "(logprobs come from the raw logits)"),
}

# Arguments LLM reads itself (not EngineConfig fields): name -> (vLLM default, argparse type).
LLM_ARGS: dict[str, tuple[Any, type | str]] = {
    "task": ("auto", str),
    "runner": ("auto", str),
    "convert": ("auto", str),
    "pooler_config": (None, "json"),
    "override_pooler_config": (None, "json"),
    "generation_config": ("auto", str),
    "hf_overrides": (None, "json"),
    "revision": (None, str),            # a hub id's revision (hub/offline.py model_dir)
    "tokenizer_revision": (None, str),
    "override_generation_config": (None, "json"),
    "limit_mm_per_prompt": (None, "json"),     # images: hpcinfer/multimodal/media.py
    "mm_processor_kwargs": (None, "json"),     # the image processor's defaults (processor.py)
    "allowed_local_media_path": ("", str),
}


def is_default(value, default) -> bool:
    """Whether ``value`` is vLLM's default or an equivalent "off" (None, False, 0, empty)."""
    if value == default:
        return True
    return default in (None, False, 0) and value in (None, False, 0, "", [], {}, ())


def drop_vllm_only(kwargs: dict, caller: str = "LLM") -> dict:
    """Remove the ignored vLLM arguments from ``kwargs`` (one log line each when set to a
    non-default value); raise ValueError for a refused one set to anything but its default."""
    for key in sorted(set(kwargs) & REFUSED.keys()):
        arg = REFUSED[key]
        value = kwargs.pop(key)
        if not is_default(value, arg.default):
            raise ValueError(f"{caller}({key}={value!r}): hpcinfer has no {arg.note}; remove "
                             f"{key} (or set it to {arg.default!r})")
    for key in sorted(set(kwargs) & IGNORED.keys()):
        arg = IGNORED[key]
        value = kwargs.pop(key)
        if not is_default(value, arg.default):
            log.info("%s(%s=%r) is a vLLM option with no effect in hpcinfer (%s); ignored",
                     caller, key, value, arg.note)
    return kwargs
