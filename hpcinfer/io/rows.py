"""Row types of the data path and the validation that turns an input record into one.

A record read from a shard becomes either an ``InputRow`` (ready for the engine) or a
``BadRow`` (kind, reason, excerpt) that goes to the shard's errors.jsonl; a bad row never
stops the shard. ``OutputRecord`` is what the worker hands back per finished row. None of
these import the engine: the worker maps them to SamplingParams / requests.

Row identity: ``index`` is the row's position in its input file (JSONL: physical line,
0-based; Parquet: row number). The resume ledger keys on it because every row has one, even
a line that is not JSON. ``key`` is the user-level identity: the id field's value (or
``custom_id`` for OpenAI batch), ``"<file>#<index>"`` when the input has no id field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from hpcinfer.io import openai_batch
from hpcinfer.io.sampling import check_sampling_overrides

EXCERPT_CHARS = 200
ROLES = ("system", "developer", "user", "assistant", "tool")
TASKS = ("generate", "chat", "embed", "classify", "score", "reward")
TEMPLATE_TASKS = ("generate", "embed", "classify", "reward")
DEFAULT_MAX_IMAGES = 999   # vLLM's default limit_mm_per_prompt per modality


@dataclass(frozen=True)
class InputSpec:
    """What the reader needs from the job config's ``input:`` block (and ``task``)."""
    task: str = "generate"
    format: str = "auto"                 # auto | jsonl | parquet | text | openai-batch
    id_field: str | None = "id"
    prompt_field: str | None = "prompt"
    messages_field: str | None = None
    text_field: str | None = None
    text_1_field: str | None = None
    text_2_field: str | None = None
    sampling_field: str | None = None
    adapter_field: str | None = None     # LoRA: the column naming each row's adapter
    image_field: str | None = None       # images of a generate row (docs/vision.md)
    media_dirs: tuple[str, ...] = ()     # the only directories local image files come from
    max_images: int = DEFAULT_MAX_IMAGES  # input.limit_mm_per_prompt["image"]
    # the column of per-row processor arguments (over input.mm_processor_kwargs)
    mm_processor_kwargs_field: str | None = None
    passthrough: tuple[str, ...] = ()
    prompt_template: str | None = None   # Jinja2 over the row's columns (io/template.py)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.prompt_template is not None and self.task not in TEMPLATE_TASKS:
            raise ValueError(f"input.prompt_template makes one text per row; task {self.task} "
                             f"does not read one (use it with {', '.join(TEMPLATE_TASKS)})")
        if self.format != "openai-batch" and self.content_field is None \
                and self.prompt_template is None:
            raise ValueError(f"task {self.task} needs input.{self._content_key()} to name the "
                             "input column holding the row's content")

    @classmethod
    def from_config(cls, input_cfg: Any, task: str) -> "InputSpec":
        """From the config's input block (pydantic model or plain mapping)."""
        get = input_cfg.get if isinstance(input_cfg, Mapping) else \
            (lambda k, d=None: getattr(input_cfg, k, d))
        kwargs = {k: get(k, getattr(cls, k)) for k in (
            "format", "id_field", "prompt_field", "messages_field", "text_field",
            "text_1_field", "text_2_field", "sampling_field", "adapter_field",
            "prompt_template", "image_field", "mm_processor_kwargs_field")}
        limits = get("limit_mm_per_prompt", None) or {}
        return cls(task=task, passthrough=tuple(get("passthrough", ()) or ()),
                   media_dirs=tuple(get("media_dirs", ()) or ()),
                   max_images=int(limits.get("image", DEFAULT_MAX_IMAGES)), **kwargs)

    @cached_property
    def is_openai(self) -> bool:
        return self.format == "openai-batch"

    @cached_property
    def id_name(self) -> str | None:
        """Name of the id column in outputs (custom_id for OpenAI batch input)."""
        return "custom_id" if self.is_openai else self.id_field

    def _content_key(self) -> str:
        if self.task == "chat":
            return "messages_field"
        if self.task == "score":
            return "text_1_field"
        if self.task in ("embed", "classify", "reward"):
            return "text_field"
        return "prompt_field"

    @cached_property
    def content_field(self) -> str | None:
        if self.task in ("embed", "classify", "reward"):
            return self.text_field or self.prompt_field
        if self.task == "score":
            return self.text_1_field if self.text_2_field else None
        return getattr(self, self._content_key())

    @cached_property
    def text_column(self) -> str:
        """The column a .txt line becomes (the prompt, or the text to embed/classify)."""
        return self.content_field or "prompt"

    def columns(self) -> list[str]:
        """Input columns the reader needs (Parquet projection), in a stable order."""
        if self.prompt_template is not None:
            from hpcinfer.io.template import template_columns
            content = list(template_columns(self.prompt_template))
        else:
            content = [self.content_field]
        names = [self.id_field, *content, self.image_field, self.sampling_field,
                 self.adapter_field, self.mm_processor_kwargs_field, *self.passthrough]
        if self.task == "score":
            names.insert(2, self.text_2_field)
        return list(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True, slots=True)
