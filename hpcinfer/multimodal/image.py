"""vLLM's ``vllm.multimodal.image`` helpers that example scripts call on their images."""
from __future__ import annotations


def rgba_to_rgb(image, background_color=(255, 255, 255)):
    """An RGBA image as RGB over ``background_color`` (the alpha channel as the mask)."""
    from PIL import Image
    converted = Image.new("RGB", image.size, tuple(background_color))
    converted.paste(image, mask=image.split()[3])
    return converted


def convert_image_mode(image, to_mode: str):
    """``image`` in PIL mode ``to_mode``; RGBA to RGB over white, as vLLM does."""
    if image.mode == to_mode:
        return image
    if image.mode == "RGBA" and to_mode == "RGB":
        return rgba_to_rgb(image)
    return image.convert(to_mode)
