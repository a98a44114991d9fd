"""The synthetic demo corpus `synthetic`: procedural 256x256 aerial-like scenes whose labels, captions and
question/answer pairs are true of the picture.

Each image is one of eight land-use scenes (CLASSES, landuse.py) drawn on a `Scene` (scene.py) from textured
ground and the scene elements, one module each: roads (roads.py), water (water.py) and countable objects,
buildings (buildings.py), trees (trees.py) and cars (cars.py), that never overlap and always lie whole inside
the frame, so the number the drawing placed is the number a viewer can count. Those counts and the masks of
what was drawn (kept in `meta`) are the ground truth for the five captions and the questions (qa.py):
RSVQA-LR's presence, count, comp and rural_urban, and `position` ("is there a road in the top part of the
image?", "are there buildings in the bottom left quarter of the image?"). Questions are
kept so that every question text's answers are balanced (yes/no ~50/50, counts spread over the RSVQA-LR bins
0 / 1-10 / 11-100): neither the type's majority answer nor the text alone tells the answer; the picture does.

Captions (captions.py) state facts of the picture that vary within its class (how many houses, roof and
field colours, how full a parking lot is, where a road or water lies), so that a model must read the picture
to match them; one caption per class cannot.

Tags (multi-label): the kinds of scene element the picture shows (scene.TAGS: building, car, tree, road,
water, field, beach, track, parking-lot), each set by the element that drew it, and only when it was drawn.

Deterministic for a seed: image i depends only on (seed, i). Classes are balanced (each block of 8 images holds
every class once) and splits are 80/10/10 (each block of 10 images holds 8 train, 1 val, 1 test). Captions
and position questions may name sides (left, top, ...) in words that symmetry.py maps under flips and
rotations, so an augmentation that moves the pixels maps their words along.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np

from spatialnet_dist.corpora.synthetic import captions as cap
from spatialnet_dist.corpora.synthetic import qa
from spatialnet_dist.corpora.synthetic.landuse import DRAW
from spatialnet_dist.corpora.synthetic.scene import SURFACES, Scene
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import read_manifest
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.writer import ShardWriter

CORPUS = "synthetic"
CLASSES = ["agricultural", "forest", "residential", "industrial", "water", "highway", "parkinglot", "meadow"]
URBAN_SCENES = frozenset({"residential", "industrial", "highway", "parkinglot"})  # rural_urban answer "urban"
SPLIT_PATTERN = ("train",) * 8 + ("val", "test")
# Scenes that set how often each question is kept (qa.acceptance). The 24 position keys (3 kinds x 8 regions)
# need 1600: with 800, a rarer key's kept answers leaned to one side by the calibration's own sampling
# noise, and the question-only guess beat the majority by 0.057 (tests/test_synthetic.py allows 0.05).
CALIBRATION_IMAGES = 1600
# Fewer images are drawn in the calling process, whose cached calibration later calls reuse (tests write many small
# corpora): a pool starts its processes (~2 s: each imports numpy and this package) and draws the calibration anew.
PARALLEL_MIN_IMAGES = 200


def scene_of(index: int, seed: int) -> str:
    """Class of image `index`: each block of 8 images holds every class once, in a seeded order."""
    order = np.random.default_rng([seed, index // len(CLASSES), 1]).permutation(len(CLASSES))
    return CLASSES[int(order[index % len(CLASSES)])]


def split_of(index: int, seed: int) -> str:
    """Split of image `index`: each block of 10 images holds 8 train, 1 val, 1 test, in a seeded order."""
    order = np.random.default_rng([seed, index // len(SPLIT_PATTERN), 2]).permutation(len(SPLIT_PATTERN))
    return SPLIT_PATTERN[int(order[index % len(SPLIT_PATTERN)])]


def _candidates(rng: np.random.Generator, scene: str, s: Scene) -> list[qa.Candidate]:
    """The image's shortlisted question candidates (qa.shortlist), answers not yet balanced."""
    masks = {kind: s.mask(kind) for kind in qa.POSITION_MIN_PIXELS}
    return qa.shortlist(rng, qa.candidates(scene in URBAN_SCENES, s.counts, s.has, masks))