class InputRow:
    """One valid input row. Exactly one of prompt / messages / texts is set."""
    index: int                           # row position in its input file
    file: str
    key: str | int                       # id value, custom_id, or "<file>#<index>"
    id: str | int | None                 # the id field's value (None without an id field)
    prompt: str | None = None
    messages: list | None = None         # [{"role": ..., "content": ...}, ...]
    texts: tuple[str, ...] | None = None  # embed/classify/reward: (text,); score: (t1, t2)
    sampling: dict = field(default_factory=dict)      # validated per-row overrides
    passthrough: dict = field(default_factory=dict)   # column -> value copied to outputs
    adapter: str | None = None           # LoRA adapter name (a key of lora.adapters)
    url: str | None = None               # OpenAI batch only
    body: dict | None = None             # OpenAI batch only (the request body, as given)
    # generate rows: the image column's entries (bytes or path strings) as read; the
    # worker's reader thread replaces them with decoded PIL images (io/images.py)
    images: tuple = ()
    # the row's processor arguments (its input.mm_processor_kwargs_field column, or an
    # OpenAI-batch body.mm_processor_kwargs), null values dropped; the worker merges them
    # over the job's input.mm_processor_kwargs key by key. {}: the job's as they are
    mm_processor_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row set aside with a reason; it is "done" once its error record is committed."""
    index: int
    file: str
    id: str | int | None
    kind: str                            # short stable code, e.g. invalid_json
    reason: str                          # what is wrong and what to do
    excerpt: str

    def to_record(self) -> dict:
        """The errors.jsonl line for this row (field order fixed for stable bytes)."""
        return {"row_index": self.index, "id": self.id, "kind": self.kind,
                "reason": self.reason, "excerpt": self.excerpt, "file": self.file}


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """The engine's answer for one row, as the writers need it."""
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None            # stop | length | abort | None
    # Per output token: [(token_id, logprob), ...], the sampled token first, then top-k.
    logprobs: list | None = None
    # Per prompt token: None for the first, then [(token_id, logprob, rank, decoded_token),
    # ...] with the actual token first, then the top-k by rank.
    prompt_logprobs: list | None = None


def prompt_too_long(row: InputRow, num_prompt_tokens: int, max_model_len: int) -> BadRow:
    """The bad row the worker records for resilience.on_long_prompt: error."""
    return BadRow(row.index, row.file, row.id, "prompt_too_long",
                  f"prompt has {num_prompt_tokens} tokens but model.max_model_len is "
                  f"{max_model_len}: shorten the prompt, raise model.max_model_len, or set "
                  "resilience.on_long_prompt: truncate (keeps the prompt's last tokens)",
                  excerpt(row.prompt if row.prompt is not None else row.messages))


def excerpt(raw: Any) -> str:
    if isinstance(raw, bytes):
        raw = raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
    elif not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False, default=str)
    return raw[:EXCERPT_CHARS]


