"""The checkpoint's transformers processor, run once per request on the host.

``AutoProcessor`` expands each image placeholder into the model's number of image tokens,
resizes and normalises the images and renders chat templates with image parts, so prompts
and pixels are exactly what transformers gives the model. We then find each image's
placeholder span (the model says how many tokens each image fills) and hash each image.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import threading
from typing import Any

import torch

from hpcinfer.multimodal.inputs import ImageItem, MultiModalInputs, ProcessedPrompt
from hpcinfer.multimodal.media import (CHAT_IMAGE_PARTS, LLM_IMAGE_LIMIT, LLM_MEDIA_PATH,
                                       as_image_list, check_image_count, check_pil, image_hash,
                                       load_image_url)
from hpcinfer.multimodal.pinned import PinnedBudget, budget_bytes
from hpcinfer.multimodal.workers import start_workers

log = logging.getLogger(__name__)

# multi_modal_uuids: vLLM's keys for its preprocessor cache; hpcinfer keeps none, so they are
# accepted and not used (each request's images are processed from its own data)
PROMPT_KEYS = frozenset({"prompt", "multi_modal_data", "mm_processor_kwargs", "cache_salt",
                         "multi_modal_uuids"})
_NOT_PER_IMAGE = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _load_processor(model_path: str, architecture: str):
    """transformers' AutoProcessor of the checkpoint; for Qwen2-VL / Qwen2.5-VL without
    torchvision, the image-only processor (image_only.py) instead of failing."""
    import importlib.util

    from transformers import AutoProcessor

    from hpcinfer.multimodal import image_only
    try:
        return AutoProcessor.from_pretrained(model_path)
    except Exception as e:  # transformers raises OSError, ValueError, AttributeError...
        error = e
    if architecture in image_only.ARCHITECTURES and importlib.util.find_spec("torchvision") is None:
        try:
            processor = image_only.image_only_processor(model_path, architecture)
        except Exception as e:   # noqa: BLE001 - reported with the first error below
            error = e
        else:
            log.info("torchvision is not installed: %s's processor without its video part "
                     "(images only; PIL resizing)", architecture)
            return processor
    raise ValueError(f"{model_path}: transformers could not load the model's processor "
                     f"({type(error).__name__}: {error}). The checkpoint needs its "
                     "preprocessor_config.json (download the full snapshot)") from None


class MultiModalProcessor:
    def __init__(self, model_path: str, model: Any, num_workers: int = 0,
                 pin_pixels: bool = False):
        self.processor = _load_processor(model_path, type(model).__name__)
        self.model = model
        self.image_token_id = model.image_token_id
        self.placeholder = getattr(self.processor, "image_token", None) or "<image>"
        # Tokens that mean "an image goes here": the image token, and the prompt's placeholder
        # when it is another token (Gemma 3 writes <start_of_image>, expanded to soft tokens).
        vocab = self.processor.tokenizer.get_vocab()
        self.placeholder_token_ids = {self.image_token_id} | (
            {vocab[self.placeholder]} if self.placeholder in vocab else set())
        # LLM(limit_mm_per_prompt=..., allowed_local_media_path=...), see set_media_limits
        self.max_images: int | None = None
        # LLM(mm_processor_kwargs=...): every request's defaults; its own keys win
        self.default_processor_kwargs: dict = {}
        self.media_dirs: tuple[str, ...] = ()
        # LLM.generate preprocesses many image prompts on threads: each thread other than the
        # one that built the processor calls its own copy (the fast tokenizer's settings are
        # mutable Rust state that concurrent calls may not share)
        self._owner = threading.current_thread()
        self._local = threading.local()
        # ... and calls run in worker processes when there are any (workers.py: on threads
        # the processor's Python held the GIL the step loop needs)
        self.workers = start_workers(self.processor, num_workers)
        # pixels pinned here, not on the step loop (pinned.py), when the encoder is on a GPU
        self.pinned = PinnedBudget(budget_bytes()) if pin_pixels else None

    def close(self) -> None:
        """Stop the preprocessing worker processes (they also stop with this process)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def set_media_limits(self, max_images: int | None, media_dirs: tuple[str, ...]) -> None:
        """vLLM's limit_mm_per_prompt["image"] (None: no limit) and allowed_local_media_path
        (real paths; empty: chat image parts may not name local files), as
        media.llm_media_args returns them."""
        self.max_images, self.media_dirs = max_images, tuple(media_dirs)

    def set_processor_defaults(self, kwargs: dict | None) -> None:
        """vLLM's LLM(mm_processor_kwargs=...): arguments of every processor call (e.g.
        Gemma 3's do_pan_and_scan); a request's own mm_processor_kwargs win key by key."""
        self.default_processor_kwargs = dict(kwargs or {})

    # --- generate(): {"prompt": text, "multi_modal_data": {"image": ...}} ---
    def process(self, prompt: dict, request_id: str) -> ProcessedPrompt:
        unknown = set(prompt) - PROMPT_KEYS
        if "prompt_token_ids" in unknown:
            raise ValueError(f"request {request_id!r}: prompt_token_ids with multi_modal_data "
                             "is not supported yet: pass the text as 'prompt' with the "
                             f"model's placeholder {self.placeholder!r} per image")
        if unknown:
            raise ValueError(f"request {request_id!r}: unknown prompt keys {sorted(unknown)}; "
                             f"use {sorted(PROMPT_KEYS)}")
        text, data = prompt.get("prompt"), prompt["multi_modal_data"]
        if not isinstance(text, str):
            raise ValueError(f"request {request_id!r}: 'prompt' must be the prompt text")
        if not isinstance(data, dict) or set(data) - {"image"}:
            kinds = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"request {request_id!r}: multi_modal_data must be "
                             f"{{'image': PIL image or list of them}}, got {kinds} (only "
                             "images are supported)")
        images = as_image_list(data["image"], request_id) if "image" in data else []
        check_image_count(len(images), self.max_images, f"request {request_id!r}",
                          LLM_IMAGE_LIMIT)
        return self._process(text, images, f"request {request_id!r}", add_special_tokens=True,
                             processor_kwargs=prompt.get("mm_processor_kwargs"))

    # --- chat(): OpenAI-style messages with image parts ---
    def render_chat(self, conversation: list[dict], where: str,
                    processor_kwargs: dict | None = None, **template_kwargs) -> ProcessedPrompt:
        """Render with the processor's chat template and tokenize as transformers'
        ``processor.apply_chat_template(tokenize=True)`` does: special tokens are added only
        when the rendered text does not already start with the BOS token."""
        check_image_count(count_image_parts(conversation), self.max_images, where,
                          LLM_IMAGE_LIMIT)  # before any image is read
        messages, images = to_hf_messages(conversation, where, self.media_dirs)
        try:
            text = self.processor.apply_chat_template(messages, tokenize=False,
                                                      **template_kwargs)
        except Exception as e:  # jinja2 errors name no conversation
            raise ValueError(f"{where}: the chat template failed: {e}") from e
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        return self._process(text, images, where,
                             add_special_tokens=not (bos is not None and text.startswith(bos)),
                             processor_kwargs=processor_kwargs)

    def check_text_only(self, token_ids: list[int], where: str, fix: str | None = None) -> None:
        """A text prompt holding image placeholders would run the model on them as tokens.
        ``fix``: what to do instead (default: the Python API's multi_modal_data)."""
        if not self.placeholder_token_ids.isdisjoint(token_ids):
            fix = fix or ("pass {'prompt': ..., 'multi_modal_data': {'image': [...]}}, one "
                          "image per placeholder")
            raise ValueError(f"{where}: the prompt has image placeholder "
                             f"tokens ({self.placeholder!r}) but no images: {fix}")

    def _processor_here(self):
        if threading.current_thread() is self._owner:
            return self.processor
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        return processor

    def _process(self, text: str, images: list, where: str, *, add_special_tokens: bool,
                 processor_kwargs: dict | None = None) -> ProcessedPrompt:
        """``processor_kwargs`` (vLLM's mm_processor_kwargs, e.g. Qwen2-VL's min_pixels /
        max_pixels; over the LLM's defaults) go to the processor call and into each image's
        hash: the same image preprocessed otherwise never shares KV."""
        if processor_kwargs is not None and not isinstance(processor_kwargs, dict):
            raise ValueError(f"{where}: mm_processor_kwargs must be a dict, e.g. "
                             "{'max_pixels': 1003520}")
        kwargs = {**self.default_processor_kwargs, **(processor_kwargs or {})}
        workers, dtype = self.workers, getattr(self.model, "pixel_dtype", None)
        try:
            done = (workers.run(text, images, add_special_tokens, kwargs, dtype)
                    if workers is not None and images else None)
            if done is None:   # no worker processes, none idle, or a text-only prompt
                out = self._processor_here()(text=[text], images=images or None,
                                             return_tensors="pt",
                                             add_special_tokens=add_special_tokens, **kwargs)
                hashes = None
            else:
                out, hashes = done
        except Exception as e:  # the processor's errors (counts, sizes) name no request
            raise ValueError(f"{where}: the model's processor refused the prompt with "
                             f"{len(images)} image(s): {e}") from None
        token_ids = out["input_ids"][0].tolist()
        if not images:
            self.check_text_only(token_ids, where)
            return ProcessedPrompt(text, token_ids)
        split = getattr(self.model, "split_image_inputs", None) or _split_per_image
        per_image = _in_dtype(split(out, len(images)), dtype, self.pinned)
        counts = self.model.image_token_counts(per_image)
        positions = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(positions) != sum(counts):
            raise ValueError(f"{where}: {len(images)} image(s) need {sum(counts)} image "
                             f"tokens but the prompt has {len(positions)}: put exactly one "
                             f"{self.placeholder!r} in the prompt per image")
        items, k = [], 0
        salt = hash(repr(sorted(kwargs.items()))) if kwargs else None
        if hashes is None:
            hashes = [image_hash(image) for image in images]
        if len(per_image) != len(images):   # crops (Gemma 3's pan-and-scan) after each image
            hashes = [_inputs_hash(inputs) for inputs in per_image]
        for digest, count, inputs in zip(hashes, counts, per_image):
            span = positions[k:k + count]
            if span[-1] - span[0] != count - 1:
                raise ValueError(f"{where}: image {len(items)}'s placeholder tokens are not "
                                 "contiguous; do not write image tokens into the text yourself")
            digest = digest if salt is None else hash((digest, salt))
            items.append(ImageItem(span[0], count, digest, inputs))
            k += count
        mm = MultiModalInputs(items, whole_spans=getattr(self.model,
                                                         "bidirectional_image_spans", False))
        if getattr(self.model, "uses_mrope", False):
            mm.rope_positions, mm.rope_delta = self.model.rope_positions(len(token_ids), items)
        return ProcessedPrompt(text, token_ids, mm)


