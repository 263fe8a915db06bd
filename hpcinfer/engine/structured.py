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
    """One step's next-token bitmask. ``rows``: the batch rows it constrains; ``bitmask``:
    [len(rows), ceil(vocab / 32)] int32 on the device, bit j of word w allows token 32w + j;
    ``bits``: [32] int32, the value of bit j."""

    rows: torch.Tensor
    bitmask: torch.Tensor
    bits: torch.Tensor

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the constrained rows get -inf. logits: [rows, vocab] float,
        in place; the other rows are not touched."""
        vocab = logits.shape[1]
        allowed = (self.bitmask[:, :, None] & self.bits) != 0        # [R, words, 32]
        allowed = allowed.flatten(1)[:, :vocab]
        logits[self.rows] = logits[self.rows].masked_fill(~allowed, float("-inf"))


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, device: torch.device,
                 fills_masks: bool = True, max_threads: int | None = None):
        import xgrammar as xgr
        if max_threads is None:  # the cores this process may use (a Slurm task's cpus)
            max_threads = max(1, min(8, len(os.sched_getaffinity(0))))
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.device = device
        self.fills_masks = fills_masks
        # The tokenizer may know fewer tokens than the model has logits (padded embeddings):
        # xgrammar never allows the extra ones.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=max(vocab_size, len(tokenizer)),
            stop_token_ids=sorted(stop_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads)
        self._num_words = (info.vocab_size + 31) // 32
        self._compiled: OrderedDict[tuple, object] = OrderedDict()   # key -> grammar | error
        self._cached_bytes = 0
        # bit j of each int32 word, for unpacking the mask on the device
        self._bits = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)],
                                  dtype=torch.int32, device=device)
        self.num_masks = 0      # steps that filled a mask
        self.mask_s = 0.0       # host time spent filling them

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
        # Pinned, so the copies below do not wait for the forward the GPU is running.
        pinned = self.device.type == "cuda"
        host = torch.empty((len(rows), self._num_words), dtype=torch.int32, pin_memory=pinned)
        matchers = [seqs[i].grammar for i in rows]
        if len(matchers) < MIN_ROWS_FOR_THREADS:
            for j, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(host, j)
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, host)
        host_rows = torch.tensor(rows, dtype=torch.int64)
        mask = GrammarMask((host_rows.pin_memory() if pinned else host_rows).to(
            self.device, non_blocking=True), host.to(self.device, non_blocking=True), self._bits)
        self.mask_s += time.perf_counter() - t0
        self.num_masks += 1
        return mask

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """Advance ``seq``'s matcher by its new token. Returns the finish reason it causes:
        "stop" when the grammar is complete, "abort" when the token breaks it (every token was
        disallowed by the grammar together with allowed_token_ids, logit_bias or bad_words)."""
        grammar = seq.grammar
        if grammar.is_terminated():
            return "stop"
        if not grammar.accept_token(token_id):
            log.warning("request %r: token %d is outside its structured-outputs constraint "
                        "(no allowed token was left after the other logits edits); the "
                        "sequence is aborted", seq.request_id, token_id)
            return "abort"
        return "stop" if grammar.is_terminated() else None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``."""
    # EBNF string literals take JSON's escapes for quotes, backslashes and control chars
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _size(entry) -> int:
    return 0 if isinstance(entry, str) else entry.memory_size_bytes


def _clean(exc: Exception) -> str:
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line)
