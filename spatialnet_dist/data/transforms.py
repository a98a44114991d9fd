"""Images: any (H, W, C) array from the shards -> the model's normalised (C, S, S) float32 tensor.

Training adds the augmentations that suit overhead imagery: the 8 symmetries of the square
(90-degree rotations, optionally mirrored). They move pixels without creating or removing any,
so counts, presence and land use stay true of the augmented image; crops, scales and colour
jitter could change what the questions and captions say and are deliberately absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spatialnet_dist.store.schema import as_hwc

UINT8_MEAN = 0.5  # uint8 images: x / 255, then (x - 0.5) / 0.5 -> [-1, 1] in every band
UINT8_STD = 0.5
_EPS = 1e-6


def model_image_size(model_cfg) -> int:
    """The model's input size: `model.image_size`, or the preset's when that is 0."""
    if model_cfg.image_size:
        return model_cfg.image_size
    from spatialnet_dist.model.presets import get_preset  # lazy: the model package imports timm

    return get_preset(model_cfg.preset).image_size


def adapt_bands(image: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W, C) -> (H, W, in_chans): the first in_chans bands, or bands repeated in turn (grey -> RGB)."""
    bands = image.shape[2]
    if bands >= in_chans:
        return image[:, :, :in_chans]
    return image[:, :, np.arange(in_chans) % bands]


def random_symmetry(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(C, H, W) -> one of the 8 flips/rotations of the square, uniformly (vertical flip = mirror + 180)."""
    x = torch.rot90(x, k=int(rng.integers(4)), dims=(1, 2))
    return torch.flip(x, dims=(2,)) if rng.integers(2) else x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) of any dtype -> float32. uint8: fixed scaling; other dtypes (16-bit, float, many bands)
    have no common range, so each band of each image is standardised on its own."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).sub_(UINT8_MEAN).div_(UINT8_STD)
    x = torch.nan_to_num(x.float())  # nodata pixels of float rasters
    mean = x.mean(dim=(1, 2), keepdim=True)  # (C, 1, 1)
    std = x.std(dim=(1, 2), keepdim=True)
    return (x - mean) / (std + _EPS)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) uint8 or float -> (C, size, size), antialiased bilinear."""
    if x.shape[1:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


@dataclass(frozen=True)
class ImageTransform:
    """(H, W, C) or (H, W) array -> float32 (in_chans, size, size); with `train`, a random symmetry from `rng`."""

    size: int
    in_chans: int
    train: bool = False

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = adapt_bands(as_hwc(image), self.in_chans)
        x = torch.from_numpy(np.require(image, requirements=["C", "W"]))
        x = x.permute(2, 0, 1)  # (C, H, W)
        if x.dtype == torch.uint8:
            x = normalize(resize(x, self.size))  # torch resizes uint8 ~4x faster than float32
        else:
            x = resize(normalize(x), self.size)
        # After the resize: fewer pixels to move, and resizing to a square commutes with the symmetries.
        return random_symmetry(x, rng) if self.train else x
