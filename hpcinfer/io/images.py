"""A job row's images: decoded with PIL by the worker's reader thread, never in the step loop.

``ShardReader`` (also used by ``hpcinfer validate`` on the login node) only checks the shape
of an image column or of ``image_url`` chat parts; ``RowImageLoader`` then turns them into
decoded images, or the row into one ``BadRow`` with one reason:

- image bytes or a file that is not a readable image: ``unreadable_image``;
- a local file outside ``input.media_dirs`` (after resolving ``..`` and symlinks):
  ``media_path_not_allowed``;
- an ``http(s)://`` URL (compute nodes are offline): ``network_media``;
- a data URL that is not a base64 image: ``bad_data_url``;
- more images than ``input.limit_mm_per_prompt.image``: ``too_many_images``;
- images for a model that takes none: ``images_not_supported``.

Relative paths in an image column (JSONL) are relative to the input file's directory. A chat
row's image column fills its messages' ``{"type": "image"}`` parts, in order (as many parts
as images, else ``image_count_mismatch``).
PIL is imported only when a row has images.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from hpcinfer.io.rows import BadRow, InputRow, excerpt, has_image_parts


class RowImageLoader:
    def __init__(self, media_dirs: tuple[str, ...], max_images: int, takes_images: bool):
        # real paths, so a symlinked media dir still contains the files under it
        self.media_dirs = tuple(os.path.realpath(d) for d in media_dirs)
        self.max_images = max_images
        self.takes_images = takes_images

    def load(self, item: InputRow | BadRow) -> InputRow | BadRow:
        """The row with its images decoded (unchanged without images), or its BadRow."""
        if isinstance(item, BadRow):
            return item
        is_chat = item.messages is not None and (bool(item.images)
                                                 or has_image_parts(item.messages))
        if not item.images and not is_chat:
            return item
        from hpcinfer.multimodal.media import MediaError
        try:
            self._check_allowed(item, is_chat)
            if is_chat:
                return dataclasses.replace(item, messages=self._chat_images(item), images=())
            return dataclasses.replace(item, images=self._column_images(item))
        except MediaError as e:
            return _bad(item, e.kind, str(e))
        except ValueError as e:    # a malformed image_url part
            return _bad(item, "bad_image", str(e))

    def _check_allowed(self, row: InputRow, is_chat: bool) -> None:
        from hpcinfer.multimodal.media import JOB_IMAGE_LIMIT, MediaError, check_image_count
        count = len(row.images)
        if is_chat:
            count += _count_parts(row.messages, "image_url")
        if not self.takes_images:
            raise MediaError("images_not_supported", f"the row has {count} image(s) but the "
                             "model takes no images: use a vision-language model "
                             "(docs/vision.md) or drop the images")
        if is_chat and _count_parts(row.messages, "image") != len(row.images):
            raise MediaError("image_count_mismatch", f"the messages have "
                             f"{_count_parts(row.messages, 'image')} {{\"type\": \"image\"}} "
                             f"part(s) but the image column holds {len(row.images)} image(s): "
                             "one part per image, in order")
        check_image_count(count, self.max_images, "the row", JOB_IMAGE_LIMIT, unit="row")

    def _column_images(self, row: InputRow) -> tuple:
        from hpcinfer.multimodal.media import open_image_bytes, open_local_image
        base = Path(row.file).parent
        images = []
        for i, ref in enumerate(row.images):
            where = f"image {i}"
            if isinstance(ref, bytes):
                images.append(open_image_bytes(ref, where, "the image bytes"))
            elif "://" in ref or ref.startswith("data:"):
                images.append(self._url_image(ref, where))
            else:
                images.append(open_local_image(base / ref, self.media_dirs, where))
        return tuple(images)

    def _url_image(self, url: str, where: str):
        from hpcinfer.multimodal.media import load_image_url
        return load_image_url(url, where, self.media_dirs)

    def _chat_images(self, row: InputRow) -> list:
        """The messages with each image_url part, and each {"type": "image"} part (the image
        column's next image), replaced by an image_pil part (decoded)."""
        column = iter(self._column_images(row))
        messages = []
        for m, message in enumerate(row.messages):
            if not isinstance(message.get("content"), list):
                messages.append(message)
                continue
            parts = []
            for p, part in enumerate(message["content"]):
                if part.get("type") == "image_url":
                    image = self._url_image(part["image_url"], f"message {m}, part {p}")
                    part = {"type": "image_pil", "image_pil": image}
                elif part.get("type") == "image":
                    part = {"type": "image_pil", "image_pil": next(column)}
                parts.append(part)
            messages.append({**message, "content": parts})
        return messages


def _count_parts(messages: list, kind: str) -> int:
    return sum(1 for m in messages for p in _parts(m) if p.get("type") == kind)


def _parts(message: dict) -> list:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _bad(row: InputRow, kind: str, reason: str) -> BadRow:
    content: Any = row.prompt if row.prompt is not None else (row.body or row.messages)
    return BadRow(row.index, row.file, row.id, kind, reason, excerpt(content))