def validate_record(index: int, file: str, obj: Any, spec: InputSpec,
                    raw: Any = None) -> InputRow | BadRow:
    """One decoded record (JSONL object or Parquet row dict) -> InputRow or BadRow."""
    def bad(kind: str, reason: str, row_id: Any = None) -> BadRow:
        return BadRow(index, file, row_id, kind, reason, excerpt(obj if raw is None else raw))

    if not isinstance(obj, dict):
        return bad("not_object", f"row is a JSON {type(obj).__name__}, not an object")
    if spec.is_openai:
        return _validate_openai(index, file, obj, spec, bad)
    row_id, problem = _row_id(obj, spec.id_field)
    if problem:
        return bad(problem[0], problem[1])
    content, problem = _content(obj, spec)
    if problem:
        return bad(problem[0], problem[1], row_id)
    sampling = {}
    if spec.sampling_field and obj.get(spec.sampling_field) is not None:
        sampling, reason = _sampling(obj[spec.sampling_field])
        if reason:
            return bad("invalid_sampling", reason, row_id)
    adapter = obj.get(spec.adapter_field) if spec.adapter_field else None
    if adapter is not None and not isinstance(adapter, str):
        return bad("invalid_adapter", f"{spec.adapter_field} is a {type(adapter).__name__}; "
                   "write the name of an adapter of lora.adapters (or null for the base model)",
                   row_id)
    images: tuple = ()
    if spec.image_field:
        images, reason = image_refs(obj.get(spec.image_field), spec.image_field)
        if reason:
            return bad("bad_image_column", reason, row_id)
    mm_kwargs: dict = {}
    if spec.mm_processor_kwargs_field:
        name = spec.mm_processor_kwargs_field
        mm_kwargs, reason = mm_processor_kwargs_of(obj.get(name), repr(name))
        if reason:
            return bad("invalid_mm_processor_kwargs", reason, row_id)
    key = row_id if spec.id_field else f"{file}#{index}"
    passthrough = {name: obj.get(name) for name in spec.passthrough}
    return InputRow(index, file, key, row_id, sampling=sampling, passthrough=passthrough,
                    adapter=adapter or None, images=images, mm_processor_kwargs=mm_kwargs,
                    **content)


def mm_processor_kwargs_of(value: Any, where: str) -> tuple[dict, str | None]:
    """A row's processor arguments -> (mapping without null values, None) or ({}, the
    problem). A JSON object, a Parquet struct (absent keys read as null: not overridden) or map, or
    a JSON string holding an object; null means the job's input.mm_processor_kwargs."""
    if isinstance(value, str):       # Parquet files often store the dict as a JSON string
        try:
            value = json.loads(value)
        except ValueError:
            return {}, f"{where} is text that is not JSON: {_MM_KWARGS_FIX}"
    if value is None:
        return {}, None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        got = type(value).__name__
        return {}, f"{where} is not a mapping (got {got}): {_MM_KWARGS_FIX}"
    return {k: v for k, v in value.items() if v is not None}, None


_MM_KWARGS_FIX = ("write a mapping of the model processor's argument names to values, e.g. "
                  '{"min_pixels": 200704, "max_pixels": 1003520} for Qwen2-VL (a JSON object; '
                  "in Parquet a struct, a map or a JSON string), or null for the job's "
                  "input.mm_processor_kwargs")


def image_refs(value: Any, name: str) -> tuple[tuple, str | None]:
    """An image column's value -> (entries, None) or ((), the problem). An entry is encoded
    image bytes (Parquet binary, or a {"bytes": ...} struct as Hugging Face datasets store
    images) or a path string; a list of them for several images; null or [] for none."""
    if value is None:
        return (), None
    items = value if isinstance(value, (list, tuple)) else [value]
    refs = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("bytes"), (bytes, bytearray)):
            item = item["bytes"]
        if isinstance(item, (bytes, bytearray)):
            refs.append(bytes(item))
        elif isinstance(item, str) and item:
            refs.append(item)
        else:
            where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            return (), (f"{where!r} is a {type(item).__name__}: an image column holds image "
                        "bytes (Parquet binary) or a file path, or a list of them")
    return tuple(refs), None


def _row_id(obj: dict, id_field: str | None) -> tuple[Any, tuple[str, str] | None]:
    if not id_field:
        return None, None
    if id_field not in obj:
        return None, ("missing_id", f"row has no {id_field!r} field: add it, or set "
                      "input.id_field: null to identify rows by (file, row index)")
    value = obj[id_field]
    if value is None:
        return None, ("null_id", f"{id_field!r} is null: every row needs an id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, ("bad_id_type", f"{id_field!r} must be a string or an integer, "
                      f"got {type(value).__name__}")
    if value == "":
        return None, ("empty_id", f"{id_field!r} is an empty string")
    return value, None


