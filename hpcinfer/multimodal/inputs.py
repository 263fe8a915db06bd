"""A request's images after processing: where each image's placeholder tokens are, its
preprocessed tensors, its hash, and its encoder output while the prefill needs it.

Ownership: the processor builds these once per request (shared by the request's n
sequences); the model runner alone writes ``embeddings`` (engine/model_runner.py through
multimodal/step.py); the block manager reads ``block_extra_keys`` for prefix-cache hashes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageItem:
    offset: int                # first placeholder token's index in the prompt
    length: int                # placeholder tokens (= rows of its embedding)
    hash: int                  # media.image_hash of the image as given
    inputs: dict[str, Any]     # this image's processor tensors, e.g. pixel_values [1, C, H, W]

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultiModalInputs:
    items: list[ImageItem]
    # item index -> encoder output [length, hidden], kept from the step the prefill reaches
    # the image until the step that computes its last placeholder token.
    embeddings: dict[int, Any] = field(default_factory=dict)
    # M-RoPE models (Qwen2-VL): the prompt's positions [3, prompt_len] (numpy int64) and the
    # shift of every later token's position (rope_delta <= 0).
    rope_positions: Any = None
    rope_delta: int = 0
    # Image tokens that attend to their whole span (Gemma 3): the scheduler never ends a
    # chunk inside a span, since its first tokens need the keys of its last.
    whole_spans: bool = False
    # One past the last placeholder token (0 without images): steps from here on (every
    # decode step) hold none of this prompt's image rows.
    images_end: int = field(init=False, default=0)

    def __post_init__(self):
        self.images_end = max((item.end for item in self.items), default=0)

    def items_to_encode(self, start: int, end: int) -> list[ImageItem]:
        """The images whose placeholders tokens [start, end) reach and whose encoder output is
        not held (the scheduler charges them to the step's encoder budget)."""
        return [item for k, item in enumerate(self.items)
                if item.offset < end and start < item.end and k not in self.embeddings]

    def block_extra_keys(self, start: int, end: int) -> tuple:
        """What, besides token ids, the KV of tokens [start, end) depends on: (hash, offset of
        the block's first covered token within the image) of each overlapping image."""
        return tuple((item.hash, max(start - item.offset, 0)) for item in self.items
                     if item.offset < end and start < item.end)


@dataclass
class ProcessedPrompt:
    """A prompt the engine has already turned into token ids (and images): ``add_request``
    and ``LLM`` pass it on instead of processing again."""

    text: str | None
    token_ids: list[int]
    mm_inputs: MultiModalInputs | None = None
    # (max_model_len, vocab_size) its ids were checked against (LLMEngine.process_prompt), so
    # that adding it does not walk them again; None: not checked yet.
    checked_for: tuple[int, int] | None = None
