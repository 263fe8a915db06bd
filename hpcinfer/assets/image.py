"""vLLM's ``ImageAsset``: a public test image by name
(``ImageAsset("cherry_blossom").pil_image``; where it is kept: assets/base.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcinfer.assets.base import get_vllm_public_assets

VLM_IMAGES_DIR = "vision_model_images"


@dataclass(frozen=True)
class ImageAsset:
    name: str   # e.g. "cherry_blossom", "stop_sign" (vLLM's ImageAssetName)

    def get_path(self, ext: str) -> Path:
        return get_vllm_public_assets(filename=f"{self.name}.{ext}", s3_prefix=VLM_IMAGES_DIR)

    @property
    def pil_image(self):
        from PIL import Image
        return Image.open(self.get_path("jpg"))

    def read_bytes(self, ext: str) -> bytes:
        return self.get_path(ext).read_bytes()
