"""Incremental detokenization and stop-string matching for one sequence.

Decoding token by token breaks multi-byte characters and word-initial spaces. With a fast
(Rust) tokenizer we use ``tokenizers.decoders.DecodeStream``, primed with the last prompt
tokens so the first output token gets the right leading space (~1 us per token). Otherwise
each step decodes a short window twice: the already-emitted part ``ids[prefix:read]`` and the
whole window ``ids[prefix:]``; the difference is the new text, and a window ending in U+FFFD
is an incomplete UTF-8 sequence that waits for the next token.

Most batch rows need no text until they finish (no stop strings, nobody streaming): the
appender ``defer``s their tokens, and the text is made when it is read. At the end, a row
whose text was never read is decoded in one call into the Rust decoder (the prompt's tail and
every output token, less the tail's own text), instead of one DecodeStream step per token,
which cost about a fifth of the step loop's host time at 256 rows (bench/host_step.py: 1.55
ms a decode step before, 1.26 after, 1.20 without text). A row read before it ends
(streaming) catches up token by token.
"""
from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._text = ""
        self._pending: list[int] = []   # deferred tokens (defer), not decoded yet
        self._rust = getattr(tokenizer, "_tokenizer", None) if DecodeStream is not None else None
        self._stream = None
        self._prime_text: str | None = None   # the tail's text while the stream is untouched
        if self._rust is not None:
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            # Prime with the prompt's tail. If that tail ends inside a UTF-8 character the
            # stream would later emit prompt bytes as output: use the window method then.
            primed = stream.step(self._rust, self.ids) if self.ids else ""
            if primed is not None:
                self._stream = stream
                self._prime_text = primed

    @property
    def output_text(self) -> str:
        if self._pending:
            self._catch_up()
        return self._text

    @output_text.setter
    def output_text(self, text: str) -> None:   # a stop string cuts the text
        self._catch_up()
        self._text = text

    def defer(self, token_id: int) -> None:
        """Add one token whose text nobody needs yet: decoded when the text is read."""
        self._pending.append(token_id)

    def _catch_up(self) -> None:
        pending, self._pending = self._pending, []
        for token_id in pending:
            self.append(token_id)

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:  # the Rust decoder directly: ~3x faster than the wrapper
            return self._rust.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe empty) and extend output_text."""
        if self._pending:
            self._catch_up()
        self.ids.append(token_id)
        if self._stream is not None:
            self._prime_text = None   # the stream has moved on
            new_text = self._stream.step(self._rust, token_id) or ""
            if new_text:
                self.read_offset = len(self.ids)
                self._text += new_text
            return new_text
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        new_text = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._text += new_text
        return new_text

    def flush(self) -> str:
        """At finish: emit whatever an incomplete character held back (as U+FFFD)."""
        before = len(self._text)
        if self._pending and not self._decode_at_once():
            self._catch_up()
        if self.read_offset != len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self._text += self._decode(self.ids[self.prefix_offset:])[len(prefix_text):]
            self.read_offset = len(self.ids)
        return self._text[before:]

    def _decode_at_once(self) -> bool:
        """Decode every deferred token in one call, if nothing has been decoded since the
        prompt's tail primed the stream: the text is that of the tail and the tokens, less the
        tail's (what the stream's steps and flush would have made, for decoders that join
        token texts; any other is caught up token by token). False if it could not."""
        head = self._prime_text
        if head is None:
            return False
        ids = self.ids + self._pending
        full = self._decode(ids)
        if not full.startswith(head):
            return False
        self._text += full[len(head):]
        self._pending = []
        self.ids = ids
        self.read_offset = len(ids)
        self._prime_text = None
        self._stream = None   # it never saw these tokens: the window method from here on
        self.prefix_offset = max(0, len(ids) - _PROMPT_CONTEXT_TOKENS)
        return True


def find_stop_string(text: str, num_new_chars: int, stop: tuple[str, ...],
                     include_stop_str: bool) -> tuple[str, int] | None:
    """The first stop string (in the order given, as vLLM) that ends within the new chars.

    Returns (stop string, length to truncate the text to) or None. Only the tail that the
    new characters could have completed is searched, so a stop split across tokens is found
    exactly once.
    """
    for stop_str in stop:
        start = max(0, len(text) - num_new_chars - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1:
            return stop_str, index + len(stop_str) if include_stop_str else index
    return None
