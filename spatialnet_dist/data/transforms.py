"""Images: any (H, W, C) array from the shards -> the model's normalised (C, S, S) float32 tensor.

Training augments each task's images under its policy, `tasks.<task>.augment`:
- `none`: the image as it is (evaluation and prediction always).
- `symmetry`: one of the 8 symmetries of the square (90-degree rotations, optionally mirrored). They
  move pixels without creating or removing any, so counts, presence and land use stay true; the
  texts of the visit name sides as the moved image shows them (`symmetry.py`).
- `strong` (classification only): a random resized crop of at least STRONG_MIN_AREA of the image,
  brightness/contrast/per-band gain jitter, then a symmetry. Crops can cut objects out, so no task
  whose labels count or describe objects may use it (config validation refuses it).
- `trivial` (the same tasks): the crop and symmetry of `strong`, then one operation of TrivialAugment
  (Mueller & Hutter 2021: one op drawn uniformly, its strength drawn uniformly) from TRIVIAL_OPS, each
  defined for any number of bands on the normalised image (no op needs 8-bit RGB, so a 13-band corpus
  augments like an RGB one): rotation by any angle (overhead imagery has no "up"), shear, translation,
  brightness, contrast, per-band gain and sharpness.
`tasks.<task>.erase_prob` (strong and trivial only) then erases one random rectangle with noise, as
timm's RandomErasing (Zhong et al. 2020) in its per-pixel mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from spatialnet_dist.store.schema import as_hwc
from spatialnet_dist.symmetry import IDENTITY, Symmetry, draw_symmetry

UINT8_MEAN = 0.5  # uint8 images: x / 255, then (x - 0.5) / 0.5 -> [-1, 1] in every band
UINT8_STD = 0.5
# Training image augmentation per task (config tasks.<t>.augment): none | the 8 symmetries of the square, texts
# mapped to match | strong: crop, colour jitter and symmetries, which can change counts and what texts say.
AUGMENT_POLICIES = ("none", "symmetry", "strong", "trivial")
CROPPING_POLICIES = ("strong", "trivial")  # policies that crop and recolour: only a Task with strong_augment
_EPS = 1e-6
# The strong policy, conservative so that the land use stays recognisable:
STRONG_MIN_AREA = 0.6  # a crop keeps 60-100% of the image's area ...
STRONG_MAX_ASPECT = 4 / 3  # ... with a width/height ratio in [3/4, 4/3]
STRONG_BRIGHTNESS = 0.2  # offset in normalised units (uint8 images span [-1, 1])
STRONG_CONTRAST = 0.2  # the image's deviation from its mean scaled by 1 +- this
STRONG_BAND_GAIN = 0.1  # and each band's by 1 +- this (colour balance)
# TrivialAugment's strongest setting of each op (its strength is drawn in [0, 1] x this, either sign):
TRIVIAL_MAX = {"identity": 0.0, "rotate": 180.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.3,
               "translate_y": 0.3, "brightness": 0.4, "contrast": 0.6, "band_gain": 0.3, "sharpness": 0.9}
TRIVIAL_OPS = tuple(TRIVIAL_MAX)
# Random erasing (timm's RandomErasing defaults): a rectangle of 2-33% of the area, aspect 0.3-3.3
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = 0.3


def model_image_size(model_cfg) -> int:
    """The model's input size: `model.image_size`, or the preset's when that is 0."""
    if model_cfg.image_size:
        return model_cfg.image_size
    from spatialnet_dist.networks.encoder import meta_encoder  # lazy: the model package imports timm

    return meta_encoder(model_cfg.preset).patch_embed.img_size[0]


# A corpus's per-band (mean, std), each of shape (C,): store.band_stats.from_manifest.
BandNorm = tuple[np.ndarray, np.ndarray]


def adapt_bands(image: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W, C) -> (H, W, in_chans): the first in_chans bands, or bands repeated in turn (grey -> RGB)."""
    bands = image.shape[2]
    if bands >= in_chans:
        return image[:, :, :in_chans]
    return image[:, :, np.arange(in_chans) % bands]


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) of STRONG_MIN_AREA..1 of the area, aspect 3/4..4/3, inside the image."""
    area = rng.uniform(STRONG_MIN_AREA, 1.0) * height * width
    aspect = math.exp(rng.uniform(-math.log(STRONG_MAX_ASPECT), math.log(STRONG_MAX_ASPECT)))  # width / height
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w


def jitter_(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(C, S, S) normalised, in place -> random brightness, contrast and per-band gain (any number of bands)."""
    gain = (1 + rng.uniform(-STRONG_CONTRAST, STRONG_CONTRAST)) * (
        1 + rng.uniform(-STRONG_BAND_GAIN, STRONG_BAND_GAIN, x.shape[0]))  # (C,)
    mean = float(x.mean())
    scale = torch.from_numpy(gain.astype(np.float32))[:, None, None]  # (C, 1, 1)
    return x.sub_(mean).mul_(scale).add_(mean + rng.uniform(-STRONG_BRIGHTNESS, STRONG_BRIGHTNESS))


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """(C, S, S) sampled through the 2x3 affine map `theta` (output -> input, in [-1, 1] coordinates); pixels
    from outside the image are 0, the normalised mid value."""
    grid = F.affine_grid(torch.tensor([theta], dtype=x.dtype), [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def trivial_op(x: torch.Tensor, op: str, strength: float) -> torch.Tensor:
    """(C, S, S) normalised -> one TrivialAugment op at `strength` in [-1, 1] (its sign the direction)."""
    m = strength * TRIVIAL_MAX[op]
    if op == "rotate":
        c, s = math.cos(math.radians(m)), math.sin(math.radians(m))
        return _affine(x, [[c, -s, 0.0], [s, c, 0.0]])
    if op in ("shear_x", "shear_y"):
        return _affine(x, [[1.0, m, 0.0], [0.0, 1.0, 0.0]] if op == "shear_x" else [[1.0, 0.0, 0.0], [m, 1.0, 0.0]])
    if op in ("translate_x", "translate_y"):
        shift = 2 * m  # a fraction of the side, in [-1, 1] coordinates
        return _affine(x, [[1.0, 0.0, shift], [0.0, 1.0, 0.0]] if op == "translate_x" else [[1.0, 0.0, 0.0], [0.0, 1.0, shift]])
    if op == "brightness":
        return x + m
    if op == "contrast":
        mean = x.mean()
        return (x - mean) * (1 + m) + mean
    if op == "band_gain":  # one band up, the others as drawn: strength's sign picks the direction of the first
        gains = 1 + m * torch.linspace(1, -1, x.shape[0]) if x.shape[0] > 1 else torch.tensor([1 + m])  # (C,)
        return x * gains[:, None, None]
    if op == "sharpness":  # blend with a 3x3 blur: < 0 blurs, > 0 sharpens (PIL's ImageEnhance.Sharpness)
        blurred = F.avg_pool2d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
        return blurred + (x - blurred) * (1 + m)
    return x  # identity


def erase_(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(C, S, S) normalised, in place: one random rectangle replaced by standard-normal noise."""
    _, height, width = x.shape
    for _ in range(10):  # timm's attempts at a box that fits
        area = rng.uniform(*ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(math.log(ERASE_ASPECT), -math.log(ERASE_ASPECT)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            noise = rng.standard_normal((x.shape[0], h, w)).astype(np.float32)
            x[:, top : top + h, left : left + w] = torch.from_numpy(noise)
            break
    return x


def normalize(x: torch.Tensor, band_norm: BandNorm | None = None) -> torch.Tensor:
    """(C, H, W) of any dtype -> float32. uint8: fixed scaling. Other dtypes (16-bit, float, many bands)
    have no common range: with `band_norm`, the corpus's per-band (mean, std) of its training split
    (store/band_stats.py), nodata (NaN) pixels at the mean; without, each band of each image is
    standardised on its own."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).sub_(UINT8_MEAN).div_(UINT8_STD)
    if band_norm is not None:
        mean, std = (torch.from_numpy(np.ascontiguousarray(a, np.float32))[:, None, None] for a in band_norm)  # (C, 1, 1)
        return torch.nan_to_num((x.float() - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)
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
    """(H, W, C) or (H, W) array -> float32 (in_chans, size, size), augmented under the policy `augment`.

    The caller draws the visit's symmetry (`draw_symmetry`) and passes it in, so that the texts of the
    visit can be mapped under the same one; `strong` draws its crop and jitter from `rng`.
    """

    size: int
    in_chans: int
    augment: str = "none"  # one of AUGMENT_POLICIES
    erase_prob: float = 0.0  # chance of one erased rectangle (CROPPING_POLICIES only)

    def __post_init__(self):
        if self.augment not in AUGMENT_POLICIES:
            raise ValueError(f"augment policy {self.augment!r}: expected one of {', '.join(AUGMENT_POLICIES)}")

    def draw_symmetry(self, rng: np.random.Generator | None) -> Symmetry:
        """The symmetry of one image visit: the identity without augmentation (rng unused, may be None)."""
        return IDENTITY if self.augment == "none" else draw_symmetry(rng)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None,
                 symmetry: Symmetry = IDENTITY, band_norm: BandNorm | None = None) -> torch.Tensor:
        """`band_norm`: the image's corpus's per-band (mean, std) for non-uint8 images (see `normalize`)."""
        image = adapt_bands(as_hwc(image), self.in_chans)
        if band_norm is not None:  # the statistics' bands picked as the image's: (1, 1, C) -> (C,)
            band_norm = tuple(adapt_bands(a[None, None], self.in_chans)[0, 0] for a in band_norm)
        x = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # a copy when read-only (cached images)
        x = x.permute(2, 0, 1)  # (C, H, W)
        cropping = self.augment in CROPPING_POLICIES
        if cropping:
            top, left, h, w = crop_box(x.shape[1], x.shape[2], rng)
            x = x[:, top : top + h, left : left + w]
        if x.dtype == torch.uint8:
            x = normalize(resize(x, self.size))  # torch resizes uint8 ~4x faster than float32
        else:
            x = resize(normalize(x, band_norm), self.size)
        if self.augment == "strong":
            x = jitter_(x, rng)  # x is new here: normalize() never returns its input
        elif self.augment == "trivial":
            x = trivial_op(x, TRIVIAL_OPS[int(rng.integers(len(TRIVIAL_OPS)))], float(rng.uniform(-1, 1)))
        if cropping and self.erase_prob and rng.uniform() < self.erase_prob:
            x = erase_(x, rng)  # x is this call's own tensor (normalize and the ops make new ones)
        # After the resize: fewer pixels to move, and resizing to a square commutes with the symmetries.
        return symmetry.apply(x)


def task_transform(cfg, task: str, train: bool) -> ImageTransform:
    """`task`'s image transform: its `tasks.<task>.augment` policy in training; evaluation never augments."""
    task_cfg = getattr(cfg.tasks, task)
    if not train:
        return ImageTransform(model_image_size(cfg.model), cfg.model.in_chans)
    return ImageTransform(model_image_size(cfg.model), cfg.model.in_chans, task_cfg.augment, task_cfg.erase_prob)
