"""Input row -> engine request: the prompt (text and token ids) and its SamplingParams.

A row the engine cannot take comes back as a ``BadRow`` instead (prompt over max_model_len
with ``resilience.on_long_prompt: error``, sampling overrides the engine rejects, a chat
template that fails, a vision-language model's image placeholder in a row without images:
``placeholder_without_images``), so one bad row never stops the shard. Chat rows are rendered exactly
as ``LLM.chat`` renders them (the tokenizer's chat template with a generation prompt), so the
worker's answers equal what the Python API gives for the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpcinfer.io.rows import BadRow, InputRow, excerpt, prompt_too_long


# A text row (no images) whose prompt holds the model's image placeholder.
_PLACEHOLDER_FIX = ("give the row its images (the input.image_field column, or image_url "
                    "parts in its messages), or remove the placeholder from its text")


@dataclass(frozen=True)
class EngineRequest:
    prompt: Any                # {"prompt": text | None, "prompt_token_ids": [...]}, or a
                               # ProcessedPrompt (rows with images)
    params: Any                # SamplingParams
    num_truncated_tokens: int = 0
    lora_request: Any = None   # hpcinfer.lora.request.LoRARequest, None: the base model


def base_sampling(sampling_cfg: Any) -> dict:
    """The job's ``sampling:`` block as SamplingParams keyword arguments."""
    data = sampling_cfg.model_dump() if hasattr(sampling_cfg, "model_dump") else dict(sampling_cfg)
    data["stop"] = list(data.get("stop") or ()) or None
    data["stop_token_ids"] = list(data.get("stop_token_ids") or ()) or None
    return data


class RequestBuilder:
    """Builds engine requests for one job (tokenizer, sampling defaults and limits fixed)."""

    def __init__(self, tokenizer, base: dict, max_model_len: int, *,
                 on_long_prompt: str = "error", want_logprobs: bool = False,
                 adapters: dict | None = None, multimodal: Any = None,
                 mm_processor_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.multimodal = multimodal     # the engine's MultiModalProcessor (None: text only)
        # input.mm_processor_kwargs: the processor call's arguments for every row with images
        self.mm_processor_kwargs = mm_processor_kwargs
        self.adapters = adapters or {}   # lora.adapters name -> LoRARequest
        self.base = base
        self.max_model_len = max_model_len
        self.on_long_prompt = on_long_prompt
        self.want_logprobs = want_logprobs

    def build(self, row: InputRow) -> EngineRequest | BadRow:
        params = self.sampling_params(row)
        if isinstance(params, BadRow):
            return params
        lora = self.lora_request(row)
        if isinstance(lora, BadRow):
            return lora
        if row.images or _has_pil_parts(row.messages):
            return self._image_request(row, params, lora)
        try:
            text, token_ids = self._tokens(row)
        except Exception as exc:  # jinja2 / tokenizer errors: the row's content is the cause
            return _bad(row, "bad_messages" if row.messages is not None else "bad_prompt_type",
                        f"the prompt could not be tokenized ({exc})")
        if not token_ids:
            return _bad(row, "empty_prompt", "the prompt has no tokens")
        if self.multimodal is not None:  # placeholders with no images: this row's error
            try:
                self.multimodal.check_text_only(token_ids, "the row", _PLACEHOLDER_FIX)
            except ValueError as exc:
                return _bad(row, "placeholder_without_images", str(exc))
        num_cut = 0
        if len(token_ids) > self.max_model_len:
            if self.on_long_prompt != "truncate":
                return prompt_too_long(row, len(token_ids), self.max_model_len)
            keep = self.max_model_len - 1           # room for at least one generated token
            num_cut = len(token_ids) - keep
            token_ids, text = token_ids[-keep:], None
        return EngineRequest({"prompt": text, "prompt_token_ids": token_ids}, params, num_cut,
                             lora)

    def _image_request(self, row: InputRow, params, lora) -> EngineRequest | BadRow:
        """A row with decoded images (io/images.py): processed here as LLM.generate /
        LLM.chat process it, so a placeholder count that does not match is this row's error;
        the engine takes the ProcessedPrompt as is."""
        mm = self.multimodal
        mm_kwargs = self.processor_kwargs(row)
        try:
            if row.messages is not None:
                num_written = sum(_texts(m).count(mm.placeholder) for m in row.messages)
                if num_written:
                    return _bad(row, "image_count_mismatch",
                                f"the messages' text holds the image placeholder "
                                f"{mm.placeholder!r} {num_written} time(s): image_url parts "
                                "place the images; remove the placeholder from the text")
                processed = mm.render_chat(row.messages, "the row's messages",
                                           processor_kwargs=mm_kwargs,
                                           chat_template=None, add_generation_prompt=True,
                                           continue_final_message=False, tools=None)
            else:
                num_placeholders = row.prompt.count(mm.placeholder)
                if num_placeholders != len(row.images):
                    return _bad(row, "image_count_mismatch",
                                f"the prompt has {num_placeholders} image placeholder(s) "
                                f"{mm.placeholder!r} but the row has {len(row.images)} "
                                "image(s): write the placeholder once per image")
                processed = mm.process({"prompt": row.prompt,
                                        "multi_modal_data": {"image": list(row.images)},
                                        "mm_processor_kwargs": mm_kwargs},
                                       "the row")
        except ValueError as exc:  # the processor's checks (placeholder counts, sizes)
            if "placeholder" in str(exc):
                return _bad(row, "image_count_mismatch", str(exc))
            return _bad(row, "bad_image", str(exc) + _kwargs_hint(mm_kwargs, row))
        if len(processed.token_ids) > self.max_model_len:
            return prompt_too_long(row, len(processed.token_ids), self.max_model_len)
        return EngineRequest(processed, params, 0, lora)

    def processor_kwargs(self, row: InputRow) -> dict | None:
        """The processor arguments of a row with images: input.mm_processor_kwargs, then the
        row's own over them key by key (None: neither has any). Equal dicts give equal image
        hashes whatever their key order (processor.py), so rows with the same arguments
        share prefix-cache blocks and rows with other arguments never share image KV."""
        return {**(self.mm_processor_kwargs or {}), **row.mm_processor_kwargs} or None

    def lora_request(self, row: InputRow):
        """The row's adapter: its adapter column, or an OpenAI-batch body.model that names one
        (vLLM's run-batch; any other model name is the base). None: the base model."""
        name = row.adapter
        if name is None and row.body is not None and row.body.get("model") in self.adapters:
            name = row.body["model"]
        if name is None:
            return None
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none: the job has no lora.adapters"
            return _bad(row, "unknown_adapter", f"adapter {name!r} is not in lora.adapters "
                        f"(known: {known}); add it there or fix the row")
        return self.adapters[name]

    def sampling_params(self, row: InputRow):
        from hpcinfer.engine.params import SamplingParams
        from hpcinfer.engine.structured_params import StructuredOutputsParams
        merged = {**self.base, **row.sampling}
        if self.want_logprobs and merged.get("logprobs") is None:
            merged["logprobs"] = 0                  # output.logprobs: the sampled token's
        if merged.get("n", 1) != 1:
            return _bad(row, "invalid_sampling", f"sampling.n={merged['n']}: several "
                        "completions per row are not written yet (one text per row); use n: 1")
        try:
            if merged.get("structured_outputs") is not None:  # a row's replaces the job's
                merged["structured_outputs"] = StructuredOutputsParams(
                    **merged["structured_outputs"])
            return SamplingParams(**merged)
        except (TypeError, ValueError) as exc:
            return _bad(row, "invalid_sampling", str(exc))

    def _tokens(self, row: InputRow) -> tuple[str | None, list[int]]:
        if row.messages is not None:
            return render_chat(self.tokenizer, row.messages)
        if row.prompt is None:
            raise ValueError("row has no prompt or messages (task not supported yet)")
        return row.prompt, list(self.tokenizer(row.prompt).input_ids)


def render_chat(tokenizer, messages: list) -> tuple[str, list[int]]:
    """(text, token ids) of a conversation, as LLM.chat renders it."""
    kwargs = dict(chat_template=None, add_generation_prompt=True, continue_final_message=False)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return text, list(ids)


def _texts(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or () if p.get("type") == "text")


def _has_pil_parts(messages: list | None) -> bool:
    return bool(messages) and any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_pil"
                                                   for p in m["content"])
        for m in messages)


