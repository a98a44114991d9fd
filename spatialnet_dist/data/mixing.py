"""Mixup and cutmix of a training sub-batch, as timm's Mixup does them (batch mode, a flipped batch).

A task with tasks/base.MIX_OPTIONS (classification, tagging) and `tasks.<task>.mixup` or `.cutmix` > 0 has each
micro-batch mixed with probability `mix_prob`: with both alphas > 0 it is mixup or cutmix at even odds
(timm's switch_prob 0.5), with one lambda ~ Beta(alpha, alpha) for the micro-batch. Row i mixes with row
B-1-i: mixup blends the images, lam x_i + (1 - lam) x_j; cutmix pastes a box of x_j into x_i (timm's
rand_bbox from lam) and then sets lam to the share of x_i's pixels kept. The task says what the targets become
(`Task.mix_targets`). Evaluation and the other tasks are never mixed; neither is a micro-batch whose draw
keeps it unmixed (lam 1), which stays as it was bit for bit.

The draw is a function of (seed, the task's stream, micro-batch index, rank) (`mix_rng`), like the rows
themselves (data/order.py): the batches stay the same for any number of loader workers and across resume.
Seeding by the stream rather than the task makes tasks that read the same corpora with the same mixing
settings draw the same mix; a mixed row's IMAGE_KEY names its two images and the mix, so those tasks'
mixed rows with the same key hold the same image and still share one row of the micro-batch's images
(batch_format.micro_batch), encoded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spatialnet_dist import tasks as registry
from spatialnet_dist.batch_format import IMAGE_KEY
from spatialnet_dist.data.order import stream_seed

SWITCH_PROB = 0.5  # with both alphas > 0: the chance a mixed micro-batch uses cutmix (timm's switch_prob)


@dataclass(frozen=True)
class MixSettings:
    """A task's tasks.<task>.mixup, cutmix and mix_prob, at least one alpha > 0."""

    mixup: float  # alpha of mixup's Beta(alpha, alpha) lambda; 0: off
    cutmix: float  # alpha of cutmix's lambda; 0: off
    prob: float  # the share of micro-batches mixed


@dataclass(frozen=True)
class Mix:
    """One micro-batch's mix: row i keeps `lam` of its own image."""

    kind: str  # "mixup" | "cutmix"
    lam: float
    box: tuple[int, int, int, int] | None  # cutmix: (top, bottom, left, right), the pixels taken from the partner


def mix_settings(cfg, task: str) -> MixSettings | None:
    """The task's mixing, None when it takes no MIX_OPTIONS or mixes nothing."""
    if "mixup" not in registry.get(task).options:
        return None
    tc = getattr(cfg.tasks, task)
    if tc.mixup == 0 and tc.cutmix == 0 or tc.mix_prob == 0:
        return None
    return MixSettings(tc.mixup, tc.cutmix, tc.mix_prob)


def mix_rng(seed: int, stream: str, index: int, rank: int) -> np.random.Generator:
    """The RNG of micro-batch `index` on `rank` for the tasks reading `stream` (data/order.order_stream)."""
    return np.random.default_rng([stream_seed(seed, stream, "mix"), index, rank])


def draw_mix(settings: MixSettings, rng: np.random.Generator, height: int, width: int) -> Mix | None:
    """timm's Mixup._params_per_batch, then for cutmix cutmix_bbox_and_lam (correct_lam); None: unmixed."""
    if rng.random() >= settings.prob:
        return None
    cutmix = rng.random() < SWITCH_PROB if settings.mixup > 0 and settings.cutmix > 0 else settings.cutmix > 0
    alpha = settings.cutmix if cutmix else settings.mixup
    lam = float(rng.beta(alpha, alpha))
    box = None
    if cutmix:
        box = rand_box(rng, lam, height, width)
        top, bottom, left, right = box
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return None if lam == 1.0 else Mix("cutmix" if cutmix else "mixup", lam, box)


def rand_box(rng: np.random.Generator, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
    """timm's rand_bbox (no margin): a box of sides sqrt(1 - lam) of the image's around a uniform centre,
    clipped to the image (so its area may be less than 1 - lam)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height)),
            int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width)))


def mix_sub_batch(sub: dict, task: str, settings: MixSettings, rng: np.random.Generator) -> dict:
    """A training sub-batch (after collate) mixed as `rng` draws, or `sub` itself when the draw keeps it unmixed."""
    images = sub["image"]  # (B, C, H, W)
    mix = draw_mix(settings, rng, *images.shape[-2:])
    if mix is None:
        return sub
    partner = torch.arange(len(images) - 1, -1, -1)  # (B,): timm flips the batch
    if mix.box is None:
        mixed = mix.lam * images + (1 - mix.lam) * images[partner]
    else:
        top, bottom, left, right = mix.box
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[partner, :, top:bottom, left:right]
    keys = sub[IMAGE_KEY]
    mixed_keys = [f"mix({key},{keys[j]},{mix.kind},{mix.lam!r},{mix.box})" if key and keys[j] else ""
                  for key, j in zip(keys, partner.tolist())]
    return {**sub, "image": mixed, IMAGE_KEY: mixed_keys, **registry.get(task).mix_targets(sub, partner, mix.lam)}
