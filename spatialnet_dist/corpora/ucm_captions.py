"""Captioning corpora in the Karpathy `dataset.json` layout: UCM-captions, and with labels off its
siblings RSICD and Sydney-captions.

    SRC/dataset.json   {"images": [{"filename", "imgid", "split", "sentids",
                                    "sentences": [{"raw", "tokens", ...}, ...]}, ...]}
    SRC/imgs/<filename>

Splits come from the file. UCM-captions numbers its images class by class, 100 per class, so the
land-use label is `imgid // 100` over the 21 UC Merced classes in alphabetical order. Its images are
nominally 256x256; the published release also holds 44 of other sizes (247x247, 257x257, 242x256, ...),
which the writer fits to 256x256 (the adapter's `image_size`). `--tags FILE` merges the UC Merced
multi-label release into UCM-captions as each image's tags (corpora/ucm_multilabel.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spatialnet_dist.corpora.base import BadRecord, ImageError, load_json, read_image, require_dir, safe_key
from spatialnet_dist.corpora.ucm_multilabel import merge, read_multilabel
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import Sample

UCM_CLASSES = [
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral", "denseresidential",
    "forest", "freeway", "golfcourse", "harbor", "intersection", "mediumresidential", "mobilehomepark",
    "overpass", "parkinglot", "river", "runway", "sparseresidential", "storagetanks", "tenniscourt",
]  # fmt: skip
UCM_IMAGES_PER_CLASS = 100


@dataclass
class KarpathyCaptions:
    """A Karpathy-style captioning corpus. `classes` given: label = imgid // images_per_class.
    `json_names` / `image_dirs`: the names releases use, tried in order; `image_size`: see `base.Adapter`."""

    name: str
    description: str
    classes: list[str] | None = None
    images_per_class: int = UCM_IMAGES_PER_CLASS
    json_names: tuple[str, ...] = ("dataset.json",)
    image_dirs: tuple[str, ...] = ("imgs",)
    bands: int = 3
    image_size: tuple[int, int] | None = None

    def records(self, src: Path) -> Iterator[Sample | BadRecord]:
        json_path, images, image_dir = self._source(src)
        return (self._record(i, entry, json_path, image_dir) for i, entry in enumerate(images))

    def _source(self, src: Path) -> tuple[Path, list, Path]:
        """-> (the caption file, its 'images' list, the image folder); a missing or malformed one is a UserError."""
        src = require_dir(Path(src), "corpus folder")
        json_path = next((src / n for n in self.json_names if (src / n).exists()), src / self.json_names[0])
        doc = load_json(json_path, f"{self.name} caption file")
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list):
            raise UserError(f"{json_path}: expected an object with an 'images' list (Karpathy dataset.json)")
        image_dir = next((src / d for d in self.image_dirs if (src / d).is_dir()), src / self.image_dirs[0])
        require_dir(image_dir, "image folder")
        return json_path, images, image_dir

    def _record(self, i: int, entry, json_path: Path, image_dir: Path) -> Sample | BadRecord:
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            return BadRecord(f"images[{i}]", str(json_path), "no 'filename'")
        filename = entry["filename"]
        record = f"image {filename!r}"

        def bad(problem: str, path: Path = json_path) -> BadRecord:
            return BadRecord(record, str(path), problem)

        split = entry.get("split")
        if not isinstance(split, str) or not split or safe_key(split) != split:
            return bad(f"split {split!r}: expected a name of letters, digits, '_' or '-'")
        captions = [
            s["raw"].strip()
            for s in entry.get("sentences") or []
            if isinstance(s, dict) and isinstance(s.get("raw"), str)
        ]
        captions = [c for c in captions if c]
        if not captions:
            return bad("no captions (sentences[].raw)")
        imgid = entry.get("imgid")
        label = label_name = None
        if self.classes is not None:
            if not isinstance(imgid, int) or isinstance(imgid, bool) or imgid < 0:
                return bad(
                    f"imgid {imgid!r}: expected a non-negative integer (the label is imgid // {self.images_per_class})"
                )
            label = imgid // self.images_per_class
            if label >= len(self.classes):
                return bad(f"imgid {imgid} gives label {label}, outside the {len(self.classes)} classes")
            label_name = self.classes[label]
        image_id = safe_key(Path(filename).stem)
        if not image_id:
            return bad("no file name stem to make an image_id of")
        image_path = image_dir / filename
        try:
            image = read_image(image_path, self.bands)
        except ImageError as e:
            return bad(str(e), image_path)
        return Sample(
            corpus=self.name,
            image_id=image_id,
            split=split,
            image=image,
            label=label,
            label_name=label_name,
            captions=captions,
            meta={"filename": filename, "imgid": imgid},
        )


@dataclass
class UCMCaptions(KarpathyCaptions):
    """UCM-captions, with `tags_file` (--tags) the UC Merced multi-label table merged in by image
    (corpora/ucm_multilabel.py); `tags_source` then notes the merge for the manifest (set by `records`),
    counted over dataset.json's entries (an entry that turns out a bad record still counts as matched)."""

    tags_file: Path | None = None
    tags_source: dict | None = field(default=None, init=False)

    def records(self, src: Path) -> Iterator[Sample | BadRecord]:
        if self.tags_file is None:
            return super().records(src)
        json_path, images, image_dir = self._source(src)
        table = read_multilabel(self.tags_file, self.classes)
        filenames = [e["filename"] for e in images if isinstance(e, dict) and isinstance(e.get("filename"), str)]
        tags, self.tags_source = merge(table, filenames, self.classes, self.images_per_class)
        return (self._tagged(self._record(i, entry, json_path, image_dir), tags) for i, entry in enumerate(images))

    @staticmethod
    def _tagged(record: Sample | BadRecord, tags: dict[str, list[str]]) -> Sample | BadRecord:
        if isinstance(record, Sample):
            record.tags = list(tags.get(record.meta["filename"], []))
        return record


UCM_CAPTIONS = UCMCaptions(
    "ucm-captions",
    "UCM-captions: 2100 UC Merced land-use images, 5 captions each, 21 classes (dataset.json + imgs/)",
    classes=UCM_CLASSES,
    image_size=(256, 256),
)
RSICD = KarpathyCaptions(
    "rsicd",
    "RSICD: 10921 remote sensing images with captions, no labels (dataset_rsicd.json + RSICD_images/)",
    json_names=("dataset_rsicd.json", "dataset.json"),
    image_dirs=("RSICD_images", "imgs"),
)
SYDNEY_CAPTIONS = KarpathyCaptions(
    "sydney-captions", "Sydney-captions: 613 images of Sydney with captions, no labels (dataset.json + imgs/)"
)