def _inputs_hash(inputs: dict) -> int:
    """A digest of one image input's preprocessed tensors. For processors that turn an image
    into several inputs (crops) without saying which belong to which image (transformers
    drops Gemma 3's num_crops), so each crop's KV is keyed by its own pixels."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(inputs):
        value = inputs[key]
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if value.is_floating_point() else value.cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little")


def _in_dtype(per_image: list[dict], dtype, pinned: PinnedBudget | None = None) -> list[dict]:
    """Floating inputs (pixels) in the encoder's dtype, here on the preprocessing thread: the
    encoder's first op casts them so anyway (the same rounding), and a step then moves half
    the bytes of fp32 to the GPU and converts nothing; pinned too when ``pinned`` is given
    (pinned.py). Integer inputs (grids) are kept."""
    if dtype is None and pinned is None:
        return per_image

    def ready(v: Any) -> Any:
        if not v.is_floating_point():
            return v
        v = v if dtype is None else v.to(dtype)
        return v if pinned is None else pinned.pin(v)
    return [{k: ready(v) for k, v in inputs.items()} for inputs in per_image]


def _split_per_image(out: Any, num_images: int) -> list[dict]:
    """The processor's batched image tensors ([num_images, ...]) as one dict per image."""
    per_image: list[dict] = [{} for _ in range(num_images)]
    for key, value in out.items():
        if key in _NOT_PER_IMAGE:
            continue
        if getattr(value, "shape", None) is None or value.shape[0] != num_images:
            raise ValueError(f"processor output {key!r} is not one entry per image; this "
                             "model's processor is not supported yet")
        for i in range(num_images):
            per_image[i][key] = value[i:i + 1]
    return per_image


