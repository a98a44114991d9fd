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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from spatialnet_dist.errors import UserError
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
    by `store.schema.FIT_RULE` and counts them (None: images are stored at the size they have)."""

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


def _read_tiff_fallback(path: Path, pil_error: Exception) -> np.ndarray:
    """Multi-band or 16-bit TIFFs that PIL cannot open, through tifffile when it is installed."""
    try:
        import tifffile
    except ImportError:
        raise ImageError(
            f"not readable by PIL ({pil_error}); multi-band or 16-bit TIFFs need the optional package tifffile"
        ) from None
    try:
        image = np.asarray(tifffile.imread(path))
    except Exception as e:  # tifffile raises many types on corrupt files
        raise ImageError(f"unreadable TIFF ({e.__class__.__name__}: {e})") from None
    if image.ndim == 3 and image.shape[0] <= 16 < image.shape[2]:
        image = np.moveaxis(image, 0, -1)  # planar (C, H, W) -> (H, W, C)
    return image


def read_image(path: Path, bands: int) -> np.ndarray:
    """-> (H, W, bands) array: uint8 for 8-bit pictures (stored as PNG), other dtypes as they are
    (stored as NPY). Alpha and palettes become RGB. Raises ImageError naming the problem."""
    if not path.is_file():
        raise ImageError("image file missing")
    try:
        # PIL warns (e.g. "Corrupt EXIF data") on the files it then rejects; the ImageError says it once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                check_pixels(im.height, im.width)
                im.load()
                image = np.asarray(im.convert("RGB") if im.mode in _RGB_MODES else im)
    except SchemaError as e:
        raise ImageError(str(e)) from None
    except Image.DecompressionBombError as e:  # from Image.open, at twice schema.MAX_IMAGE_PIXELS
        raise ImageError(f"image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unknown formats and corrupt data
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise ImageError(f"unreadable image ({e.__class__.__name__}: {e})") from None
        image = _read_tiff_fallback(path, e)
    if image.ndim not in (2, 3):
        raise ImageError(f"image with shape {image.shape}, expected (H, W, bands)")
    try:  # again for tifffile's images, which it can only check decoded; PIL's were checked from their header
        check_pixels(*image.shape[:2])
    except SchemaError as e:
        raise ImageError(str(e)) from None
    image = as_hwc(image)
    if image.shape[2] != bands:
        raise ImageError(f"{image.shape[2]} band(s), expected {bands}")
    return image
