"""LLM: the vLLM-compatible offline facade (``generate`` and ``chat``) over LLMEngine.

Existing vLLM scripts run after swapping ``from vllm import LLM, SamplingParams`` for
``from hpcinfer import LLM, SamplingParams``. Results come back in prompt order.
"""
from __future__ import annotations

import gc
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from hpcinfer.engine import pooling
from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.llm_engine import LLMEngine
from hpcinfer.engine.outputs import RequestOutput
from hpcinfer.engine.params import RequestOutputKind, SamplingParams
from hpcinfer.lora.manager import check_prompt_lora, lora_requests_per_prompt

log = logging.getLogger(__name__)


class LLM:
    """Load a model once, then generate for batches of prompts.

    Arguments as vLLM's: ``model`` (a local snapshot directory), ``dtype``, ``max_model_len``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``enable_prefix_caching``,
    ``gpu_memory_utilization``, ``kv_cache_memory_bytes``, ``enforce_eager``, ``seed``,
    ``tensor_parallel_size``, ``pipeline_parallel_size`` (docs/multi-node.md), ``device``
    ("auto", "cpu", "cuda", ...), ``max_logprobs``, ``hf_overrides`` (a dict merged into
    config.json, or a callable on the HF config), ``generation_config`` ("auto": the
    checkpoint's generation_config.json sets the default sampling params; "vllm": vLLM's
    defaults; or a directory holding a generation_config.json). vLLM arguments with no effect
    here are accepted and logged, those naming a missing feature raise ValueError
    (hpcinfer.engine.vllm_args, docs/vllm-compat.md). With a vision-language model
    (docs/vision.md), ``limit_mm_per_prompt`` ({"image": N}: more images in one prompt is a
    ValueError) and ``allowed_local_media_path`` (the one directory file:// and absolute-path
    image parts may be read from; unset: none, as in vLLM). An unknown keyword raises
    TypeError with a did-you-mean.
    """

    def __init__(self, model: str, task: str = "auto", runner: str = "auto",
                 convert: str = "auto", generation_config: str | None = "auto",
                 override_generation_config: dict | None = None, **kwargs: Any):
        # vLLM's pooler_config (older name: override_pooler_config), see pooling.PoolerConfig
        pooler_config = kwargs.pop("pooler_config", None)
        pooler_config = kwargs.pop("override_pooler_config", None) or pooler_config
        # vLLM's image limits, checked before the model loads (hpcinfer/multimodal/media.py)
        from hpcinfer.multimodal.media import llm_media_args
        media_limits = llm_media_args(kwargs.pop("limit_mm_per_prompt", None),
                                      kwargs.pop("allowed_local_media_path", ""))
        mm_processor_kwargs = kwargs.pop("mm_processor_kwargs", None)
        if mm_processor_kwargs is not None and not isinstance(mm_processor_kwargs, dict):
            raise ValueError(f"mm_processor_kwargs={mm_processor_kwargs!r}: pass a dict of the "
                             "image processor's arguments, e.g. {'max_pixels': 1003520}")
        from hpcinfer.engine.hf_overrides import with_hf_overrides
        from hpcinfer.hub.offline import model_dir
        revision = kwargs.pop("revision", None)
        model = with_hf_overrides(model_dir(str(model), revision),
                                  kwargs.pop("hf_overrides", None))
        tokenizer_revision = kwargs.pop("tokenizer_revision", None)
        if isinstance(kwargs.get("tokenizer"), str):   # a hub id too, at its own revision
            kwargs["tokenizer"] = model_dir(kwargs["tokenizer"], tokenizer_revision)
        self.config = EngineConfig.from_kwargs(model, **kwargs)
        self.generation_config = _generation_config_dir(generation_config, self.config.model)
        self.override_generation_config = dict(override_generation_config or {})
        unknown = sorted(set(self.override_generation_config) - set(_GENERATION_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"override_generation_config keys {unknown} are not sampling "
                             f"defaults: use {sorted(_GENERATION_CONFIG_FIELDS)}")
        # task: "generate" or a pooling task (embed/classify/score/reward), see engine.pooling
        self.task = pooling.resolve_task(self.config.model, task, runner, convert)
        if self.task != "generate" and self.config.enable_lora:
            raise ValueError(f"enable_lora=True is for generation: task={self.task!r} takes no "
                             "LoRA adapters yet (docs/lora.md); remove enable_lora")
        if self.task == "generate" and pooler_config is not None:
            raise ValueError("pooler_config is for pooling tasks (embed, classify, score, "
                             "reward): remove it, or pass task='embed' (or another)")
        # create_engine: one process asking for several ranks spawns the others
        from hpcinfer.engine.distributed_runner import create_engine
        self.llm_engine = (create_engine(self.config) if self.task == "generate"
                           else pooling.PoolingEngine(self.config, self.task,
                                                      pooler_config=pooler_config))
        multimodal = getattr(self.llm_engine, "multimodal", None)
        if multimodal is not None:
            multimodal.set_media_limits(*media_limits)
            multimodal.set_processor_defaults(mm_processor_kwargs)
        elif mm_processor_kwargs:
            log.info("mm_processor_kwargs ignored: %s takes no images", self.config.model)
        self._next_request = 0
        self._default_fields: dict | None = None
        self._profiler = None   # engine/profiling.TraceProfiler, made by start_profile()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``sampling_params=None`` means, as in vLLM: with generation_config="auto" (or
        a directory) the sampling fields of its generation_config.json (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens -> max_tokens) over SamplingParams'
        defaults; with "vllm" SamplingParams(); ``override_generation_config`` (same keys as
        generation_config.json) on top. A new object each call: change it freely."""
        if self._default_fields is None:
            fields = (_generation_config_defaults(self.generation_config)
                      if self.generation_config is not None else {})
            for theirs, value in self.override_generation_config.items():
                fields[_GENERATION_CONFIG_FIELDS[theirs]] = value
            self._default_fields = fields
        return SamplingParams(**self._default_fields)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Forget the cached prompt prefixes (vLLM's name); True when done."""
        self._check_generate("reset_prefix_cache()")
        return self.llm_engine.reset_prefix_cache(reset_running_requests)

    def get_metrics(self):
        """vLLM-named counters, gauges and histograms of this LLM's engine (a list of
        hpcinfer.v1.metrics.reader.Metric): tokens, requests, latencies, KV use, prefix cache."""
        from hpcinfer.v1.metrics.reader import engine_metrics
        self._check_generate("get_metrics()")
        return engine_metrics(self.llm_engine)

    def start_profile(self) -> None:
        """Start a torch profiler trace of this process (vLLM's name): the directory comes
        from VLLM_TORCH_PROFILER_DIR or HPCINFER_TORCH_PROFILER_DIR (engine/profiling.py)."""
        if self._profiler is None:
            from hpcinfer.engine.profiling import TraceProfiler
            self._profiler = TraceProfiler(self.llm_engine.device)
        self._profiler.start()

    def stop_profile(self) -> None:
        """Stop the trace that start_profile() began and write it (``*.pt.trace.json``)."""
        if self._profiler is None:
            raise RuntimeError("stop_profile() without a start_profile() before it")
        path = self._profiler.stop()
        log.info("profiler trace written to %s", path)

    def _check_generate(self, what: str) -> None:
        if self.task != "generate":
            raise ValueError(f"{what} is for generation: this LLM was loaded for "
                             f"task={self.task!r}")

    # --- generate ---
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None, **_vllm_only) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, a {"prompt"/"prompt_token_ids"} dict
        (TextPrompt / TokensPrompt), or a list of those. sampling_params: one for all prompts
        or one per prompt. lora_request: a LoRARequest for all prompts, or a list with one
        (or None) per prompt; needs enable_lora=True (docs/lora.md)."""
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, lora_request)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, lora_request=None, chat_template: str | None = None,
             chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             mm_processor_kwargs: dict | None = None, **_vllm_only) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them;
        each is rendered with the tokenizer's chat template (or ``chat_template``), ``tools``
        (OpenAI-style function specs) passed to the template as transformers does. With a
        vision-language model, content may hold image parts (docs/vision.md) and
        ``mm_processor_kwargs`` go to its processor."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if add_generation_prompt and continue_final_message:
            raise ValueError("chat(): add_generation_prompt and continue_final_message cannot "
                             "both be True; set add_generation_prompt=False to continue the "
                             "final message")
        prompts = []
        multimodal = getattr(self.llm_engine, "multimodal", None)
        for i, conversation in enumerate(conversations):
            if multimodal is not None:  # image parts; the processor's chat template
                prompts.append(multimodal.render_chat(
                    conversation, f"conversation {i}", mm_processor_kwargs,
                    chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, tools=tools,
                    **(chat_template_kwargs or {})))
                continue
            try:
                extra = dict(chat_template_kwargs or {})
                if tools is not None:
                    extra["tools"] = tools
                prompts.append(self._render_chat(conversation, chat_template,
                                                 add_generation_prompt, continue_final_message,
                                                 extra))
            except Exception as e:  # jinja2 and tokenizer errors carry no request index
                raise ValueError(f"conversation {i}: the chat template failed: {e}") from e
        return self._run(prompts, sampling_params, use_tqdm, lora_request)

    def beam_search(self, prompts, params, lora_request=None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None):
        """vLLM's beam search: prompts (strings, token-id lists or TextPrompt/TokensPrompt
        dicts) and a BeamSearchParams -> one BeamSearchOutput per prompt, sequences best
        first. transformers' beam semantics (engine/beam_search.py, docs/python-api.md);
        ``concurrency_limit`` prompts are searched at a time (None: all)."""
        from hpcinfer.engine.beam_search import beam_search
        self._check_generate("beam_search()")
        prompts = _as_prompt_list(prompts)
        # lora_request: one for all prompts or one (or None) per prompt, as generate() takes
        loras = lora_requests_per_prompt(lora_request, len(prompts))
        for i, lora in enumerate(loras):
            check_prompt_lora(self.llm_engine.lora, lora, i)
        step = concurrency_limit or max(len(prompts), 1)
        return [out for i in range(0, len(prompts), step)
                for out in beam_search(self.llm_engine, prompts[i:i + step], params,
                                       loras[i:i + step])]

    def _render_chat(self, conversation, chat_template, add_generation_prompt,
                     continue_final_message, extra) -> dict:
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() renders the tokenizer's chat template, and this LLM was "
                             "made with skip_tokenizer_init=True: pass prompt_token_ids to "
                             "generate() instead")
        kwargs = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message, **extra)
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return {"prompt": text, "prompt_token_ids": list(ids)}

    # --- pooling tasks: hpcinfer.engine.pooling does the work ---
    def embed(self, prompts, *, truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params=None, lora_request=None):
        """-> list[EmbeddingRequestOutput] (``.outputs.embedding``)."""
        _refuse_lora(lora_request, "embed()")
        return pooling.engine_for(self, "embed").embed(
            prompts, pooling.as_pooling_params(pooling_params), truncate_prompt_tokens)

    def classify(self, prompts, *, truncate_prompt_tokens: int | None = None,
                 use_tqdm: bool = True, pooling_params=None, lora_request=None):
        """-> list[ClassificationRequestOutput] (``.outputs.probs``)."""
        _refuse_lora(lora_request, "classify()")
        return pooling.engine_for(self, "classify").classify(
            prompts, pooling.as_pooling_params(pooling_params), truncate_prompt_tokens)

    def score(self, data_1, data_2, /, *, truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = True, pooling_params=None, lora_request=None):
        """-> list[ScoringRequestOutput] (``.outputs.score``), one-to-one or one-to-many."""
        _refuse_lora(lora_request, "score()")
        return pooling.engine_for(self, "score").score(
            data_1, data_2, pooling.as_pooling_params(pooling_params), truncate_prompt_tokens)

    def reward(self, prompts, *, truncate_prompt_tokens: int | None = None,
               use_tqdm: bool = True, pooling_params=None, lora_request=None):
        """-> list[PoolingRequestOutput] (``.outputs.data``: per-token [num_tokens, labels])."""
        _refuse_lora(lora_request, "reward()")
        return pooling.engine_for(self, "reward").reward(
            prompts, pooling.as_pooling_params(pooling_params), truncate_prompt_tokens)

    def encode(self, prompts, pooling_params=None, *, truncate_prompt_tokens: int | None = None,
               use_tqdm: bool = True, pooling_task: str | None = None, lora_request=None):
        """-> list[PoolingRequestOutput] (``.outputs.data``, a tensor)."""
        _refuse_lora(lora_request, "encode()")
        return pooling.engine_for(self, "encode").encode(
            prompts, pooling.as_pooling_params(pooling_params), pooling_task,
            truncate_prompt_tokens)

    # --- the loop ---
    def _run(self, prompts: list, sampling_params, use_tqdm: bool,
             lora_request=None) -> list[RequestOutput]:
        if self.task != "generate":
            raise ValueError(f"this LLM was loaded for task={self.task!r}: generate() and chat() "
                             "need a causal LM; use embed/classify/score/reward/encode")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        engine = self.llm_engine
        params = self._resolve_all(_params_per_prompt(sampling_params, len(prompts)))
        loras = lora_requests_per_prompt(lora_request, len(prompts))
        prompts = list(prompts)
        request_ids: list[str] = []

        def check(i: int, error: ValueError | None) -> None:
            if error is not None:
                raise ValueError(f"prompt {i}: {error}") from None
            check_prompt_lora(engine.lora, loras[i], i)

        def add(i: int, prompt) -> None:
            request_id = str(self._next_request)
            self._next_request += 1
            engine.add_request(request_id, prompt, params[i], lora_request=loras[i])
            request_ids.append(request_id)

        finished: dict[str, RequestOutput] = {}
        bar = None
        frozen = False
        stream = _ImagePromptStream.open(engine, prompts, params)
        try:
            if stream is None:   # every prompt checked before the first is added
                processed = [_process_one(engine, prompts, params, i) for i in range(len(prompts))]
                for i, (_, error) in enumerate(processed):
                    check(i, error)
                for i, (prompt, _) in enumerate(processed):
                    add(i, prompt)
            frozen = _freeze_gc()
            bar = _progress_bar(len(prompts)) if use_tqdm else None
            while engine.has_unfinished_requests() or (stream is not None and not stream.done):
                if stream is not None:   # add what is preprocessed; wait only if idle
                    for i, (prompt, error) in stream.ready(
                            wait=not engine.has_unfinished_requests()):
                        check(i, error)
                        add(i, prompt)
                if not engine.has_unfinished_requests():
                    continue
                for out in engine.step(final_only=True):
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if frozen:
                gc.unfreeze()
            if stream is not None:
                stream.close()
            if bar is not None:
                bar.close()
            engine.abort_request([r for r in request_ids if r not in finished])
        return [finished[r] for r in request_ids]

    def _resolve_all(self, params: list[SamplingParams]) -> list[SamplingParams]:
        """Check each distinct SamplingParams once, as it is now (its fields may have been set
        after construction); LLM returns only final outputs, as vLLM's (FINAL_ONLY)."""
        resolved: dict[int, SamplingParams] = {}
        out = []
        for i, p in enumerate(params):
            if id(p) not in resolved:
                try:
                    copy = self.llm_engine.resolve_params(p, str(i))
                except ValueError as e:
                    raise ValueError(f"sampling_params for prompt {i}: {e}") from None
                copy.output_kind = RequestOutputKind.FINAL_ONLY
                resolved[id(p)] = copy
            out.append(resolved[id(p)])
        return out


