"""Images from user input: PIL images as given, OpenAI-style chat parts, content hashes.

Compute nodes are offline, so an ``http(s)://`` URL is refused with a message saying what to
pass instead; ``file://`` URLs and plain absolute paths name local files, read here only from
under the allowed directories (jobs: ``input.media_dirs``; ``LLM``: vLLM's
``allowed_local_media_path``, unset: no local files, as in vLLM). The most images one prompt
may hold (jobs: ``input.limit_mm_per_prompt``; ``LLM``: ``limit_mm_per_prompt``) is checked by
``check_image_count``, before any image is read.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

CHAT_IMAGE_PARTS = ("image_url", "image_pil")


def as_image_list(value: Any, request_id: str) -> list:
    """multi_modal_data["image"] (one PIL image or a list of them) -> a list of RGB-able
    PIL images; ValueError for anything else."""
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, image in enumerate(images):
        check_pil(image, f"request {request_id!r}: multi_modal_data['image'][{i}]")
    return images


def check_pil(image: Any, where: str) -> None:
    from PIL import Image
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where} is a {type(image).__name__}, not a PIL.Image.Image: open "
                         "the file with PIL.Image.open(path) (image embeddings are not "
                         "accepted yet)")


class MediaError(ValueError):
    """An image a job row names cannot be used; ``kind`` is the errors.jsonl kind."""

    def __init__(self, kind: str, reason: str):
        self.kind = kind
        super().__init__(reason)


# The setting that allows local files / limits the images, and what to do about a refusal.
JOB_MEDIA_DIRS = "input.media_dirs"
LLM_MEDIA_PATH = "allowed_local_media_path"
JOB_IMAGE_LIMIT = "input.limit_mm_per_prompt"
LLM_IMAGE_LIMIT = "limit_mm_per_prompt"
_DIR_HINTS = {JOB_MEDIA_DIRS: "add its directory to input.media_dirs",
              LLM_MEDIA_PATH: "pass LLM(..., allowed_local_media_path=<a directory above it>), "
                              "or the image as a data: URL or an image_pil part"}
_LIMIT_HINTS = {JOB_IMAGE_LIMIT: "split the row or raise the limit",
                LLM_IMAGE_LIMIT: "pass fewer images, or raise "
                                 "LLM(limit_mm_per_prompt={'image': N})"}


def check_image_count(count: int, limit: int | None, where: str, setting: str,
                      unit: str = "prompt") -> None:
    """MediaError ``too_many_images`` when ``count`` images exceed ``limit`` (None: no
    limit); ``setting`` names the limit's argument (JOB_IMAGE_LIMIT or LLM_IMAGE_LIMIT)."""
    if limit is not None and count > limit:
        raise MediaError("too_many_images", f"{where} has {count} images but {setting} "
                         f"allows {limit} per {unit}: {_LIMIT_HINTS[setting]}")