def _kwargs_hint(mm_kwargs: dict | None, row: InputRow) -> str:
    """What to fix when the processor refused a row that ran with processor arguments."""
    if not mm_kwargs:
        return ""
    source = ("input.mm_processor_kwargs merged with the row's own" if row.mm_processor_kwargs
              else "input.mm_processor_kwargs")
    return (f" (mm_processor_kwargs {mm_kwargs}, from {source}): give the processor's "
            "argument names with values of its types, e.g. {\"min_pixels\": 200704, "
            "\"max_pixels\": 1003520} for Qwen2-VL, or fix the image")


def _bad(row: InputRow, kind: str, reason: str) -> BadRow:
    content = row.prompt if row.prompt is not None else (row.messages or row.body)
    return BadRow(row.index, row.file, row.id, kind, reason, excerpt(content))


def to_output_record(out, params) -> Any:
    """RequestOutput (finished, n=1) -> OutputRecord for the writers."""
    from hpcinfer.io.rows import OutputRecord
    completion = out.outputs[0]
    logprobs = None
    if params.logprobs is not None and completion.logprobs is not None:
        logprobs = [_position(token_id, top)
                    for token_id, top in zip(completion.token_ids, completion.logprobs)]
    prompt_logprobs = None
    if params.prompt_logprobs is not None and out.prompt_logprobs is not None:
        prompt_logprobs = [None] + [_prompt_position(token_id, top) for token_id, top in
                                    zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    return OutputRecord(text=completion.text, num_prompt_tokens=len(out.prompt_token_ids),
                        num_output_tokens=len(completion.token_ids),
                        finish_reason=completion.finish_reason, logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs)


def _position(token_id: int, top: dict) -> list[tuple[int, float]]:
    """One position: the sampled (or prompt) token first, then the alternatives by rank."""
    sampled = [(int(token_id), float(top[token_id].logprob))] if token_id in top else []
    others = sorted(((t, lp) for t, lp in top.items() if t != token_id),
                    key=lambda item: (item[1].rank or 0, -item[1].logprob))
    return sampled + [(int(t), float(lp.logprob)) for t, lp in others]


def _prompt_position(token_id: int, top: dict) -> list[tuple[int, float, int | None, str | None]]:
    """One prompt position as (token_id, logprob, rank, decoded token), in _position's order
    (the prompt token first, then the top-k by rank): OpenAI-batch output writes all four."""
    return [(t, lp, top[t].rank, top[t].decoded_token) for t, lp in _position(token_id, top)]
