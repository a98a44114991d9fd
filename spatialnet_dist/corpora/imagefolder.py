"""`imagefolder`: a land-use corpus laid out as one folder per class, the layout of UC Merced, AID,
NWPU-RESISC45, EuroSAT and PatternNet, with no code:

    SRC/<class>/<image>                      splits drawn per class by --split-ratio (default 0.8,0.1,0.1)
    SRC/{train,val,test}/<class>/<image>     splits as the folders say
    SRC/**/<image>  with --unlabeled         an image-only corpus (pretraining, no labels): every image below
                                             SRC at any depth, folders only nest them; train and val drawn by
                                             --val-fraction (default 0.1), no test split

Images are any raster the shard contract allows (8-bit pictures, 16-bit or multi-band TIFFs such as
EuroSAT's 13-band Sentinel-2 tiles); files with other suffixes and hidden files are ignored. The first
image read fixes the corpus's band count; an image with another count is a bad record. Classes are the
folder names in alphabetical order, or the order of a class file (`--classes FILE`, one name per line;
a folder it does not list stops the conversion). The image id is the file stem, prefixed with its class
when the stem does not start with the class name already ('forest/0001.jpg' -> 'forest_0001'); of an
unlabeled corpus, the path below SRC without its suffix ('2021/tile 3.tif' -> '2021_tile_3').
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spatialnet_dist.corpora.base import (
    SPLIT_NAMES,
    BadRecord,
    ImageError,
    drawn_split_ratio,
    read_class_file,
    read_image,
    require_dir,
    safe_key,
    split_by_ratio,
)
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import Sample

IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def _folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def image_tree(folder: Path) -> list[Path]:
    """The image files anywhere below `folder` (hidden folders skipped), sorted by their path."""
    return sorted(p for p in folder.rglob("*") if _is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ConsistentBands:
    """Reads a corpus's images; the first one read fixes the band count that the others must have."""

    def __init__(self):
        self.bands: int | None = None

    def read(self, path: Path) -> np.ndarray:
        """-> (H, W, C); ImageError (also for another band count than the corpus's first image)."""
        image = read_image(path, self.bands)
        self.bands = image.shape[2]
        return image


def load_classes(class_file: Path | None, found: set[str], what: str, source: Path) -> list[str]:
    """The class list: `class_file`'s order (every name in `found` must be in it), else sorted(found)."""
    if class_file is None:
        return sorted(found)
    classes = read_class_file(class_file)
    unknown = sorted(found - set(classes))
    if unknown:
        raise UserError(f"{source}: {what} {unknown[0]!r} is not in the class file {class_file}")
    return classes


@dataclass
class ImageFolder:
    """See the module docstring. `split_ratio` (train, val, test) and `split_seed` draw the splits of a
    folder without split folders; `class_file` fixes the class order. `unlabeled`: every image below SRC,
    no classes, `val_fraction` of them drawn into val (base.drawn_split_ratio)."""

    split_ratio: tuple[float, float, float] | None = None
    class_file: Path | None = None
    split_seed: int = 0
    unlabeled: bool = False
    val_fraction: float | None = None
    name: str = "imagefolder"
    description: str = ("imagefolder: SRC/<class>/<images> or SRC/{train,val,test}/<class>/<images>, labels only; "
                        "--unlabeled: every image below SRC, images only")
    image_size: tuple[int, int] | None = None
    classes: list[str] | None = field(default=None, init=False)  # set by records(src)

    def records(self, src: Path) -> Iterator[Sample | BadRecord]:
        src = require_dir(Path(src), "corpus folder")
        ratio = drawn_split_ratio(self.split_ratio, self.val_fraction, self.unlabeled)
        if self.unlabeled:
            return self._image_only(src, ratio)
        folders = _folders(src)
        split_folders = [f for f in folders if f.name in SPLIT_NAMES]
        if split_folders:
            others = [f.name for f in folders if f.name not in SPLIT_NAMES]
            if others:
                raise UserError(f"{src}: folder {others[0]!r} beside the split folders (expected only train/ val/ test/)")
            if self.split_ratio is not None:
                raise UserError(f"{src}: has split folders; --split-ratio is for a folder of class folders")
            class_dirs = [(f.name, c) for f in split_folders for c in _folders(f)]
        else:
            class_dirs = [(None, c) for c in folders]
        if not class_dirs:
            raise UserError(f"{src}: no class folders (expected SRC/<class>/<images> or SRC/train/<class>/<images>)")
        self.classes = load_classes(self.class_file, {c.name for _, c in class_dirs}, "class folder", src)
        items = []  # (split, class index, image path)
        for split, class_dir in class_dirs:
            files = image_files(class_dir)
            splits = [split] * len(files) if split else split_by_ratio(len(files), ratio, self.split_seed,
                                                                       class_dir.name)
            label = self.classes.index(class_dir.name)
            items += [(s, label, f) for s, f in zip(splits, files)]
        if not items:
            raise UserError(f"{src}: no image files in its class folders ({' '.join(sorted(IMAGE_SUFFIXES))}; "
                            "point SRC at the folder that holds the class folders)")
        return self._records(src, items)

    def _image_only(self, src: Path, ratio: tuple[float, float, float]) -> Iterator[Sample | BadRecord]:
        if self.class_file is not None:
            raise UserError(f"{src}: --classes: an --unlabeled corpus has no classes")
        files = image_tree(src)
        if not files:
            raise UserError(f"{src}: no image files below it ({' '.join(sorted(IMAGE_SUFFIXES))})")
        self.classes = None
        splits = split_by_ratio(len(files), ratio, self.split_seed)  # one draw over the whole corpus
        return self._records(src, [(s, None, f) for s, f in zip(splits, files)])

    def _records(self, src: Path, items: list[tuple[str, int | None, Path]]) -> Iterator[Sample | BadRecord]:
        """(split, class index or None: unlabeled, image path) -> its Sample, or a BadRecord naming the file."""
        reader = ConsistentBands()
        for split, label, path in items:
            class_name = None if label is None else self.classes[label]
            relative = path.relative_to(src).as_posix()
            try:
                image = reader.read(path)
            except ImageError as e:
                yield BadRecord(f"image {relative!r}", str(path), str(e))
                continue
            if class_name is None:
                key = path.relative_to(src).with_suffix("").as_posix()  # its path names an image of a tree
            else:
                key = path.stem if path.stem.lower().startswith(class_name.lower()) else f"{class_name}_{path.stem}"
            yield Sample(
                corpus=self.name,
                image_id=safe_key(key),
                split=split,
                image=image,
                label=label,
                label_name=class_name,
                meta={"path": relative},
            )
