"""vLLM's ``VideoAsset``, so scripts that import it load; hpcinfer takes no video input yet."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoAsset:
    name: str
    num_frames: int = -1

    def __post_init__(self) -> None:
        raise ValueError(f"VideoAsset({self.name!r}): hpcinfer takes images, not video, for "
                         "now (docs/vision.md): use the image modality")
