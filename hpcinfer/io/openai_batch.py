"""OpenAI batch format: request lines in, response lines out.

Input line: ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.
Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
with a ``chat.completion`` or ``text_completion`` body. Ids are derived from custom_id (not
random) so a resumed job writes the same bytes as an uninterrupted one.

Pooling tasks take vLLM run-batch's pooling requests: ``/v1/embeddings`` (task embed; body
``input``: str | [str] | [int] | [[int]], ``dimensions``, ``encoding_format``, ``normalize``,
``truncate_prompt_tokens``) and ``/v1/score`` or ``/score`` (task score; ``text_1``/``text_2``
or vLLM's newer ``queries``/``documents``, ``queries``/``items``, ``data_1``/``data_2``: str or
[str], one text_1 against many, or pairwise). One request line is one row, however many inputs
it has; the response body is vLLM's EmbeddingResponse / ScoreResponse.
"""
from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
SCORE_URL = "/v1/score"
SCORE_URL_SHORT = "/score"        # vLLM's run-batch takes any url ending in /score
URLS_BY_TASK = {
    "generate": (CHAT_URL, COMPLETIONS_URL),
    "chat": (CHAT_URL, COMPLETIONS_URL),
    "embed": (EMBEDDINGS_URL,),
    "score": (SCORE_URL, SCORE_URL_SHORT),
    "classify": (),
    "reward": (),
}
KNOWN_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, SCORE_URL, SCORE_URL_SHORT)
POOLING_URLS = (EMBEDDINGS_URL, SCORE_URL, SCORE_URL_SHORT)

# Body keys copied to sampling overrides under the same name (OpenAI + vLLM extras).
_SAME_NAME = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty",
              "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens",
              "ignore_eos", "stop_token_ids", "skip_special_tokens",
              "include_stop_str_in_output")
# Accepted and not acted on: they do not change the generated text.
_IGNORED = ("model", "user", "metadata", "stream_options", "service_tier", "store")
_CONTENT_KEYS = {CHAT_URL: "messages", COMPLETIONS_URL: "prompt"}


def parse_request(obj: dict, task: str) -> tuple[dict, tuple[str, str] | None]:
    """Request line -> ({prompt|messages|texts, sampling[, mm_processor_kwargs]}, None) or
    ({}, (kind, reason)). vLLM's body.mm_processor_kwargs comes back as given (the row
    checks it: rows.mm_processor_kwargs_of)."""
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
    if url in POOLING_URLS:
        # texts: the inputs (score: text_1, text_2 of each pair, flat); the pooling loop
        # reads the options from row.body with pooling_request again (same checks).
        request, problem = pooling_request(url, body)
        if problem:
            return {}, problem
        texts = request.inputs if url == EMBEDDINGS_URL else \
            tuple(text for pair in request.inputs for text in pair)
        return {"texts": texts, "sampling": {}}, None
    content, problem = _content(url, body)
    if problem:
        return {}, problem
    sampling, problem = _sampling(url, body)
    if problem:
        return {}, problem
    if body.get("mm_processor_kwargs") is not None:
        content["mm_processor_kwargs"] = body["mm_processor_kwargs"]
    return {**content, "sampling": sampling}, None


def _content(url: str, body: dict) -> tuple[dict, tuple[str, str] | None]:
    if url == CHAT_URL:
        if "messages" not in body:
            return {}, ("missing_prompt", "body has no messages")
        return {"messages": body["messages"]}, None
    key = _CONTENT_KEYS[url]
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
    return {"prompt": value}, None


def _sampling(url: str, body: dict) -> tuple[dict, tuple[str, str] | None]:
    sampling: dict[str, Any] = {}
    content_keys = {"messages", "prompt", "input", "text_1", "text_2", "stream",
                    "mm_processor_kwargs"}
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
        elif key in _CONSTRAINT_KEYS:
            problem = _constraint(sampling, key, value)
            if problem:
                return {}, problem
        elif key == "prompt_logprobs":
            if value is None:       # not asked
                continue
            return {}, ("unsupported_body_key", "body.prompt_logprobs is set for the whole "
                        "job in hpcinfer: remove it from the request and write "
                        "`prompt_logprobs: k` under sampling in the job file (the responses "
                        "then carry vLLM's prompt_logprobs)")
        elif key not in _IGNORED and key not in content_keys:
            return {}, ("unsupported_body_key", f"body.{key} is not supported by hpcinfer's "
                        "batch runner: remove it from the request")
    return sampling, None


# Where a request body may carry a structured-outputs constraint: OpenAI's response_format,
# vLLM's structured_outputs extra, and vLLM's older guided_* extras.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_CONSTRAINT_KEYS = ("response_format", "structured_outputs", *_GUIDED)


