"""Images from user input: PIL images as given, OpenAI-style chat parts, content hashes.

Compute nodes are offline, so an ``http(s)://`` URL is refused with a message saying what to
pass instead; ``file://`` URLs and plain absolute paths name local files, read here.
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


def load_image_url(url: Any, where: str, media_dirs: tuple[str, ...] | None = None):
    """An image_url part's url: "data:image/...;base64,...", "file:///abs/path" or an
    absolute path -> a loaded PIL image. ``media_dirs`` (jobs: input.media_dirs, already
    real paths): local files only from under one of them (None: anywhere, the Python API)."""
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
    if media_dirs is not None:
        return open_local_image(path, media_dirs, where)
    if not path.is_file():
        raise ValueError(f"{where}: image file {path} does not exist (or is not a file)")
    return _open(path.read_bytes(), where, str(path))


def open_local_image(path: Path, media_dirs: tuple[str, ...], where: str):
    """A local image file that must lie under one of ``media_dirs`` (real paths) once ``..``
    and every symlink are resolved: a link inside a media dir that leads out is refused."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(d) for d in media_dirs):
        allowed = ", ".join(media_dirs) or "none: input.media_dirs is empty"
        shown = f"{path} (resolves to {real})" if str(real) != str(path) else str(path)
        raise MediaError("media_path_not_allowed",
                         f"{where}: image file {shown} is outside input.media_dirs "
                         f"(allowed: {allowed}); add its directory to input.media_dirs")
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
