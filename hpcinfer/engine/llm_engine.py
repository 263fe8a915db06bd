"""LLMEngine: the streaming step loop (add_request / step / abort_request).

Ownership: the scheduler moves sequences and the block manager writes block tables; the
engine alone appends sampled tokens, detokenizes and decides when a sequence is finished
(through its TokenAppender, engine/token_appender.py).
A bad request raises ValueError in ``add_request`` before any state changes, so it never
disturbs the requests already running.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from hpcinfer.engine.block_manager import BlockManager
from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.detokenizer import IncrementalDetokenizer
from hpcinfer.engine.inflight import InFlight, PinnedTokens, async_safe
from hpcinfer.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from hpcinfer.engine.outputs import RequestMetrics, RequestOutput
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.prompt_input import check_prompt, tokenize_prompt
from hpcinfer.engine.prompt_logprobs import record as record_prompt_logprobs
from hpcinfer.engine.request_params import NoDetokenizer, resolve_params
from hpcinfer.engine.request_state import RequestState
from hpcinfer.engine.request_stats import RequestStats
from hpcinfer.engine.sampler import Sampler, SamplerOutput, plain_greedy_params
from hpcinfer.engine.scheduler import Scheduler
from hpcinfer.engine.sequence import Sequence
from hpcinfer.engine.token_appender import TokenAppender
from hpcinfer.lora.manager import attach_lora, check_lora_request
from hpcinfer.multimodal.inputs import ProcessedPrompt

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters and cumulative timings (seconds) the bench and the worker's metrics read."""

    num_steps: int = 0
    num_decode_steps: int = 0
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    model_s: float = 0.0
    sample_s: float = 0.0
    postprocess_s: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    grammar_mask_s: float = 0.0     # structured outputs: host time filling the bitmasks
    num_grammar_masks: int = 0      # ... and how many steps filled one
    last_step: dict = field(default_factory=dict)
    requests: RequestStats = field(default_factory=RequestStats)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        from hpcinfer.models.registry import load_model
        self.config = config
        self.device = resolve_device(config.device)
        from hpcinfer.engine.distributed_runner import setup_parallel
        self.parallel = setup_parallel(config)  # None for one process; else TP/PP groups
        if self.parallel is not None:
            self.device = self.parallel.device  # this rank's GPU
        # skip_tokenizer_init (vLLM's): none at all; token ids in and out, and what needs
        # text is refused per request (request_params.py, prompt_input.py)
        self.tokenizer = (None if config.skip_tokenizer_init else tokenizer if tokenizer
                          is not None else _load_tokenizer(config.tokenizer or config.model))
        model_dtype = resolve_dtype(config.dtype, _config_dtype(config.model), self.device)
        torch.manual_seed(config.seed)
        model = load_model(config.model, dtype=model_dtype, device=self.device,
                           attention_backend=config.attention_backend,
                           quantization=config.quantization,
                           expert_parallel=config.enable_expert_parallel,
                           load_format=config.load_format, seed=config.seed,
                           **(self.parallel.load_kwargs() if self.parallel else {}))
        self.spec = model.spec
        self.max_model_len = self._resolve_max_model_len()
        self.multimodal = None  # multimodal.processor.MultiModalProcessor for image models
        if getattr(model, "takes_images", False):
            from hpcinfer.multimodal.processor import MultiModalProcessor
            from hpcinfer.multimodal.workers import default_num_workers
            # preprocessing worker processes only where prompts are read (rank 0)
            on_driver = self.parallel is None or self.parallel.rank == 0
            self.multimodal = MultiModalProcessor(
                config.model, model, num_workers=default_num_workers() if on_driver else 0,
                pin_pixels=self.device.type == "cuda")
        self.runner = (ModelRunner(config, model, self.device) if self.parallel is None
                       else self.parallel.runner(config, model, self.device))
        self.lora = attach_lora(config, self.runner)  # None without enable_lora (lora/)
        num_blocks = self.runner.allocate_kv_cache(self.max_model_len)
        self.runner.capture_cuda_graphs()  # no-op on CPU and with enforce_eager
        self.block_manager = BlockManager(num_blocks, config.block_size, config.max_num_seqs,
                                          self.runner.max_blocks_per_seq,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   config.max_loras if config.enable_lora else None)
        self.sampler = Sampler(self.spec.vocab_size, self.device, config.seed)
        if self.parallel is not None:  # rank 0 samples, every rank gets the tokens
            self.sampler = self.parallel.sampler(self.sampler)
        eos = set(self.spec.eos_token_ids or ())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.appender = TokenAppender(self.tokenizer, self.max_model_len, frozenset(eos))
        self.requests: dict[str, RequestState] = {}
        self.structured = None   # engine/structured.py, made at the first constrained request
        self.stats = EngineStats()
        self._arrivals = 0
        # Async scheduling (inflight.py): one process only (ranks sample in lockstep).
        self._async = config.async_scheduling and self.parallel is None
        self._inflight: InFlight | None = None   # launched step whose tokens are unread
        self._num_sync_only = 0                   # live requests that need synchronous steps
        # live requests whose rows are not always the plain argmax: while there are none, the
        # sampler need not look at each row of a step (256 rows: ~0.1 ms a step on the host)
        self._num_not_plain = 0
        self._pinned = (PinnedTokens(config.max_num_seqs)
                        if self._async and self.device.type == "cuda" else None)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    @classmethod
    def from_engine_args(cls, engine_args, **_ignored) -> LLMEngine:
        """vLLM's constructor from EngineArgs (hpcinfer.engine.arg_utils); several ranks
        asked for from one process are spawned, as LLM does."""
        from hpcinfer.engine.distributed_runner import create_engine
        return create_engine(engine_args.create_engine_config())

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Forget every cached prefix block (vLLM's name). Running requests keep their KV,
        only no new request shares it, so ``reset_running_requests`` needs no preemption
        here. Returns True (the reset always succeeds)."""
        if self.parallel is not None:
            # Every rank schedules from its own prefix cache; a reset that only this rank made
            # would make the ranks' batches differ.
            raise ValueError("reset_prefix_cache() is not supported with tensor or pipeline "
                             "parallelism yet: create a new LLM instead")
        self.block_manager.reset_prefix_cache()
        return True

    def _resolve_max_model_len(self) -> int:
        model_max = self.spec.max_position_embeddings
        wanted = self.config.max_model_len
        if wanted is None:
            return model_max
        if wanted > model_max:
            raise ValueError(f"max_model_len={wanted} is larger than the model's "
                             f"max_position_embeddings={model_max}: lower max_model_len")
        return wanted

    # --- requests ---
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_request=None,
                    priority: int = 0, **_vllm_only) -> None:
        """Queue one request. prompt: a string, a list of token ids, or a dict with "prompt"
        and/or "prompt_token_ids". Raises ValueError naming the request if it is invalid
        (the params are checked again here: their fields may have been set after
        construction). ``priority`` is accepted and ignored (first come, first served)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {request_id!r}: params must be a SamplingParams, "
                             f"got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r}: a request with this id is already running")
        params = self.resolve_params(params, request_id)
        grammar = self._compile_grammar(params, request_id)
        lora_request = check_lora_request(self.lora, lora_request, request_id)
        processed = self.process_prompt(prompt, request_id, params.truncate_prompt_tokens)
        text, token_ids = processed.text, processed.token_ids
        self._arrivals += 1
        num_samples = params.num_samples
        seqs = [Sequence(request_id, i, token_ids,
                         params.child(i) if num_samples > 1 else params, self._arrivals)
                for i in range(num_samples)]
        for seq in seqs:
            if seq.params.seed is not None:
                seq.generator = self.sampler.make_generator(seq.params.seed)
            seq.detok = (IncrementalDetokenizer(self.tokenizer, token_ids,
                                                params.skip_special_tokens,
                                                params.spaces_between_special_tokens)
                         if params.detokenize else NoDetokenizer())
            if grammar is not None:  # each sample walks the grammar on its own
                self.structured.start(seq, grammar)
            if lora_request is not None:
                seq.lora_request, seq.lora_id = lora_request, lora_request.lora_int_id
            seq.mm_inputs = processed.mm_inputs
            self.scheduler.add(seq)
        metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None
                                 else arrival_time)
        self.requests[request_id] = RequestState(request_id, text, token_ids, params, seqs,
                                                metrics)
        self._num_sync_only += not async_safe(seqs[0].params)
        self._num_not_plain += not plain_greedy_params(seqs[0].params)
        self.stats.num_prompt_tokens += len(token_ids) * num_samples

    def _compile_grammar(self, params: SamplingParams, request_id: str):
        """The request's compiled structured-outputs constraint (None without one)."""
        if params.structured_outputs is None:
            return None
        if self.structured is None:
            from hpcinfer.engine.structured import StructuredOutputs
            self.structured = StructuredOutputs(
                self.tokenizer, self.spec.vocab_size, self.eos_token_ids, self.device,
                fills_masks=self.parallel is None or self.parallel.rank == 0)
        try:
            return self.structured.compile(params.structured_outputs)
        except ValueError as e:
            raise ValueError(f"request {request_id!r}: {e}") from None

    def _grammar_mask(self, seqs: list[Sequence]):
        """This step's structured-outputs bitmask, filled while the GPU runs the forward."""
        if self.structured is None or not seqs:
            return None
        num_before, t0 = self.structured.num_masks, time.perf_counter()
        mask = self.structured.fill(seqs)
        if self.structured.num_masks != num_before:
            self.stats.num_grammar_masks += 1
            self.stats.grammar_mask_s += time.perf_counter() - t0
        return mask

    def resolve_params(self, params: SamplingParams, request_id: str = "?") -> SamplingParams:
        """The engine's checked copy of ``params`` (engine/request_params.py): ValueError
        names the request and the field."""
        return resolve_params(params, request_id, self.spec.vocab_size, self.config.max_logprobs,
                              self.tokenizer)

    def tokenize_prompt(self, prompt, request_id: str = "?",
                        truncate_prompt_tokens: int | None = None) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids), validated against vocab and max_model_len
        (engine/prompt_input.py)."""
        return tokenize_prompt(self.tokenizer, prompt, request_id,
                               max_model_len=self.max_model_len, vocab_size=self.spec.vocab_size,
                               truncate_prompt_tokens=truncate_prompt_tokens)

    def process_prompt(self, prompt, request_id: str = "?",
                       truncate_prompt_tokens: int | None = None) -> ProcessedPrompt:
        """The prompt as checked token ids and, for a model that takes images, its images
        (hpcinfer/multimodal: {"prompt": text, "multi_modal_data": {"image": ...}}). A
        ProcessedPrompt (LLM made it already) is only checked again."""
        limits = (self.max_model_len, self.spec.vocab_size)
        if isinstance(prompt, ProcessedPrompt):
            if prompt.checked_for != limits:
                check_prompt(request_id, prompt.token_ids, *limits)
            return prompt
        if isinstance(prompt, dict) and "multi_modal_data" in prompt:
            if self.multimodal is None:
                raise ValueError(f"request {request_id!r}: {self.spec.architecture} takes no "
                                 "images: remove multi_modal_data, or load a vision-language "
                                 "model (docs/vision.md)")
            if truncate_prompt_tokens is not None:
                raise ValueError(f"request {request_id!r}: truncate_prompt_tokens would cut "
                                 "image placeholders: leave it None for prompts with images")
            processed = self.multimodal.process(prompt, request_id)
            check_prompt(request_id, processed.token_ids, *limits)
            processed.checked_for = limits
            return processed
        text, token_ids = self.tokenize_prompt(prompt, request_id, truncate_prompt_tokens)
        if self.multimodal is not None:
            self.multimodal.check_text_only(token_ids, f"request {request_id!r}")
        return ProcessedPrompt(text, token_ids, checked_for=limits)

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop requests (unknown or finished ids are ignored, as in vLLM) and free their KV."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self._drop_request(rid)
            if request is None:
                continue
            live = [s for s in request.seqs if not s.is_finished]
            for seq in live:
                seq.finish_reason = "abort"
                seq.drop_placeholder()  # its in-flight token will be dropped
            self.scheduler.finish(live)

    def _drop_request(self, request_id: str) -> RequestState | None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._num_sync_only -= not async_safe(request.seqs[0].params)
            self._num_not_plain -= not plain_greedy_params(request.seqs[0].params)
            metrics = request.metrics
            metrics.finished_time = time.time()
            for seq in request.seqs[:request.params.n]:
                self.stats.requests.record_finished(metrics, seq.finish_reason or "abort",
                                                    len(request.prompt_token_ids),
                                                    seq.num_output_tokens)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # --- the step loop ---
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled batch; return the (cumulative) outputs of the requests that got
        new tokens, or with ``final_only`` only of those that finished (cheaper: LLM uses it).

        With async scheduling the outputs are those of the previous launched step."""
        if self._async and not self._num_sync_only:
            return self._step_async(final_only)
        if self._inflight is not None:  # a synchronous step needs every token read first
            return self._resolve_inflight(final_only)
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        t1 = time.perf_counter()
        if not scheduled.seqs:
            if self.scheduler.has_unfinished():  # cannot happen while the pool >= max_model_len
                raise RuntimeError("the scheduler could not schedule any waiting request; "
                                   "this is a bug: please report it with the engine arguments")
            return []
        batch = self.runner.prepare(scheduled.seqs, scheduled.num_new_tokens, self.block_manager)
        t2 = time.perf_counter()
        logits = self.runner.run(batch)
        if batch.prompt_rows is not None:  # (such requests always take synchronous steps)
            record_prompt_logprobs(batch.prompt_rows, self.tokenizer, self.parallel)
        self.scheduler.update_computed(scheduled)
        mask = self._grammar_mask(batch.sample_seqs)
        t3 = time.perf_counter()
        sampled = (self.sampler(logits, batch.sample_seqs, self.eos_token_ids, mask,
                                all_plain=not self._num_not_plain)
                   if batch.sample_seqs else SamplerOutput([], [], []))
        t4 = time.perf_counter()
        outputs = self._postprocess(batch.sample_seqs, sampled, final_only)
        t5 = time.perf_counter()
        self._record(len(scheduled.seqs), batch.meta.is_decode, (t0, t1, t2, t3, t4, t5))
        return outputs

    def _step_async(self, final_only: bool) -> list[RequestOutput]:
        """Launch the next step, then read back and process the previous one (inflight.py)."""
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        t1 = time.perf_counter()
        if not scheduled.seqs:
            if self._inflight is not None:
                return self._resolve_inflight(final_only)
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not schedule any waiting request; "
                                   "this is a bug: please report it with the engine arguments")
            return []
        pending = self._inflight
        batch = self.runner.prepare(scheduled.seqs, scheduled.num_new_tokens, self.block_manager,
                                    pending=pending)
        t2 = time.perf_counter()
        logits = self.runner.run(batch)
        launched, outputs, mask = None, None, None
        if batch.sample_seqs:
            if any(s.grammar is not None for s in batch.sample_seqs):
                # The mask needs the previous step's tokens: read them back now, while the
                # GPU runs this step's forward, then fill the mask before sampling.
                outputs = self._resolve_inflight(final_only) if pending is not None else []
                mask = self._grammar_mask(batch.sample_seqs)
            tokens = self.sampler.sample_tokens(logits, batch.sample_seqs, self.eos_token_ids,
                                                mask, all_plain=not self._num_not_plain,
                                                pending=pending)
            launched = InFlight.launch(batch.sample_seqs, tokens, self._pinned)
        t3 = time.perf_counter()
        if outputs is None:
            outputs = self._resolve_inflight(final_only) if pending is not None else []
        t4 = time.perf_counter()
        # After the read-back: blocks filled by this step hash real tokens, not placeholders,
        # and sequences it stopped are skipped.
        self.scheduler.update_computed(scheduled)
        if launched is not None:
            for seq in launched.seqs:
                if not seq.is_finished and not self.appender.ends_by_length_next(seq):
                    seq.add_placeholder()
        self._inflight = launched
        t5 = time.perf_counter()
        self._record(len(scheduled.seqs), batch.meta.is_decode, (t0, t1, t2, t3, t4, t5))
        return outputs

    def drain(self, final_only: bool = False) -> list[RequestOutput]:
        """Read back the launched step, if any, without launching another: the outputs a
        synchronous engine would already have returned. For callers that stop stepping (a
        signal, a deadline) and want every request that has finished. Stepping may go on
        afterwards."""
        return self._resolve_inflight(final_only) if self._inflight is not None else []

    def _resolve_inflight(self, final_only: bool) -> list[RequestOutput]:
        """Read the launched step's tokens and append them through the synchronous path."""
        flight, self._inflight = self._inflight, None
        seqs, tokens = [], []
        for seq, token in zip(flight.seqs, flight.token_list()):
            if seq.is_finished:  # aborted, or stopped by its previous token: row wasted
                continue
            seq.drop_placeholder()
            seqs.append(seq)
            tokens.append(token)
        none = [None] * len(seqs)
        return self._postprocess(seqs, SamplerOutput(tokens, none, list(none)), final_only)

    def _postprocess(self, seqs: list[Sequence], sampled: SamplerOutput,
                     final_only: bool) -> list[RequestOutput]:
        finished, touched = [], {}
        if self.structured is not None:   # every matcher in one call, not one per row
            self.structured.accept_tokens(seqs, sampled.token_ids)
        for i, seq in enumerate(seqs):
            self.appender.append(seq, sampled.token_ids[i], sampled.sampled_logprobs[i],
                                 sampled.top_logprobs[i], self.structured)
            if seq.finish_reason is not None:
                finished.append(seq)
            touched[seq.request_id] = None
        self.scheduler.finish(finished)
        self.stats.num_generated_tokens += len(seqs)
        outputs = []
        now = time.time()
        for rid in touched:
            request = self.requests[rid]
            metrics = request.metrics
            metrics.last_token_time = now
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            if request.finished:
                self._drop_request(rid)
            elif final_only or not request.streams:
                continue
            outputs.append(request.output())
        return outputs

    def _record(self, num_seqs: int, is_decode: bool, t: tuple[float, ...]) -> None:
        stats = self.stats
        stats.num_steps += 1
        stats.num_decode_steps += is_decode
        stats.schedule_s += t[1] - t[0]
        stats.prepare_s += t[2] - t[1]
        stats.model_s += t[3] - t[2]
        stats.sample_s += t[4] - t[3]
        stats.postprocess_s += t[5] - t[4]
        stats.last_step = {"num_seqs": num_seqs, "is_decode": is_decode,
                           "schedule_s": t[1] - t[0], "prepare_s": t[2] - t[1]}

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end a sequence (config, generation_config and the tokenizer's)."""
        return self.appender.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:  # tests make a frequent token the EOS
        self.appender.eos_token_ids = frozenset(ids)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def kv_cache_usage(self) -> float:
        bm = self.block_manager
        return 1.0 - bm.num_free_blocks / bm.num_blocks

    @property
    def prefix_cache_hits(self) -> int:
        return self.block_manager.prefix_cache_hits


def _load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_path)


def _config_dtype(model_path: str):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None  # load_model reports the real problem with the checkpoint
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
