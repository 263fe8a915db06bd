"""Incremental detokenization and stop-string matching for one sequence.

Decoding token by token breaks multi-byte characters and word-initial spaces. With a fast
(Rust) tokenizer we use ``tokenizers.decoders.DecodeStream``, primed with the last prompt
tokens so the first output token gets the right leading space (~1 us per token). Otherwise
each step decodes a short window twice: the already-emitted part ``ids[prefix:read]`` and the
whole window ``ids[prefix:]``; the difference is the new text, and a window ending in U+FFFD
is an incomplete UTF-8 sequence that waits for the next token.
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
        self.output_text = ""
        self._rust = getattr(tokenizer, "_tokenizer", None) if DecodeStream is not None else None
        self._stream = None
        if self._rust is not None:
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            # Prime with the prompt's tail. If that tail ends inside a UTF-8 character the
            # stream would later emit prompt bytes as output: use the window method then.
            if not self.ids or stream.step(self._rust, self.ids) is not None:
                self._stream = stream

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:  # the Rust decoder directly: ~3x faster than the wrapper
            return self._rust.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe empty) and extend output_text."""
        self.ids.append(token_id)
        if self._stream is not None:
            new_text = self._stream.step(self._rust, token_id) or ""
            if new_text:
                self.read_offset = len(self.ids)
                self.output_text += new_text
            return new_text
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        new_text = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.output_text += new_text
        return new_text

    def flush(self) -> str:
        """At finish: emit whatever an incomplete character held back (as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])[len(prefix_text):]
        self.read_offset = len(self.ids)
        self.output_text += new_text
        return new_text


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