def _constraint(sampling: dict, key: str, value: Any) -> tuple[str, str] | None:
    """Put the body's constraint into ``sampling``; (kind, reason) when it is malformed."""
    if value is None:
        return None
    if key == "response_format":
        constraint, problem = response_format_constraint(value)
    elif key == "structured_outputs":
        constraint, problem = value, None
    else:
        constraint, problem = {_GUIDED[key]: value}, None
    if problem:
        return "invalid_response_format", problem
    if constraint is None:
        return None
    if "structured_outputs" in sampling:
        return ("invalid_sampling", f"body.{key}: the request already has a structured-outputs "
                "constraint (give one of response_format, structured_outputs, guided_*)")
    sampling["structured_outputs"] = constraint
    return None


def response_format_constraint(value: Any) -> tuple[dict | None, str | None]:
    """OpenAI's response_format -> (constraint or None for plain text, problem)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return {"json_object": True}, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            return None, ('body.response_format.json_schema needs a "schema" (and a "name"): '
                          '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
        return {"json": spec["schema"]}, None   # strict: outputs always follow the schema
    return None, ("body.response_format.type must be text, json_object or json_schema, got "
                  f"{kind!r}")


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
    prompt_logprobs = vllm_prompt_logprobs(out.prompt_logprobs)
    if row.url == CHAT_URL:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "logprobs": logprobs, "finish_reason": out.finish_reason}
        body = {"id": f"chatcmpl-{rid}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": out.text, "logprobs": logprobs,
                  "finish_reason": out.finish_reason}
        if prompt_logprobs is not None:     # vLLM: on each completion choice
            choice["prompt_logprobs"] = prompt_logprobs
        body = {"id": f"cmpl-{rid}", "object": "text_completion"}
    body.update({"created": created_s, "model": model, "choices": [choice], "usage": usage})
    if prompt_logprobs is not None and row.url == CHAT_URL:   # vLLM: on the chat response
        body["prompt_logprobs"] = prompt_logprobs
    return _batch_line(row, rid, body)


# vLLM's server writes -inf logprobs as this (clamp_prompt_logprobs): JSON has no -inf.
MIN_JSON_LOGPROB = -9999.0


def vllm_prompt_logprobs(positions: list | None) -> list | None:
    """OutputRecord.prompt_logprobs as vLLM's OpenAI server returns them: per prompt token
    None (the first) or {token id: {"logprob", "rank", "decoded_token"}}, the prompt token
    first (JSON object keys are strings)."""
    if positions is None:
        return None
    return [None if pos is None else
            {str(t): {"logprob": max(lp, MIN_JSON_LOGPROB), "rank": rank,
                      "decoded_token": text} for t, lp, rank, text in pos}
            for pos in positions]


def _batch_line(row, rid: str, body: dict) -> dict:
    return {"id": f"batch_req_{rid}", "custom_id": row.key,
            "response": {"status_code": 200, "request_id": f"req_{rid}", "body": body},
            "error": None}


# --- pooling requests (/v1/embeddings, /v1/score) ---

@dataclass(frozen=True)
class PoolingRequest:
    """A checked /v1/embeddings or /v1/score body: what the pooling loop runs for one row.
    Options left None take the job's ``pooling:`` block (then the checkpoint's defaults)."""
    inputs: tuple                 # embeddings: str | tuple[int, ...]; score: (text_1, text_2)
    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None
    truncate_prompt_tokens: int | None = None


# Accepted and not acted on (vLLM's names): they do not change the result of a batch.
_POOLING_IGNORED = ("model", "user", "priority", "request_id", "mm_processor_kwargs")
_EMBEDDING_KEYS = ("input", "encoding_format", "dimensions", "normalize",
                   "truncate_prompt_tokens", "add_special_tokens")
# vLLM's ScoreRequest spellings, in the order it tries them
_SCORE_PAIRS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                ("data_1", "data_2"))
_SCORE_KEYS = ("text_1", "text_2", "queries", "documents", "items", "data_1", "data_2",
               "truncate_prompt_tokens", "use_activation", "activation", "softmax")

def pooling_request(url: str, body: dict) -> tuple[PoolingRequest | None, tuple[str, str] | None]:
    """A pooling request body -> (PoolingRequest, None) or (None, (kind, reason))."""
    known = _EMBEDDING_KEYS if url == EMBEDDINGS_URL else _SCORE_KEYS
    for key in body:
        if key not in known and key not in _POOLING_IGNORED:
            return None, ("unsupported_body_key", f"body.{key} is not supported for {url} by "
                          f"hpcinfer's batch runner (it takes {', '.join(known)}): remove it")
    options, problem = _pooling_options(url, body)
    if problem:
        return None, problem
    if url == EMBEDDINGS_URL:
        inputs, problem = _embedding_inputs(body.get("input"))
    else:
        inputs, problem = _score_pairs(body)
    return (None, problem) if problem else (PoolingRequest(inputs, **options), None)


def _pooling_options(url: str, body: dict) -> tuple[dict, tuple[str, str] | None]:
    options: dict[str, Any] = {}
    truncate = body.get("truncate_prompt_tokens")
    if truncate is not None:
        if not _is_int(truncate) or truncate == 0 or truncate < -1:
            return {}, ("invalid_pooling", f"body.truncate_prompt_tokens={truncate!r}: use -1 "
                        "(cut to max_model_len) or a positive number of tokens")
        options["truncate_prompt_tokens"] = truncate
    if url == EMBEDDINGS_URL:
        if body.get("encoding_format", "float") not in ("float", "base64"):
            return {}, ("invalid_pooling", f"body.encoding_format="
                        f"{body['encoding_format']!r}: use float or base64")
        if body.get("add_special_tokens", True) is not True:
            return {}, ("invalid_pooling", "body.add_special_tokens: false is not supported "
                        "(special tokens are always added): remove it")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
            return {}, ("invalid_pooling", f"body.dimensions={dimensions!r}: use a positive "
                        "integer (at most the model's embedding size) or leave it out")
        options["dimensions"] = dimensions
        options["normalize"] = body.get("normalize")
    else:
        # vLLM's get_use_activation: use_activation, else the older activation / softmax
        options["activation"] = next((body[k] for k in ("use_activation", "activation",
                                                        "softmax") if body.get(k) is not None),
                                     None)
    for key in ("normalize", "activation"):
        if options.get(key) is not None and not isinstance(options[key], bool):
            return {}, ("invalid_pooling", f"body.{key} must be true or false")
    return options, None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _embedding_inputs(value: Any) -> tuple[tuple, tuple[str, str] | None]:
    """input: str | [str] | [int] | [[int]] -> a tuple of str / token-id tuples."""
    if value is None:
        return (), ("missing_prompt", "body has no input")
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_int(t) for t in value):
        value = [value]                   # one prompt given as token ids
    if not isinstance(value, list) or not value:
        return (), ("bad_prompt_type", "body.input must be a string, a non-empty list of "
                    "strings, a list of token ids or a list of such lists")
    inputs: list = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            inputs.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) and t >= 0 for t in item):
            inputs.append(tuple(item))
        elif item == "" or item == []:
            return (), ("empty_prompt", f"body.input[{i}] is empty")
        else:
            return (), ("bad_prompt_type", f"body.input[{i}] must be a non-empty string or a "
                        f"list of token ids (integers >= 0), got {type(item).__name__}")
    return tuple(inputs), None


def _score_pairs(body: dict) -> tuple[tuple, tuple[str, str] | None]:
    """vLLM's ScoreRequest: one text_1 against many text_2, or pairwise."""
    names = next((pair for pair in _SCORE_PAIRS if pair[0] in body and pair[1] in body), None)
    if names is None:
        return (), ("missing_prompt", "body needs text_1 and text_2 (or queries and "
                    "documents)")
    sides = []
    for name in names:
        value = body[name]
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value or \
                not all(isinstance(t, str) for t in value):
            return (), ("bad_prompt_type", f"body.{name} must be a string or a non-empty list "
                        "of strings")
        if not all(value):
            return (), ("empty_prompt", f"body.{name} has an empty string")
        sides.append(value)
    first, second = sides
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        return (), ("score_length_mismatch", f"body.{names[0]} has {len(first)} texts and "
                    f"body.{names[1]} {len(second)}: give one {names[0]} for many "
                    f"{names[1]}, or equally many of each")
    return tuple(zip(first, second)), None


def pooling_response_line(row, out, *, created_s: int, model: str) -> dict:
    """The OpenAI batch output line of an answered /v1/embeddings or /v1/score row, its body
    as vLLM's EmbeddingResponse / ScoreResponse. ``out.value``: one result per input."""
    rid = request_id(row.key)
    body = row.body or {}
    usage = {"prompt_tokens": out.num_prompt_tokens, "total_tokens": out.num_prompt_tokens,
             "completion_tokens": 0, "prompt_tokens_details": None}
    if row.url == EMBEDDINGS_URL:
        as_base64 = body.get("encoding_format") == "base64"
        data = [{"index": i, "object": "embedding",
                 "embedding": _base64_floats(v) if as_base64 else v}
                for i, v in enumerate(out.value)]
        head = {"id": f"embd-{rid}", "object": "list"}
    else:
        data = [{"index": i, "object": "score", "score": v} for i, v in enumerate(out.value)]
        head = {"id": f"score-{rid}", "object": "list"}
    return _batch_line(row, rid, {**head, "created": created_s,
                                  "model": body.get("model") or model, "data": data,
                                  "usage": usage})


def _base64_floats(values: list[float]) -> str:
    """vLLM's encoding_format base64: the float32 little-endian bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