def _content(obj: dict, spec: InputSpec) -> tuple[dict, tuple[str, str] | None]:
    if spec.task == "chat":
        messages, problem = _field(obj, spec.messages_field, list, "a list of messages")
        if problem:
            return {}, problem
        problem = check_messages(messages)
        return ({}, ("bad_messages", problem)) if problem else ({"messages": messages}, None)
    if spec.prompt_template is not None:
        return _templated(obj, spec)
    fields = [spec.content_field] + ([spec.text_2_field] if spec.task == "score" else [])
    values = []
    for name in fields:
        value, problem = _field(obj, name, str, "a string")
        if problem:
            return {}, problem
        if not value:
            return {}, ("empty_prompt", f"{name!r} is an empty string")
        values.append(value)
    if spec.task == "generate":
        return {"prompt": values[0]}, None
    return {"texts": tuple(values)}, None


def _templated(obj: dict, spec: InputSpec) -> tuple[dict, tuple[str, str] | None]:
    from hpcinfer.io.template import TemplateError, render_prompt
    try:
        text = render_prompt(spec.prompt_template, obj)
    except TemplateError as exc:
        return {}, ("template_error", str(exc))
    if not text:
        return {}, ("empty_prompt", "prompt_template made an empty prompt for this row")
    return ({"prompt": text} if spec.task == "generate" else {"texts": (text,)}), None


def _field(obj: dict, name: str, kind: type, kind_words: str) -> tuple[Any, Any]:
    if name not in obj:
        return None, ("missing_prompt", f"row has no {name!r} field (input.*_field names "
                      "the column to read; check its spelling)")
    value = obj[name]
    if value is None:
        return None, ("null_prompt", f"{name!r} is null")
    if not isinstance(value, kind):
        return None, ("bad_prompt_type", f"{name!r} must be {kind_words}, "
                      f"got {type(value).__name__}")
    return value, None


def _sampling(value: Any) -> tuple[dict, str | None]:
    if isinstance(value, str):       # Parquet files often store the dict as a JSON string
        try:
            value = json.loads(value)
        except ValueError:
            return {}, "sampling overrides are a string that is not JSON"
    return check_sampling_overrides(value)


def check_messages(messages: Any) -> str | None:
    """None when `messages` is a valid chat (list of {role, content}), else the problem."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object, got {type(message).__name__}"
        role = message.get("role")
        if role not in ROLES:
            return f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if isinstance(content, str):
            continue
        if isinstance(content, list) and content and all(map(_is_content_part, content)):
            continue
        return (f"messages[{i}].content must be a string or a list of "
                '{"type": "text", "text": ...} and {"type": "image_url", "image_url": '
                '{"url": ...}} parts')
    return None


def _is_content_part(part: Any) -> bool:
    """A text part, an image_url part (its url is judged when the worker loads it) or an
    image part (the row's image column fills it)."""
    if not isinstance(part, dict):
        return False
    if part.get("type") == "text":
        return isinstance(part.get("text"), str)
    if part.get("type") == "image":      # filled from input.image_field (io/images.py)
        return True
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return isinstance(url.get("url") if isinstance(url, dict) else url, str)
    return False


def has_image_parts(messages: list | None) -> bool:
    return bool(messages) and any(
        isinstance(m.get("content"), list) and any(p.get("type") in ("image_url", "image")
                                                   for p in m["content"])
        for m in messages)


def _validate_openai(index: int, file: str, obj: dict, spec: InputSpec, bad) -> InputRow | BadRow:
    custom_id, problem = _row_id(obj, "custom_id")
    if problem:
        kind = problem[0]
        reason = ("request has no custom_id: OpenAI batch lines need a unique custom_id"
                  if kind == "missing_id" else problem[1])
        return bad(kind, reason)
    request, problem = openai_batch.parse_request(obj, spec.task)
    if problem:
        return bad(problem[0], problem[1], custom_id)
    if "messages" in request and (reason := check_messages(request["messages"])):
        return bad("bad_messages", reason, custom_id)
    sampling, reason = check_sampling_overrides(request.pop("sampling"))
    if reason:
        return bad("invalid_sampling", reason, custom_id)
    mm_kwargs, reason = mm_processor_kwargs_of(request.pop("mm_processor_kwargs", None),
                                               "body.mm_processor_kwargs")
    if reason:
        return bad("invalid_mm_processor_kwargs", reason, custom_id)
    return InputRow(index, file, custom_id, custom_id, sampling=sampling, url=obj["url"],
                    body=obj["body"], mm_processor_kwargs=mm_kwargs, **request)