def llm_media_args(limit_mm_per_prompt: Any, allowed_local_media_path: Any
                   ) -> tuple[int | None, tuple[str, ...]]:
    """vLLM's ``LLM(limit_mm_per_prompt=..., allowed_local_media_path=...)`` -> (the most
    images per prompt or None for no limit, the allowed directories as real paths; empty
    when unset: no local files, as in vLLM). ValueError for a malformed value."""
    max_images = None
    if limit_mm_per_prompt not in (None, {}):
        if not isinstance(limit_mm_per_prompt, dict):
            raise ValueError(f"limit_mm_per_prompt={limit_mm_per_prompt!r}: pass a dict such "
                             "as {'image': 2}")
        for modality, value in limit_mm_per_prompt.items():
            if modality not in ("image", "video", "audio"):
                raise ValueError(f"limit_mm_per_prompt: unknown modality {modality!r}; use "
                                 "'image' (videos and audio are not taken yet)")
            count = value.get("count") if isinstance(value, dict) else value
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"limit_mm_per_prompt[{modality!r}]={value!r}: pass a "
                                 "count >= 0 (or {'count': N})")
            if modality == "image":
                max_images = count
    if allowed_local_media_path in (None, ""):
        return max_images, ()
    if not isinstance(allowed_local_media_path, (str, os.PathLike)):
        raise ValueError(f"allowed_local_media_path={allowed_local_media_path!r}: pass a "
                         "directory path")
    path = Path(allowed_local_media_path)
    if not path.exists():
        raise ValueError(f"allowed_local_media_path={str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"allowed_local_media_path={str(path)!r} is not a directory")
    return max_images, (os.path.realpath(path),)


def load_image_url(url: Any, where: str, media_dirs: tuple[str, ...] = (),
                   setting: str = JOB_MEDIA_DIRS):
    """An image_url part's url: "data:image/...;base64,...", "file:///abs/path" or an
    absolute path -> a loaded PIL image. Local files only from under one of ``media_dirs``
    (real paths; empty: none), which ``setting`` (JOB_MEDIA_DIRS or LLM_MEDIA_PATH) sets."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise ValueError(f"{where}: image_url needs {{'url': 'data:image/png;base64,...' or "
                         f"'file:///abs/path'}}, got {type(url).__name__}")
    if url.startswith("data:"):
        try:
            return _open(_data_url_bytes(url, where), where, "the data URL")
        except ValueError as e:
            raise MediaError("bad_data_url", str(e)) from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
        raise MediaError("network_media", f"{where}: {url[:80]!r} is a network URL; hpcinfer "
                         "reads no network media (compute nodes are offline): download the image and pass a "
                         "data: URL, a file:// path or a PIL image")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: {url[:80]!r} names a remote host; use file:///abs/path")
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" and url.startswith("/"):
        path = Path(url)
    else:
        raise ValueError(f"{where}: unsupported image URL {url[:80]!r}: use a data: URL, "
                         "file:///abs/path or a PIL image (an image_pil part)")
    return open_local_image(path, media_dirs, where, setting)


def open_local_image(path: Path, media_dirs: tuple[str, ...], where: str,
                     setting: str = JOB_MEDIA_DIRS):
    """A local image file that must lie under one of ``media_dirs`` (real paths) once ``..``
    and every symlink are resolved: a link inside a media dir that leads out is refused."""
    if not media_dirs and setting == LLM_MEDIA_PATH:  # vLLM: no local files when unset
        raise MediaError("media_path_not_allowed",
                         f"{where}: cannot load the local image file {path} without "
                         f"{LLM_MEDIA_PATH} (unset, as vLLM's default: no local files); "
                         f"{_DIR_HINTS[setting]}")
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(d) for d in media_dirs):
        allowed = ", ".join(media_dirs) or f"none: {setting} is empty"
        shown = f"{path} (resolves to {real})" if str(real) != str(path) else str(path)
        raise MediaError("media_path_not_allowed",
                         f"{where}: image file {shown} is outside {setting} "
                         f"(allowed: {allowed}); {_DIR_HINTS[setting]}")
    if not real.is_file():
        raise MediaError("unreadable_image",
                         f"{where}: image file {path} does not exist (or is not a file)")
    try:
        data = real.read_bytes()
    except OSError as e:
        raise MediaError("unreadable_image", f"{where}: cannot read image file {path} "
                         f"({e.strerror or e})") from None
    return open_image_bytes(data, where, str(path))


def open_image_bytes(data: bytes, where: str, what: str):
    """Encoded image bytes (PNG, JPEG, ...) -> a decoded PIL image; MediaError when they are
    not a readable image."""
    try:
        return _open(data, where, what)
    except ValueError as e:
        raise MediaError("unreadable_image", str(e)) from None


def _data_url_bytes(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"{where}: a data URL must look like 'data:image/png;base64,<data>', "
                         f"got {url[:40]!r}...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the data URL's base64 payload does not decode") from None


def _open(data: bytes, where: str, what: str):
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not inside the processor
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{where}: {what} is not a readable image ({e})") from None
    return image


def image_hash(image) -> int:
    """A content hash of a PIL image (mode, size and pixels): equal images share KV blocks,
    different ones never do."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return int.from_bytes(digest.digest()[:8], "little")
