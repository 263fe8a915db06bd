"""OpenAI batch format: request lines in, response lines out.

Input line: ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.
Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
with a ``chat.completion`` or ``text_completion`` body. Ids are derived from custom_id (not
random) so a resumed job writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
SCORE_URL = "/v1/score"
URLS_BY_TASK = {
    "generate": (CHAT_URL, COMPLETIONS_URL),
    "chat": (CHAT_URL, COMPLETIONS_URL),
    "embed": (EMBEDDINGS_URL,),
    "score": (SCORE_URL,),
    "classify": (),
    "reward": (),
}
KNOWN_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, SCORE_URL)

# Body keys copied to sampling overrides under the same name (OpenAI + vLLM extras).
_SAME_NAME = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty",
              "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens",
              "ignore_eos", "stop_token_ids", "skip_special_tokens",
              "include_stop_str_in_output")
# Accepted and not acted on: they do not change the generated text.
_IGNORED = ("model", "user", "metadata", "stream_options", "service_tier", "store")
_CONTENT_KEYS = {CHAT_URL: "messages", COMPLETIONS_URL: "prompt", EMBEDDINGS_URL: "input",
                 SCORE_URL: ("text_1", "text_2")}


def parse_request(obj: dict, task: str) -> tuple[dict, tuple[str, str] | None]:
    """Request line -> ({prompt|messages|texts, sampling}, None) or ({}, (kind, reason))."""
    if obj.get("method", "POST") != "POST":
        return {}, ("bad_method", f"method must be POST, got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in KNOWN_URLS:
        return {}, ("unknown_url", f"url {url!r} is not one of {', '.join(KNOWN_URLS)}")
    if url not in URLS_BY_TASK[task]:
        served = ", ".join(URLS_BY_TASK[task]) or "no OpenAI url"
        return {}, ("url_task_mismatch", f"url {url} is not served by task {task} "
                    f"(it serves {served}): split the input or change task")
    body = obj.get("body")
    if not isinstance(body, dict):
        return {}, ("bad_body", f"body must be an object, got {type(body).__name__}")
    if body.get("stream"):
        return {}, ("bad_body", "stream: true is not supported in batch requests")
    content, problem = _content(url, body)
    if problem:
        return {}, problem
    sampling, problem = _sampling(url, body)
    if problem:
        return {}, problem
    return {**content, "sampling": sampling}, None


def _content(url: str, body: dict) -> tuple[dict, tuple[str, str] | None]:
    if url == CHAT_URL:
        if "messages" not in body:
            return {}, ("missing_prompt", "body has no messages")
        return {"messages": body["messages"]}, None
    keys = _CONTENT_KEYS[url]
    keys = keys if isinstance(keys, tuple) else (keys,)
    values = []
    for key in keys:
        value = body.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]         # a one-element list is the same request
        if value is None:
            return {}, ("missing_prompt", f"body has no {key}")
        if not isinstance(value, str):
            return {}, ("bad_prompt_type", f"body.{key} must be a string (one request per "
                        f"line), got {type(value).__name__}")
        if not value:
            return {}, ("empty_prompt", f"body.{key} is an empty string")
        values.append(value)
    if url == COMPLETIONS_URL:
        return {"prompt": values[0]}, None
    return {"texts": tuple(values)}, None


def _sampling(url: str, body: dict) -> tuple[dict, tuple[str, str] | None]:
    sampling: dict[str, Any] = {}
    content_keys = {"messages", "prompt", "input", "text_1", "text_2", "stream"}
    for key, value in body.items():
        if key in _SAME_NAME:
            sampling[key] = value
        elif key in ("max_tokens", "max_completion_tokens"):
            sampling["max_tokens"] = value
        elif key == "logprobs" and url == CHAT_URL:
            if value is True:
                sampling["logprobs"] = body.get("top_logprobs") or 0
        elif key == "logprobs" or key == "top_logprobs":
            if url != CHAT_URL:
                sampling["logprobs"] = value
        elif key == "echo" and not value:
            continue
        elif key not in _IGNORED and key not in content_keys:
            return {}, ("unsupported_body_key", f"body.{key} is not supported by hpcinfer's "
                        "batch runner: remove it from the request")
    return sampling, None


def request_id(custom_id: Any) -> str:
    """Deterministic id derived from custom_id (stable across requeues)."""
    return hashlib.sha256(str(custom_id).encode()).hexdigest()[:24]


def response_line(row, out, *, created_s: int, model: str) -> dict:
    """The OpenAI batch output line for one answered row (row: InputRow, out: OutputRecord)."""
    rid = request_id(row.key)
    usage = {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
             "total_tokens": out.num_prompt_tokens + out.num_output_tokens}
    logprobs = None if out.logprobs is None else {"content": [
        {"token_id": pos[0][0], "logprob": pos[0][1],
         "top_logprobs": [{"token_id": t, "logprob": lp} for t, lp in pos[1:]]}
        for pos in out.logprobs]}
    model = (row.body or {}).get("model") or model
    if row.url == CHAT_URL:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "logprobs": logprobs, "finish_reason": out.finish_reason}
        body = {"id": f"chatcmpl-{rid}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": out.text, "logprobs": logprobs,
                  "finish_reason": out.finish_reason}
        body = {"id": f"cmpl-{rid}", "object": "text_completion"}
    body.update({"created": created_s, "model": model, "choices": [choice], "usage": usage})
    return {"id": f"batch_req_{rid}", "custom_id": row.key,
            "response": {"status_code": 200, "request_id": f"req_{rid}", "body": body},
            "error": None}
