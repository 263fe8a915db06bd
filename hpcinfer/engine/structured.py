"""Structured outputs: the sampler stage that keeps each constrained row inside its grammar.

One ``StructuredOutputs`` per engine, made at the first constrained request (so xgrammar,
which imports torch and transformers, is loaded only by jobs that use it). It owns:

- the compiler: xgrammar's GrammarCompiler over one TokenizerInfo (the tokenizer's tokens
  laid out over the model's logits vocabulary, which may be larger; the engine's EOS ids are
  the stop tokens), and a bounded cache of compiled grammars keyed by the constraint's text,
  failures included, so a schema shared by a million rows compiles once and a broken one is
  reported once per row without recompiling;
- a matcher per constrained sequence (``seq.grammar``), advanced by the engine with every
  token it appends: a step's tokens go to xgrammar in one call per chunk of rows
  (``accept_tokens``), and the appender reads each row's result (``accept``). A preempted
  sequence keeps its tokens (recompute), so its matcher never rewinds; each of n > 1
  samples has its own;
- the per-step bitmask: filled on the CPU for the rows of a step (the GPU runs the forward
  meanwhile), copied to the device without a sync, and applied there to the constrained
  rows only (kernels/grammar_mask.py on a GPU), so free rows sample exactly what they would
  alone. The host (pinned) and device buffers are allocated once and grow with the batch,
  so a step allocates nothing and never calls cudaHostAlloc (which synchronizes the device).

A step's accepts and fills run in chunks of rows on several threads while the step loop
waits for them (grammar_threads.py says why not beside it: a thread beside the step loop
hardly gets the GIL back between xgrammar's calls).

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

import numpy as np
import torch

from hpcinfer.engine.grammar_threads import ChunkRunner, batch_accept_call, deal, undeal
from hpcinfer.engine.sequence import Sequence
from hpcinfer.engine.structured_params import StructuredOutputsParams

log = logging.getLogger(__name__)

# The compiled-grammar cache keeps at most this many entries and bytes (a compiled JSON
# schema holds token-mask tables of a few MB for a 100k-token vocabulary); the oldest used go
# first. Running sequences keep their own grammar, so eviction never touches them.
MAX_CACHED_GRAMMARS = 1024
MAX_CACHED_GRAMMAR_BYTES = 1 << 30
# Accepting a token costs ~3 us a row (JSON, one H200 host core): a chunk of fewer rows
# than this is not worth a thread's wake-up (grammar_threads.ChunkRunner).
ROWS_PER_ACCEPT_CHUNK = 32
# A fill chunk holds about this much of xgrammar's work (by the latest cost per row), at
# least MIN_FILL_CHUNK_ROWS rows: a row costs ~2-7 us in most JSON states and ~160 us in the
# costly ones (json_long's length-bounded strings, one H200 host core), a helper thread's
# wake-up some tens of us.
FILL_CHUNK_S = 100e-6
MIN_FILL_CHUNK_ROWS = 8
# At most this many fill, accept (and compile) threads; the default is every core this
# process may use.
MAX_FILL_THREADS = 32
# Whitespace in JSON output, at most about this many characters in a row (vLLM: unbounded).
# Enough for pretty-printing seven levels deep; without a cap a model can spend all of
# max_tokens on whitespace and leave the row unparseable. Enforced by the mask stage, not the
# grammar: once a row's output ends in this many whitespace characters, tokens made only of
# whitespace are not allowed (WhitespaceCap). xgrammar's own max_whitespace_cnt did the same
# inside the grammar, but its counting states have no precomputed token masks: filling a
# row in one took 8-12 ms instead of ~50 us (256 json_long rows on 2 cores: 38 ms a step
# vs 7 ms unbounded; accepting 7.4 vs 4.9 ms), and such rows made up most of a step's fill.
MAX_JSON_WHITESPACE = 32
# The character classes of xgrammar's JSON strings (length-bounded ones, all others), and the
# one JSON allows: no raw control characters, no UTF-16 surrogates (invalid in UTF-8, they
# decode to U+FFFD and break maxLength and patterns).
_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'
# xgrammar's C++ errors start with "[hh:mm:ss] /project/cpp/file.cc:123: "
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: xgrammar's grammar, and whether its rows' whitespace runs are
    capped by the mask stage (JSON with free whitespace, MAX_JSON_WHITESPACE)."""

    grammar: object
    caps_whitespace: bool = False


