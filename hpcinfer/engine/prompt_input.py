"""A request's prompt as token ids: vLLM's prompt forms, truncation and the checks that keep
a bad prompt from reaching the scheduler (one ValueError naming the request)."""
from __future__ import annotations

# TextPrompt / TokensPrompt keys; multi_modal_data is LLMEngine.process_prompt's (images)
PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})


def tokenize_prompt(tokenizer, prompt, request_id: str, *, max_model_len: int, vocab_size: int,
                    truncate_prompt_tokens: int | None = None) -> tuple[str | None, list[int]]:
    """(prompt text or None, prompt token ids). ``prompt``: a string, a list of token ids, or
    a dict with "prompt" and/or "prompt_token_ids". ``truncate_prompt_tokens``: keep only the
    last k tokens (-1: max_model_len), as vLLM."""
    text, token_ids = None, None
    if isinstance(prompt, dict):
        unknown = set(prompt) - PROMPT_KEYS
        if "multi_modal_data" in unknown:  # generate() and chat() take images: not here
            raise ValueError(f"request {request_id!r}: images (multi_modal_data) go through "
                             "generate() and chat() only; beam search and pooling tasks take "
                             "text for now (docs/vision.md)")
        if unknown:
            raise ValueError(f"request {request_id!r}: unknown prompt keys {sorted(unknown)}; "
                             "use 'prompt' and/or 'prompt_token_ids'")
        text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
    elif isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, (list, tuple)):
        token_ids = prompt
    else:
        raise ValueError(f"request {request_id!r}: a prompt must be a string, a list of "
                         f"token ids or a dict, got {type(prompt).__name__}")
    if token_ids is None:
        if not isinstance(text, str):
            raise ValueError(f"request {request_id!r}: prompt text must be a string")
        if tokenizer is None:
            raise ValueError(f"request {request_id!r}: a text prompt, but the engine was made "
                             "with skip_tokenizer_init=True (no tokenizer): pass "
                             "{'prompt_token_ids': [...]}")
        token_ids = tokenizer(text).input_ids if text else []
    # int() returns an int itself (no new object), so a list of ints costs one pass here.
    try:
        token_ids = [int(t) for t in token_ids]
    except (TypeError, ValueError):
        raise ValueError(f"request {request_id!r}: prompt_token_ids must be a flat list of "
                         "integer token ids") from None
    if truncate_prompt_tokens is not None:
        keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        token_ids = token_ids[-keep:]
    check_prompt(request_id, token_ids, max_model_len, vocab_size)
    return text, token_ids


def check_prompt(request_id: str, token_ids: list[int], max_model_len: int,
                 vocab_size: int) -> None:
    if not token_ids:
        raise ValueError(f"request {request_id!r}: the prompt is empty (0 tokens); "
                         "give at least one token")
    if len(token_ids) > max_model_len:
        raise ValueError(f"request {request_id!r}: the prompt has {len(token_ids)} tokens, "
                         f"more than max_model_len={max_model_len}; shorten it or "
                         "raise max_model_len")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        bad = next(t for t in token_ids if t < 0 or t >= vocab_size)
        raise ValueError(f"request {request_id!r}: token id {bad} is outside the "
                         f"vocabulary [0, {vocab_size})")
