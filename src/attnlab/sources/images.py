"""Image inputs for vision encoders (ViT, CLIP vision, SigLIP vision): a synthetic image set and its pixel values.

attnlab ships no photographs; :func:`synthetic_images` draws a seeded set of shapes (discs, rectangles,
triangles) over textures (stripes at random angles and frequencies, checkerboards, smooth gradients, noise)
with numpy. :class:`ImageInputs` turns them into ``pixel_values`` with the model's own image processor when the
folder has one, else with plain resizing and normalisation (mean 0.5, std 0.5 per channel; the size from the
config), which it says in :attr:`ImageInputs.source`. These are a labelled synthetic case: real images of the
user's own data set are the first choice for figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..errors import ConfigError


def _texture(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s] / s
    kind = rng.integers(4)
    if kind == 0:  # stripes
        a, f = rng.uniform(0, np.pi), rng.uniform(2, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)))
    elif kind == 1:  # checkerboard
        n = rng.integers(2, 9)
        t = ((np.floor(x * n) + np.floor(y * n)) % 2).astype(float)
    elif kind == 2:  # smooth gradient
        t = rng.uniform() * x + rng.uniform() * y
        t = t / max(t.max(), 1e-9)
    else:  # noise
        t = rng.uniform(size=(s, s))
    colour_a, colour_b = rng.uniform(size=3), rng.uniform(size=3)
    return colour_a * t[..., None] + colour_b * (1 - t[..., None])


def _shape(rng: np.random.Generator, img: np.ndarray) -> None:
    s = img.shape[0]
    y, x = np.mgrid[0:s, 0:s] / s
    cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
    kind = rng.integers(3)
    if kind == 0:
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    elif kind == 1:
        inside = (abs(x - cx) < r) & (abs(y - cy) < r * rng.uniform(0.4, 1.0))
    else:
        inside = (y > cy - r) & (abs(x - cx) < (y - (cy - r)) / 2)
    img[inside] = rng.uniform(size=3)


def synthetic_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` seeded RGB images (n, size, size, 3) uint8: a texture with one to three shapes on it."""
    if n < 1 or size < 8:
        raise ConfigError(f"synthetic images: need n >= 1 and size >= 8 (got n={n}, size={size})")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = _texture(rng, size)
        for _ in range(rng.integers(1, 4)):
            _shape(rng, img)
        out[i] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return out


def _config_size(config: Any) -> tuple[int, int]:
    vc = getattr(config, "vision_config", None) or config
    size = getattr(vc, "image_size", None)
    if size is None:
        raise ConfigError(f"{type(config).__name__} has no image_size: cannot make pixel values for it")
    return int(size if not isinstance(size, (list, tuple)) else size[0]), int(getattr(vc, "num_channels", 3))


@dataclass
class ImageInputs:
    """Pixel values for one vision model: its image processor, or plain normalisation at the config's size."""

    size: int
    channels: int = 3
    processor: Any = None
    source: str = "plain normalisation (resize, mean 0.5, std 0.5)"

    @classmethod
    def for_model(cls, path: Optional[str], config: Any) -> "ImageInputs":
        """The folder's image processor when it has one, else plain normalisation at ``config.image_size``."""
        size, channels = _config_size(config)
        if path is not None:
            try:
                from transformers import AutoImageProcessor

                proc = AutoImageProcessor.from_pretrained(path)
                return cls(size, channels, proc, f"the model's image processor ({type(proc).__name__})")
            except Exception:  # no preprocessor_config.json: the plain path, said in .source
                pass
        return cls(size, channels)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """(n, C, S, S) float32 pixel values of (n, H, W, 3) uint8 images."""
        if self.processor is not None:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"].float()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
        if self.channels != 3:
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        return x.contiguous()

    def synthetic(self, n: int, seed: int = 0) -> torch.Tensor:
        """Pixel values of ``n`` seeded synthetic images (:func:`synthetic_images`)."""
        return self.pixel_values(synthetic_images(n, max(self.size, 32), seed))

    def blank(self, n: int = 1) -> torch.Tensor:
        """Pixel values of ``n`` mid-grey images (the probe's input)."""
        return self.pixel_values(np.full((n, self.size, self.size, 3), 128, dtype=np.uint8))