class WhitespaceCap:
    """Per token of the mask vocabulary: made only of JSON whitespace (space, tab, newline,
    carriage return), and how many whitespace bytes it ends with; and ``allowed``, the
    bitmask words of every token not made only of whitespace, to AND into a capped row."""

    def __init__(self, decoded_vocab: list[bytes], num_words: int):
        ws = b" \t\n\r"
        self.only = [bool(t) and not t.strip(ws) for t in decoded_vocab]
        self.trailing = [len(t) - len(t.rstrip(ws)) for t in decoded_vocab]
        allowed = np.ones(num_words * 32, dtype=bool)
        allowed[[i for i, o in enumerate(self.only) if o]] = False
        # bit j of word w is token 32w + j, as in xgrammar's bitmask
        self.allowed = np.packbits(allowed, bitorder="little").view("<i4")

    def run_after(self, run: int, token_id: int) -> int:
        """The whitespace run a row's output ends in after ``token_id``."""
        if token_id >= len(self.only):   # a stop id past the tokenizer
            return 0
        return run + self.trailing[token_id] if self.only[token_id] else self.trailing[token_id]


@dataclass
class GrammarMask:
    """One step's next-token bitmask. ``rows``: the batch rows it constrains, a device tensor,
    or None when it constrains every row of the batch; ``bitmask``: [constrained rows,
    ceil(mask_vocab / 32)] int32 on the device, bit j of word w allows token 32w + j;
    ``mask_vocab``: the tokens the bitmask covers (logits past it are never allowed in a
    constrained row); ``owner``: the StructuredOutputs whose ``apply_s`` counts the host time
    of ``apply``."""

    rows: torch.Tensor | None
    bitmask: torch.Tensor
    mask_vocab: int
    owner: StructuredOutputs | None = None

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of the constrained rows get -inf. logits: [rows, vocab] float,
        in place; the other rows are not touched. One Triton launch on a GPU
        (kernels/grammar_mask.py), its torch reference elsewhere."""
        t0 = time.perf_counter()
        if _mask_in_one_launch(logits):
            from hpcinfer.kernels.grammar_mask import apply_grammar_mask_
            apply_grammar_mask_(logits, self.rows, self.bitmask, self.mask_vocab)
        else:
            from hpcinfer.kernels.grammar_mask import apply_grammar_mask_reference
            apply_grammar_mask_reference(logits, self.rows, self.bitmask, self.mask_vocab)
        if self.owner is not None:
            self.owner.apply_s += time.perf_counter() - t0


def _mask_in_one_launch(logits: torch.Tensor) -> bool:
    # The Triton kernel on a GPU, the torch ops elsewhere (tests force the kernel under the
    # interpreter through this function).
    return logits.is_cuda


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
        # A step's fills and accepts: in chunks of rows, one xgrammar call each, the first on
        # the step loop's thread and the others on helpers meanwhile (grammar_threads.py).
        self._threads = ChunkRunner(max_threads, "hpcinfer-grammar")
        # one single-threaded batch filler per chunk (xgrammar's loop over a chunk's rows in
        # one call; its own thread pool was slower than one thread for cheap rows)
        self._fillers = [xgr.BatchGrammarMatcher(1) for _ in range(max_threads)]
        self._accept_call = batch_accept_call(xgr)
        self.fill_row_s = 5e-6   # xgrammar's latest fill time per row (an average)
        self._num_words = (info.vocab_size + 31) // 32
        self._decoded_vocab = info.decoded_vocab
        self._whitespace: WhitespaceCap | None = None   # built at the first capped row
        # Reused every step, grown when a batch has more constrained rows (_buffers).
        self._host: torch.Tensor | None = None      # [rows, words] int32, pinned on CUDA
        self._host_rows: torch.Tensor | None = None  # [rows] int64, pinned on CUDA
        self._dev: torch.Tensor | None = None
        self._dev_rows: torch.Tensor | None = None
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._compiled: OrderedDict[tuple, object] = OrderedDict()   # key -> grammar | error
        self._cached_bytes = 0
        self.num_masks = 0      # steps that filled a mask
        self.num_mask_rows = 0  # constrained rows of all the masks
        # Host time (bench/structured_outputs.py): fill() (all of it, and xgrammar's fills
        # in it), the accepts, GrammarMask.apply (on CUDA: launching it).
        self.mask_s = 0.0
        self.fill_s = 0.0
        self.accept_s = 0.0
        self.apply_s = 0.0
        self._stop_ids = frozenset(info.stop_token_ids)   # a matcher ends on accepting one
        # accept_tokens' results for the appender's accept: id(seq) -> (seq, token, accepted,
        # ended, len(seq.token_ids) once the token is appended)
        self._accepted: dict[int, tuple] = {}

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
            if kind in ("json", "json_object"):
                # json_object: an object, as OpenAI's (xgrammar's builtin JSON allows arrays)
                schema = ('{"type": "object"}' if kind == "json_object" else
                          so.json if isinstance(so.json, str) else json.dumps(so.json))
                free = not so.disable_any_whitespace
                return Constraint(self.compiler.compile_grammar(
                    self._json_schema_grammar(schema, any_whitespace=free)), caps_whitespace=free)
            if kind == "regex":
                return Constraint(self.compiler.compile_regex(so.regex))
            if kind == "choice":
                return Constraint(self.compiler.compile_grammar(choice_grammar(so.choice)))
            return Constraint(self.compiler.compile_grammar(so.grammar))
        except (RuntimeError, ValueError, TypeError) as exc:
            return f"structured_outputs.{kind} does not compile: {_clean(exc)}"

    def _json_schema_grammar(self, schema: str, any_whitespace: bool):
        """xgrammar's grammar of a JSON schema with its string characters fixed: strings with
        a minLength/maxLength take raw control characters, which JSON forbids (json.loads
        rejects them), and all strings take UTF-16 surrogates (invalid UTF-8)."""
        grammar = self._xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)
        text = str(grammar)
        for chars in _STRING_CHARS:
            text = text.replace(chars, _JSON_STRING_CHARS)
        return self._xgr.Grammar.from_ebnf(text)

    def start(self, seq: Sequence, constraint: Constraint) -> None:
        """Give ``seq`` its own matcher of ``constraint`` (and a whitespace run to count)."""
        seq.grammar = self._xgr.GrammarMatcher(constraint.grammar)
        if constraint.caps_whitespace:
            seq.grammar_whitespace = 0
            if self._whitespace is None:
                self._whitespace = WhitespaceCap(self._decoded_vocab, self._num_words)

    # --- the step ---
    def fill(self, seqs: list[Sequence]) -> GrammarMask | None:
        """The bitmask of this step's constrained rows (None if there are none here). Rows
        already finished (async scheduling: stopped by the token read just before) are left
        unconstrained: their token is dropped."""
        if not self.fills_masks:
            return None
        t0 = time.perf_counter()
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None
                and not seq.is_finished and not seq.grammar.is_terminated()]
        if not rows:
            return None
        num = len(rows)
        host, host_rows, dev, dev_rows = self._buffers(num)
        self.num_mask_rows += num
        t1 = time.perf_counter()
        self._fill_rows(host, [seqs[i].grammar for i in rows], list(range(num)))
        self._cap_whitespace(host, [seqs[i] for i in rows])
        t2 = time.perf_counter()
        # Pinned host buffers: the copies do not wait for the forward the GPU is running.
        bitmask = dev[:num]
        bitmask.copy_(host[:num], non_blocking=True)
        device_rows = None
        if num < len(seqs):   # some rows are free: the mask says which are not
            host_rows[:num] = torch.tensor(rows, dtype=torch.int64)
            device_rows = dev_rows[:num]
            device_rows.copy_(host_rows[:num], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        mask = GrammarMask(device_rows, bitmask, self.mask_vocab, self)
        t3 = time.perf_counter()
        self.fill_s += t2 - t1
        self.mask_s += t3 - t0
        self.num_masks += 1
        return mask

    def _cap_whitespace(self, host: torch.Tensor, rows: list[Sequence]) -> None:
        """Rows whose output ends in MAX_JSON_WHITESPACE or more whitespace characters may not
        take a token made only of whitespace, unless nothing else is allowed (never seen in
        JSON: a structural character or string content is always possible)."""
        capped = [k for k, seq in enumerate(rows) if seq.grammar_whitespace is not None
                  and seq.grammar_whitespace >= MAX_JSON_WHITESPACE]
        if not capped:
            return
        words = host.numpy()   # numpy: a few rows, no torch op overhead or threads
        index = np.array(capped)
        narrowed = words[index] & self._whitespace.allowed
        keep = narrowed.any(axis=1)
        words[index[keep]] = narrowed[keep]

    def _fill_rows(self, host: torch.Tensor, matchers: list, indices: list[int]) -> None:
        """xgrammar fills ``host[indices[k]]`` from ``matchers[k]``: in chunks of about
        FILL_CHUNK_S of work each at the latest cost per row, run at once."""
        per_chunk = max(MIN_FILL_CHUNK_ROWS, int(FILL_CHUNK_S / self.fill_row_s))
        n = self._threads.chunks(len(matchers), per_chunk)

        def fill_chunk(j: int) -> float:
            t0 = time.perf_counter()
            self._fillers[j].batch_fill_next_token_bitmask(deal(matchers, n, j), host,
                                                           deal(indices, n, j))
            return time.perf_counter() - t0

        first = self._threads.map(fill_chunk, n)[0]   # chunk 0: this thread's, timed alone
        per_row = first / len(range(0, len(matchers), n))
        self.fill_row_s = 0.8 * self.fill_row_s + 0.2 * max(per_row, 1e-7)

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

    def accept_tokens(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Advance the matchers of ``seqs`` by their new tokens in one call into xgrammar per
        chunk of rows (its C++ loop, not one Python call per row), before the engine appends
        the tokens; the appender's ``accept`` then reads each row's result."""
        rows, tokens, lengths = [], [], []
        for seq, token_id in zip(seqs, token_ids):
            if seq.grammar is None or seq.is_finished:
                continue
            rows.append(seq)
            tokens.append(token_id)
            lengths.append(len(seq.token_ids) + 1)   # once the token is appended
        if rows:
            self._accept_batch(rows, tokens, lengths)

    def _accept_batch(self, rows: list[Sequence], tokens: list[int],
                      lengths: list[int]) -> list[tuple[bool, bool]]:
        """Accept ``tokens[k]`` in ``rows[k]``'s matcher: (accepted, ended) per row, also kept
        for ``accept`` with the sequence's length once the token is appended (so a stale
        result is never read). A matcher ends (is_terminated) only by accepting a stop token;
        one that has ended refuses every token and stays as it is."""
        t0 = time.perf_counter()
        matchers = [s.grammar for s in rows]
        n = self._threads.chunks(len(rows), ROWS_PER_ACCEPT_CHUNK)
        parts = self._threads.map(
            lambda j: self._accept_call(deal(matchers, n, j), deal(tokens, n, j)), n)
        accepted = parts[0] if n == 1 else undeal(parts, len(rows))
        stops, found, cap = self._stop_ids, self._accepted, self._whitespace
        results = []
        for seq, token_id, ok, length in zip(rows, tokens, accepted, lengths):
            ended = token_id in stops if ok else seq.grammar.is_terminated()
            if ok and seq.grammar_whitespace is not None:
                seq.grammar_whitespace = cap.run_after(seq.grammar_whitespace, token_id)
            found[id(seq)] = (seq, token_id, ok, ended, length)
            results.append((ok, ended))
        if len(found) > 4 * len(rows):   # rows that finished before reading theirs
            live = {id(s) for s in rows}
            self._accepted = {k: v for k, v in found.items() if k in live}
        self.accept_s += time.perf_counter() - t0
        return results

    def accept(self, seq: Sequence, token_id: int) -> str | None:
        """Advance ``seq``'s matcher by its new token (just appended), or read the result of
        ``accept_tokens`` for it. Returns the finish reason it causes: "stop"
        when the grammar is complete, "abort" when the token breaks it (every token was
        disallowed by the grammar together with allowed_token_ids, logit_bias or
        bad_words)."""
        entry = self._accepted.pop(id(seq), None)
        if (entry is not None and entry[0] is seq and entry[1] == token_id
                and entry[4] == len(seq.token_ids)):
            accepted, ended = entry[2], entry[3]
        else:
            grammar = seq.grammar
            if grammar.is_terminated():
                return "stop"
            t0 = time.perf_counter()
            accepted = grammar.accept_token(token_id)
            ended = grammar.is_terminated()
            if accepted and seq.grammar_whitespace is not None:
                seq.grammar_whitespace = self._whitespace.run_after(seq.grammar_whitespace,
                                                                    token_id)
            self.accept_s += time.perf_counter() - t0
        if ended:   # complete (or complete before this token, which it then refused)
            return "stop"
        if accepted:
            return None
        log.warning("request %r: token %d is outside its structured-outputs constraint "
                    "(no allowed token was left after the other logits edits); the "
                    "sequence is aborted", seq.request_id, token_id)
        return "abort"


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
    return 0 if isinstance(entry, str) else entry.grammar.memory_size_bytes


def _clean(exc: Exception) -> str:
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line)