def count_image_parts(conversation: list[dict]) -> int:
    """The image parts (CHAT_IMAGE_PARTS) of OpenAI-style messages."""
    return sum(1 for message in conversation if isinstance(message, dict)
               and isinstance(message.get("content"), list)
               for part in message["content"]
               if isinstance(part, dict) and part.get("type") in CHAT_IMAGE_PARTS)


def to_hf_messages(conversation: list[dict], where: str, media_dirs: tuple[str, ...] = ()
                   ) -> tuple[list[dict], list]:
    """OpenAI-style messages (content a string, or parts: {"type": "text", "text"},
    {"type": "image_url", "image_url": {"url"}}, {"type": "image_pil", "image_pil"}) ->
    (transformers' messages with {"type": "image"} parts, the images in order). Local files
    only from under ``media_dirs`` (LLM's allowed_local_media_path; empty: none)."""
    messages, images = [], []
    for m, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for p, part in enumerate(content):
            at = f"{where}, message {m}, part {p}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                images.append(load_image_url(part.get("image_url"), at, media_dirs,
                                             LLM_MEDIA_PATH))
                parts.append({"type": "image"})
            elif kind == "image_pil":
                check_pil(part.get("image_pil"), at)
                images.append(part["image_pil"])
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{at}: content part type {kind!r} is not supported; use "
                                 f"'text' or one of {list(CHAT_IMAGE_PARTS)}")
        messages.append({**message, "content": parts})
    return messages, images
