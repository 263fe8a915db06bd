"""Structured outputs: the sampler stage that keeps each constrained row inside its grammar.

One ``StructuredOutputs`` per engine, made at the first constrained request (so xgrammar,
which imports torch and transformers, is loaded only by jobs that use it). It owns:

- the compiler: xgrammar's GrammarCompiler over one TokenizerInfo (the tokenizer's tokens
  laid out over the model's logits vocabulary, which may be larger; the engine's EOS ids are
  the stop tokens), and a bounded cache of compiled grammars keyed by the constraint's text,
  failures included, so a schema shared by a million rows compiles once and a broken one is
  reported once per row without recompiling;
- a matcher per constrained sequence (``seq.grammar``), advanced by the engine with every
  token it appends. A preempted sequence keeps its tokens (recompute), so its matcher never
  rewinds; each of n > 1 samples has its own;
- the per-step bitmask: filled on the CPU for the rows of a step after the forward is
  launched (the GPU runs it meanwhile), copied to the device without a sync, and applied
  there to the constrained rows only, so free rows sample exactly what they would alone.
  The host (pinned) and device buffers are allocated once and grow with the batch, so a
  step allocates nothing and never calls cudaHostAlloc (which synchronizes the device).

The bitmask covers the tokenizer's tokens only (``mask_vocab``, e.g. the 49,152 of a
tokenizer whose model has 128,256 logits): xgrammar's fill, accept and the host-to-device
copy then work on 1,536 words a row instead of 4,008 (accept_token is ~4x faster with the
narrow vocabulary, measured), and the logits past ``mask_vocab``, which no token of the
tokenizer can produce, are set to -inf for constrained rows in one device op. Stop ids past
the tokenizer (a config EOS id the tokenizer does not know) are left out of the grammar's
stop tokens; if every stop id is past it, the mask covers all the logits as before.

Under tensor/pipeline parallelism every rank compiles and advances matchers (each rank sees
the same tokens and must end a row at the same step), but only the sampling rank fills masks.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from hpcinfer.engine.sequence import Sequence
from hpcinfer.engine.structured_params import StructuredOutputsParams

log = logging.getLogger(__name__)

# The compiled-grammar cache keeps at most this many entries and bytes (a compiled JSON
# schema holds token-mask tables of a few MB for a 100k-token vocabulary); the oldest used go
# first. Running sequences keep their own grammar, so eviction never touches them.
MAX_CACHED_GRAMMARS = 1024
MAX_CACHED_GRAMMAR_BYTES = 1 << 30
# Below this many constrained rows a step fills their masks on one thread: xgrammar's thread
# pool costs ~0.1 ms a call, a row ~20 us with a 128k vocabulary (measured on 2 cores).
MIN_ROWS_FOR_THREADS = 64
# At most this many fill threads (the default is every core this process may use: the step
# loop waits for the fill, so its own core is free meanwhile).
MAX_FILL_THREADS = 32
# Whitespace between JSON tokens, at most this many characters in a row (vLLM: unbounded).
# Enough for pretty-printing seven levels deep; without a cap a model can spend all of
# max_tokens on whitespace and leave the row unparseable.
MAX_JSON_WHITESPACE = 32
# The character classes of xgrammar's JSON strings (length-bounded ones, all others), and the
# one JSON allows: no raw control characters, no UTF-16 surrogates (invalid in UTF-8, they
# decode to U+FFFD and break maxLength and patterns).
_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'
# xgrammar's C++ errors start with "[hh:mm:ss] /project/cpp/file.cc:123: "
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass
class GrammarMask:
    """One step's next-token bitmask. ``rows``: the batch rows it constrains, a device tensor,
    or None when it constrains every row of the batch; ``bitmask``: [constrained rows,
    ceil(mask_vocab / 32)] int32 on the device, bit j of word w allows token 32w + j;
    ``bits``: [32] int32, the value of bit j; ``mask_vocab``: the tokens the bitmask covers
    (logits past it are never allowed in a constrained row); ``owner``: the
    StructuredOutputs whose ``apply_s`` counts the host time of ``apply``."""

    rows: torch.Tensor | None
    bitmask: torch.Tensor
    bits: torch.Tensor
    mask_vocab: int
    owner: StructuredOutputs | None = None

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the constrained rows get -inf. logits: [rows, vocab] float,
        in place; the other rows are not touched."""
        t0 = time.perf_counter()
        vocab = logits.shape[1]
        width = min(vocab, self.mask_vocab)
        target = logits if self.rows is None else logits[self.rows]
        disallowed = ((self.bitmask[:, :, None] & self.bits) == 0).flatten(1)[:, :width]
        target[:, :width].masked_fill_(disallowed, float("-inf"))
        if width < vocab:   # tokens the tokenizer does not have
            target[:, width:] = float("-inf")
        if self.rows is not None:
            logits[self.rows] = target
        if self.owner is not None:
            self.owner.apply_s += time.perf_counter() - t0


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, device: torch.device,
                 fills_masks: bool = True, max_threads: int | None = None):
        import xgrammar as xgr
        if max_threads is None:  # the cores this process may use (a Slurm task's cpus)
            max_threads = max(1, min(MAX_FILL_THREADS, len(os.sched_getaffinity(0))))
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.device = device
        self.fills_masks = fills_masks
        self.max_threads = max_threads
        # The tokenizer may know fewer tokens than the model has logits (padded embeddings):
        # the mask covers the tokenizer's, the others are never allowed (GrammarMask.apply).
        tokenizer_len = max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=-1))
        self.mask_vocab, stops = mask_vocabulary(tokenizer_len, vocab_size, stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.mask_vocab, stop_token_ids=stops or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads)
        self._num_words = (info.vocab_size + 31) // 32
        # Reused every step, grown when a batch has more constrained rows (_buffers).
        self._host: torch.Tensor | None = None      # [rows, words] int32, pinned on CUDA
        self._host_rows: torch.Tensor | None = None  # [rows] int64, pinned on CUDA
        self._dev: torch.Tensor | None = None
        self._dev_rows: torch.Tensor | None = None
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._compiled: OrderedDict[tuple, object] = OrderedDict()   # key -> grammar | error
        self._cached_bytes = 0
        # bit j of each int32 word, for unpacking the mask on the device
        self._bits = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)],
                                  dtype=torch.int32, device=device)
        self.num_masks = 0      # steps that filled a mask
        self.mask_s = 0.0       # host time spent filling them (fill() as a whole)
        # host-time breakdown (bench/structured_outputs.py): xgrammar's fill alone, the
        # matchers' accept_token, GrammarMask.apply (on CUDA: launching it)
        self.fill_s = 0.0
        self.accept_s = 0.0
        self.apply_s = 0.0

    # --- compiling ---
    def compile(self, so: StructuredOutputsParams):
        """The compiled grammar of ``so`` (cached); ValueError says what is wrong with it."""
        key = so.cache_key()
        found = self._compiled.get(key)
        if found is None:
            found = self._compile_uncached(so)
            self._compiled[key] = found
            self._cached_bytes += _size(found)
            while len(self._compiled) > 1 and (len(self._compiled) > MAX_CACHED_GRAMMARS or
                                               self._cached_bytes > MAX_CACHED_GRAMMAR_BYTES):
                self._cached_bytes -= _size(self._compiled.popitem(last=False)[1])
        else:
            self._compiled.move_to_end(key)
        if isinstance(found, str):
            raise ValueError(found)
        return found

    def _compile_uncached(self, so: StructuredOutputsParams):
        kind = so.kind
        try:
            if kind == "json":
                schema = so.json if isinstance(so.json, str) else json.dumps(so.json)
                return self.compiler.compile_grammar(self._json_schema_grammar(
                    schema, any_whitespace=not so.disable_any_whitespace))
            if kind == "json_object":
                # an object, as OpenAI's json_object (xgrammar's builtin JSON allows arrays)
                return self.compiler.compile_grammar(self._json_schema_grammar(
                    '{"type": "object"}', any_whitespace=not so.disable_any_whitespace))
            if kind == "regex":
                return self.compiler.compile_regex(so.regex)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(so.choice))
            return self.compiler.compile_grammar(so.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            return f"structured_outputs.{kind} does not compile: {_clean(exc)}"

    def _json_schema_grammar(self, schema: str, any_whitespace: bool):
        """xgrammar's grammar of a JSON schema with its string characters fixed: strings with
        a minLength/maxLength take raw control characters, which JSON forbids (json.loads
        rejects them), and all strings take UTF-16 surrogates (invalid UTF-8)."""
        grammar = self._xgr.Grammar.from_json_schema(
            schema, any_whitespace=any_whitespace,
            max_whitespace_cnt=MAX_JSON_WHITESPACE if any_whitespace else None)
        text = str(grammar)
        for chars in _STRING_CHARS:
            text = text.replace(chars, _JSON_STRING_CHARS)
        return self._xgr.Grammar.from_ebnf(text)

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)

    # --- the step ---
    def fill(self, seqs: list[Sequence]) -> GrammarMask | None:
        """The bitmask of this step's constrained rows (None if there are none here). Rows
        already finished (async scheduling: stopped by the token read just before) are left
        unconstrained: their token is dropped."""
        if not self.fills_masks:
            return None
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.is_finished
                and not s.grammar.is_terminated()]
        if not rows:
            return None
        t0 = time.perf_counter()
        num = len(rows)
        host, host_rows, dev, dev_rows = self._buffers(num)
        host = host[:num]
        matchers = [seqs[i].grammar for i in rows]
        t1 = time.perf_counter()
        if num < MIN_ROWS_FOR_THREADS or self.max_threads == 1:
            for j, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(host, j)
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, host)
        t2 = time.perf_counter()
        # Pinned host buffers: the copies do not wait for the forward the GPU is running.
        bitmask = dev[:num]
        bitmask.copy_(host, non_blocking=True)
        device_rows = None
        if num < len(seqs):   # some rows are free: the mask says which are not
            host_rows[:num] = torch.tensor(rows, dtype=torch.int64)
            device_rows = dev_rows[:num]
            device_rows.copy_(host_rows[:num], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        mask = GrammarMask(device_rows, bitmask, self._bits, self.mask_vocab, self)
        t3 = time.perf_counter()
        self.fill_s += t2 - t1
        self.mask_s += t3 - t0
        self.num_masks += 1
        return mask

    def _buffers(self, num: int):
        """The host and device buffers for ``num`` constrained rows, allocated when a step has
        more rows than any before (rounded up, so a growing batch allocates a few times).
        The host ones are written only after the last step's copies from them are done."""
        if self._host is None or self._host.shape[0] < num:
            size = max(64, 1 << (num - 1).bit_length())
            pinned = self.device.type == "cuda"
            self._host = torch.zeros((size, self._num_words), dtype=torch.int32,
                                     pin_memory=pinned)
            self._host_rows = torch.zeros(size, dtype=torch.int64, pin_memory=pinned)
            self._dev = torch.zeros((size, self._num_words), dtype=torch.int32,
                                    device=self.device)
            self._dev_rows = torch.zeros(size, dtype=torch.int64, device=self.device)
        elif self._copied is not None:
            self._copied.synchronize()   # done long ago: that step's tokens were read since
        return self._host, self._host_rows, self._dev, self._dev_rows

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """Advance ``seq``'s matcher by its new token. Returns the finish reason it causes:
        "stop" when the grammar is complete, "abort" when the token breaks it (every token was
        disallowed by the grammar together with allowed_token_ids, logit_bias or bad_words)."""
        t0 = time.perf_counter()
        grammar = seq.grammar
        if grammar.is_terminated():
            reason = "stop"
        elif not grammar.accept_token(token_id):
            log.warning("request %r: token %d is outside its structured-outputs constraint "
                        "(no allowed token was left after the other logits edits); the "
                        "sequence is aborted", seq.request_id, token_id)
            reason = "abort"
        else:
            reason = "stop" if grammar.is_terminated() else None
        self.accept_s += time.perf_counter() - t0
        return reason


def mask_vocabulary(tokenizer_len: int, vocab_size: int,
                    stop_token_ids) -> tuple[int, list[int]]:
    """(tokens the bitmask covers, stop ids given to xgrammar). The tokenizer's tokens (or the
    logits, if the tokenizer has more), and the stop ids among them; if none of the stop ids
    is among them, every logit and every stop id."""
    width = max(tokenizer_len, 1)
    stops = sorted(stop_token_ids)
    inside = [t for t in stops if t < width]
    if width >= vocab_size or (stops and not inside):
        return max(vocab_size, width), stops
    return width, inside


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``."""
    # EBNF string literals take JSON's escapes for quotes, backslashes and control chars
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _size(entry) -> int:
    return 0 if isinstance(entry, str) else entry.memory_size_bytes


def _clean(exc: Exception) -> str:
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line)
