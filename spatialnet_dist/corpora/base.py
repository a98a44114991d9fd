"""What every corpus adapter shares: the adapter protocol, the bad-record type, and the readers of
source files (JSON, images) that turn a broken source into a message naming the file.

An adapter reads one corpus in its published layout and yields one `Sample` per image, or a
`BadRecord` for an image it cannot use; `corpora.convert` writes the samples through the store's
writer and decides what the bad records mean (skip and count, or stop with --strict).
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from spatialnet_dist.errors import UserError
from spatialnet_dist.raster import RasterError, read_raster
from spatialnet_dist.store.schema import Sample, SchemaError, as_hwc, check_pixels

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")

# PIL modes that are colour images in another guise: alpha or padding carries no scene, palettes
# and CMYK/YCbCr are RGB pictures stored differently.
_RGB_MODES = {"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass(frozen=True)
class BadRecord:
    """One source record that cannot become a sample: `record` names it, `path` is the file at fault."""

    record: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.record} ({self.path}): {self.problem}"


class Adapter(Protocol):
    """One corpus in its published layout. `name` is the default corpus name in the store;
    `classes` the land-use class names that `Sample.label` indexes (None: the corpus has no labels);
    `image_size` the corpus's nominal (height, width): the writer fits images of another size to it
    by `store.schema.FIT_RULE` and counts them (None: images are stored at the size they have).
    Adapters that learn their classes from the source (imagefolder, jsonl, csv) set `classes` in
    `records` before it returns; `corpora.get_adapter` gives each conversion its own copy. An adapter that
    merges tags from a table beside its source (ucm-captions --tags) sets `tags_source` in `records` too
    (`tags_source_note`): convert writes it into the manifest and summarises it."""

    name: str
    classes: list[str] | None
    image_size: tuple[int, int] | None
    description: str

    def records(self, src: Path) -> Iterator[Sample | BadRecord]:
        """Check that the source's files exist (UserError naming a missing one) before returning the
        iterator; then one Sample or BadRecord per image. A malformed file raises UserError naming it,
        at the latest when the iterator reaches it (convert then writes nothing)."""
        ...


class ImageError(Exception):
    """An image file that cannot be used; the message says why (the caller names the record)."""


def safe_key(text: str) -> str:
    """A source name as a shard key: anything but letters, digits, '_' and '-' becomes '_'
    ('airport_1.jpg' stem 'airport_1' stays; 'tile 3.v2' -> 'tile_3_v2')."""
    return _UNSAFE_KEY_CHARS.sub("_", text)


def load_json(path: Path, what: str):
    """Parse a JSON file of the source; `what` says what the file is, for the message."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: not found (the {what})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected the {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text at byte {e.start}") from None


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: {what} not found")
    return path


def _read_tiff(path: Path) -> np.ndarray:
    """Multi-band or 16-bit TIFFs (GeoTIFFs of Sentinel-2, Landsat, ...) that PIL cannot open, through the one
    raster reader (spatialnet_dist.raster: tifffile, no GDAL). The pixels are all we keep: (H, W, C)."""
    try:
        return read_raster(str(path))
    except RasterError as e:
        raise ImageError(str(e)) from None


