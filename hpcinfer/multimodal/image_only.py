"""Qwen2-VL / Qwen2.5-VL processors without torchvision (images only).

Why: transformers 5's ``Qwen2VLProcessor`` always builds its video processor, which needs
torchvision; where torchvision is not installed (a common cluster venv: torch alone),
``AutoProcessor.from_pretrained`` fails for these checkpoints although hpcinfer takes images
only. This is the same processor class with its video attribute removed and transformers'
PIL image processor (``Qwen2VLImageProcessorPil``, read from the checkpoint's
preprocessor_config.json): the same placeholder expansion and chat template. Its resizing is
PIL's, so pixels can differ in the last bits from the torchvision processor's.

The classes are made on first use (transformers is imported late) under this module's name,
so the processors pickle: the image-preprocessing worker processes get them that way.
"""
from __future__ import annotations

import functools
from pathlib import Path

# architecture -> the image-only processor class name (made by __getattr__ below)
ARCHITECTURES = {"Qwen2VLForConditionalGeneration": "ImageOnlyQwen2VLProcessor",
                 "Qwen2_5_VLForConditionalGeneration": "ImageOnlyQwen2_5_VLProcessor"}
_BASES = {"ImageOnlyQwen2VLProcessor": "Qwen2VLProcessor",
          "ImageOnlyQwen2_5_VLProcessor": "Qwen2_5_VLProcessor"}


def image_only_processor(path: str | Path, architecture: str):
    """The image-only processor of the checkpoint at ``path`` (one of ARCHITECTURES)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)
    cls = __getattr__(ARCHITECTURES[architecture])
    tokenizer = AutoTokenizer.from_pretrained(path)
    return cls(Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer,
               chat_template=tokenizer.chat_template)


@functools.lru_cache(maxsize=None)
def __getattr__(name: str):
    if name not in _BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import transformers
    base = getattr(transformers, _BASES[name])

    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor, tokenizer, chat_template=None):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

    return type(name, (base,), {"__module__": __name__, "__qualname__": name,
                                "get_attributes": classmethod(get_attributes),
                                "__init__": __init__})