def _calibration_candidates(index: int) -> list[qa.Candidate]:
    """Calibration scene `index`, from a generator stream no corpus seed uses: its shortlisted candidates."""
    rng = np.random.default_rng([index, 0, 3])  # corpus images use [seed, index, 0]
    scene = CLASSES[index % len(CLASSES)]
    s = Scene(rng, textured=False)
    DRAW[scene](s)
    return _candidates(rng, scene, s)


@functools.cache
def _acceptance() -> dict[tuple, float]:
    """qa.acceptance over CALIBRATION_IMAGES calibration scenes."""
    return qa.acceptance([_calibration_candidates(index) for index in range(CALIBRATION_IMAGES)])


def _extent(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1) bounding box of a (H, W) mask, None when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1] if rows.size else None


def make_sample(index: int, seed: int, acceptance: dict[tuple, float] | None = None) -> Sample:
    """Image `index` of the corpus for `seed`; depends on nothing else (`acceptance`: `_acceptance()`, when the
    caller has it already)."""
    rng = np.random.default_rng([seed, index, 0])
    scene = scene_of(index, seed)
    s = Scene(rng)
    DRAW[scene](s)
    image = s.render()
    image_id = f"syn-{index:06d}"
    return Sample(
        corpus=CORPUS,
        image_id=image_id,
        split=split_of(index, seed),
        image=image,
        label=CLASSES.index(scene),
        label_name=scene,
        captions=cap.captions(rng, scene, cap.facts(scene, s.counts, s.has, s.facts, {k: s.mask(k) for k in SURFACES})),
        qa=qa.questions(rng, image_id, _candidates(rng, scene, s), acceptance or _acceptance()),
        tags=sorted(s.shown),
        meta={
            "scene": scene,
            "counts": dict(s.counts),
            "surfaces": dict(s.has),
            "facts": dict(s.facts),
            "extent": {kind: _extent(s.mask(kind)) for kind in qa.POSITION_MIN_PIXELS},
        },
    )


def _check_args(images: int, seed: int) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise UserError(f"synthetic corpus: images must be a positive integer, got {images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"synthetic corpus: seed must be a non-negative integer, got {seed!r}")


def generate(images: int, seed: int, processes: int = 1) -> Iterator[Sample]:
    """The corpus: `images` samples in index order, deterministic for `seed` (bad arguments raise here, not at the
    first sample). `processes` > 1 draws the calibration and the images in that many processes; the same samples."""
    _check_args(images, seed)
    if processes <= 1:
        return (make_sample(index, seed) for index in range(images))
    return _generate_in_processes(images, seed, processes)


def _generate_in_processes(images: int, seed: int, processes: int) -> Iterator[Sample]:
    # spawn, not fork: the caller may run threads (a Ray driver, torch's pools), which a fork can leave locked
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        acceptance = qa.acceptance(pool.map(_calibration_candidates, range(CALIBRATION_IMAGES), chunksize=50))
        yield from pool.imap(functools.partial(make_sample, seed=seed, acceptance=acceptance), range(images), chunksize=8)


def write_synthetic(out: str, images: int = 600, seed: int = 0, shard_size: int | None = None) -> dict:
    """Generate the corpus and write it as `synthetic` under the store root `out` (local or s3://); -> its manifest.
    Shards as the writer cuts them (at least MIN_SHARDS per split), shuffled with `seed`, at most
    `shard_size` samples each (None: no cap). From PARALLEL_MIN_IMAGES images on, the images are drawn in a
    process per core while this one encodes and writes them (600: 23-27 s -> 15-17 s on 2 cores, the same shards)."""
    _check_args(images, seed)
    processes = (os.cpu_count() or 1) if images >= PARALLEL_MIN_IMAGES else 1
    source = f"procedural: spatialnet_dist.corpora.synthetic, images={images}, seed={seed}"
    with ShardWriter(out, CORPUS, source=source, classes=CLASSES, shard_size=shard_size, shuffle_seed=seed) as writer:
        for sample in generate(images, seed, processes):
            writer.write(sample)
    return read_manifest(out, CORPUS)