def read_image(path: Path, bands: int | None) -> np.ndarray:
    """-> (H, W, bands) array (bands None: any number): uint8 for 8-bit pictures (stored as PNG), other
    dtypes as they are (stored as NPY). Alpha and palettes become RGB. Raises ImageError naming the problem."""
    if not path.is_file():
        raise ImageError("image file missing")
    tiff = path.suffix.lower() in (".tif", ".tiff")
    try:
        # PIL warns (e.g. "Corrupt EXIF data") on the files it then rejects; the ImageError says it once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                check_pixels(im.height, im.width)
                # A TIFF of several pages is a band stack (one band per page): PIL would read the first only.
                if tiff and getattr(im, "n_frames", 1) > 1:
                    raise ValueError("several pages")
                im.load()
                image = np.asarray(im.convert("RGB") if im.mode in _RGB_MODES else im)
    except SchemaError as e:
        raise ImageError(str(e)) from None
    except Image.DecompressionBombError as e:  # from Image.open, at twice schema.MAX_IMAGE_PIXELS
        raise ImageError(f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unknown formats and corrupt data
        if not tiff:
            raise ImageError(f"unreadable image ({e.__class__.__name__}: {e})") from None
        image = _read_tiff(path)
    if image.ndim not in (2, 3):
        raise ImageError(f"image with shape {image.shape}, expected (H, W, bands)")
    try:  # again for tifffile's images, which it can only check decoded; PIL's were checked from their header
        check_pixels(*image.shape[:2])
    except SchemaError as e:
        raise ImageError(str(e)) from None
    image = as_hwc(image)
    if bands is not None and image.shape[2] != bands:
        raise ImageError(f"{image.shape[2]} band(s), expected {bands}")
    return image


# ---- splits and class lists of corpora that do not come with them (imagefolder, jsonl, csv) ----

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT_RATIO = (0.8, 0.1, 0.1)


def parse_split_ratio(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> the (train, val, test) fractions; a UserError names what is wrong."""
    try:
        ratio = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--split-ratio {text!r}: expected three numbers train,val,test such as 0.8,0.1,0.1") from None
    if len(ratio) != 3 or min(ratio) < 0 or abs(sum(ratio) - 1) > 1e-6 or ratio[0] == 0:
        raise UserError(f"--split-ratio {text!r}: expected three fractions train,val,test >= 0 summing to 1, train > 0")
    return ratio


# An image-only corpus (--unlabeled) is for pretraining: train takes the images, val watches the pretraining
# loss; a test split would judge labels it does not have. The val share is the labelled default's (0.1).
DEFAULT_VAL_FRACTION = DEFAULT_SPLIT_RATIO[1]


def drawn_split_ratio(split_ratio: tuple[float, float, float] | None, val_fraction: float | None,
                      unlabeled: bool) -> tuple[float, float, float]:
    """The (train, val, test) fractions drawn for images without a split: a labelled corpus's --split-ratio
    (default DEFAULT_SPLIT_RATIO); an unlabeled corpus's (1 - f, f, 0) for f = --val-fraction (default
    DEFAULT_VAL_FRACTION). A flag of the other kind is refused (UserError naming it)."""
    if not unlabeled:
        if val_fraction is not None:
            raise UserError("--val-fraction: only with --unlabeled (a labelled corpus's splits: --split-ratio)")
        return split_ratio or DEFAULT_SPLIT_RATIO
    if split_ratio is not None:
        raise UserError("--split-ratio: not with --unlabeled (it has train and val only: --val-fraction)")
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if not 0 <= fraction < 1:
        raise UserError(f"--val-fraction {fraction}: expected a fraction of the images, at least 0 and below 1")
    return (1 - fraction, fraction, 0.0)


def split_by_ratio(n: int, ratio: tuple[float, float, float], seed: int, group: str = "") -> list[str]:
    """The split names of n items of one `group` (a class, or the whole corpus): a permutation seeded by
    (seed, group) cut at the cumulative fractions, so every class is split in the same proportions and
    the same items land in the same splits on every run."""
    bounds = np.rint(np.cumsum(ratio) * n).astype(int)  # ends of train, val, test
    by_position = np.searchsorted(bounds, np.arange(n), side="right")  # 0, 0, ..., 1, ..., 2
    order = np.random.default_rng([seed, zlib.crc32(group.encode())]).permutation(n)
    splits = [""] * n
    for position, item in enumerate(order):
        splits[item] = SPLIT_NAMES[by_position[position]]
    return splits


def read_class_file(path: Path) -> list[str]:
    """A class-order file: one class name per line (blank lines skipped) -> the names; label i is line i."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the class file ({e.__class__.__name__})") from None
    classes = [line.strip() for line in lines if line.strip()]
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or repeated:
        raise UserError(f"{path}: {'class ' + repr(repeated[0]) + ' listed twice' if repeated else 'no class names'}")
    return classes


# ---- tags merged from a table beside the corpus (UCM-captions --tags) ----

TAGS_SOURCE_NAMES_KEPT = 10  # names of unmatched images and rows kept in the note; the rest are counted


def tags_source_note(path: Path, labels: list[str], tagged: int, images_without_row: list[str],
                     rows_without_image: list[str]) -> dict:
    """The manifest's top-level "tags_source": which table the tags came from, its labels, how many of the
    corpus's images it tagged, and the images it has no row for and its rows with no image (counted, the
    first TAGS_SOURCE_NAMES_KEPT named). An image without a row keeps `tags` [] (unknown)."""

    def unmatched(names: list[str]) -> dict:
        return {"count": len(names), "first": names[:TAGS_SOURCE_NAMES_KEPT]}

    return {"file": str(path), "labels": list(labels), "images_tagged": tagged,
            "images_without_row": unmatched(images_without_row), "rows_without_image": unmatched(rows_without_image)}


def describe_tags_source(note: dict) -> str:
    """The conversion's summary of a tags_source note, in one line."""

    def unmatched(key: str, what: str) -> str:
        part = note[key]
        names = ", ".join(part["first"]) + (", ..." if part["count"] > len(part["first"]) else "")
        return f"{part['count']} {what}" + (f" ({names})" if names else "")

    return (f"tags from {note['file']} ({len(note['labels'])} labels): {note['images_tagged']} images tagged, "
            f"{unmatched('images_without_row', 'images without a row')}, "
            f"{unmatched('rows_without_image', 'rows without an image')}")
