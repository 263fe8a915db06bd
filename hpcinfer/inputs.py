"""vLLM's prompt types (``vllm.inputs``): plain dicts, as LLM.generate takes them."""
from __future__ import annotations

from typing import TypedDict, Union


class _TextPromptRequired(TypedDict):
    prompt: str


class TextPrompt(_TextPromptRequired, total=False):
    """A prompt as text, tokenized by the engine."""

    cache_salt: str


class _TokensPromptRequired(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokensPromptRequired, total=False):
    """A prompt as token ids (``prompt`` is the optional text, returned as given)."""

    prompt: str
    cache_salt: str


SingletonPrompt = Union[str, TextPrompt, TokensPrompt]
PromptType = SingletonPrompt

__all__ = ["PromptType", "SingletonPrompt", "TextPrompt", "TokensPrompt"]