def _freeze_gc() -> bool:
    """Keep the objects that exist when stepping starts (the prompts, their sequences) out of
    the cyclic collector's full passes until the call returns: such a pass walks every
    prompt token in the middle of the step loop while the GPU waits (2,000 rows of 1,088-token
    prompts: a ~0.2 s pause on a 2-core VM). They are freed by reference counting as before,
    and handed back to the collector at the end (gc.unfreeze). Not when the caller froze
    objects itself (``gc.freeze``): unfreezing would undo that."""
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


# Image prompts are preprocessed on this many threads at most while the engine runs
# (_ImagePromptStream); with worker processes (multimodal/workers.py) each thread hands its
# processor call to one and waits, so the processor's Python no longer holds our GIL.
MAX_PROCESS_THREADS = 8
MIN_PROMPTS_FOR_THREADS = 16


def _process_one(engine: LLMEngine, prompts: list, params: list[SamplingParams], i: int):
    """(ProcessedPrompt, None) or (None, ValueError) for prompt i."""
    try:
        return engine.process_prompt(prompts[i], str(i), params[i].truncate_prompt_tokens), None
    except ValueError as e:
        return None, e


class _ImagePromptStream:
    """Many image prompts, preprocessed on a thread pool while the engine already runs the
    first ones: ``ready`` gives the prompts done so far, in prompt order (so requests are
    added, and scheduled, in the order given).

    Why: the processor takes ~8 ms an image on one core (500 448x448 images: ~4 s), time
    the GPU would otherwise stand idle before the first step. An error is raised when the
    prompts before it have been added (the first bad prompt in order, as without threads);
    what was added is aborted then and nothing is returned, as vLLM's generate does."""

    def __init__(self, engine: LLMEngine, prompts: list, params: list[SamplingParams],
                 threads: int):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hpcinfer-process")
        self._futures = [self._pool.submit(_process_one, engine, prompts, params, i)
                         for i in range(len(prompts))]
        self._next = 0

    @classmethod
    def open(cls, engine: LLMEngine, prompts: list, params: list[SamplingParams]):
        """A stream when there are enough image prompts and cores, else None."""
        num_images = sum(1 for p in prompts if isinstance(p, dict) and "multi_modal_data" in p)
        threads = min(MAX_PROCESS_THREADS, len(os.sched_getaffinity(0)))
        workers = engine.multimodal.workers if engine.multimodal is not None else None
        if workers is not None and workers.num_alive:  # one thread per worker process
            threads = max(2, workers.num_alive)
        if engine.multimodal is None or num_images < MIN_PROMPTS_FOR_THREADS or threads < 2:
            return None
        return cls(engine, prompts, params, threads)

    @property
    def done(self) -> bool:
        return self._next == len(self._futures)

    def ready(self, wait: bool):
        """Yield (index, (prompt, error)) for the next prompts whose preprocessing is done;
        with ``wait``, block for at least one (when there is one left)."""
        futures = self._futures
        while self._next < len(futures) and (wait or futures[self._next].done()):
            i, self._next = self._next, self._next + 1
            yield i, futures[i].result()
            futures[i] = None   # the processed prompt now lives in the engine
            wait = False

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _refuse_lora(lora_request, method: str) -> None:
    if lora_request is not None:  # pooling: not wired to adapters yet (lora.md)
        raise ValueError(f"{method} does not take a lora_request yet: pass None (or merge the "
                         "adapter into the weights with peft's merge_and_unload)")


def _generation_config_dir(generation_config: str | None, model_path: str) -> str | None:
    """vLLM's generation_config: "auto" -> the model directory, "vllm"/None -> no defaults,
    else a directory holding generation_config.json."""
    if generation_config in (None, "vllm"):
        return None
    if generation_config == "auto":
        return model_path
    if not Path(generation_config).is_dir():
        raise ValueError(f"generation_config={generation_config!r}: use \"auto\" (the model's "
                         "generation_config.json), \"vllm\" (vLLM's defaults) or a directory "
                         "holding a generation_config.json")
    return str(generation_config)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    return prompts


_GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                             "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                             "max_new_tokens": "max_tokens"}


def _generation_config_defaults(model_path: str) -> dict:
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}
    defaults = {ours: config[theirs] for theirs, ours in _GENERATION_CONFIG_FIELDS.items()
                if config.get(theirs) is not None}
    if defaults:
        log.info("default sampling params from %s: %s", path, defaults)
    return defaults


def _params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts: pass one "
                         "for all prompts or exactly one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] is a {type(p).__name__}, not SamplingParams")
    return params


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
