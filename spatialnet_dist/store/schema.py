"""The shard schema: the one module that both the writer and every reader import.

One tar sample per image; members share the key `<image_id>`, and one image member per sample:
  `<key>.png`  8-bit images with 1, 3 or 4 bands (lossless; the default)
  `<key>.jpg`  8-bit images with 1 or 3 bands, converted with `--image-format jpeg` (lossy, ~5x faster to decode)
  `<key>.webp` 8-bit images with 3 or 4 bands, converted with `--image-format webp` (lossy)
  `<key>.npy`  anything else (more bands, 16-bit, float), saved without pickle
  `<key>.json` the record below
An image the asked format cannot hold (JPEG has no alpha; WebP no single band) is stored as PNG. Readers take
every member kind whatever the manifest's "image_format" says.
See DESIGN.md, CONTRACT: shards.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from spatialnet_dist.errors import UserError

SCHEMA_VERSION = 2  # 2 added the record's "tags" and the manifest's "tags"/"tag_counts"
READABLE_SCHEMA_VERSIONS = (1, 2)  # version 1 shards and manifests read as having no tags
QA_TYPES_KNOWN = ("count", "presence", "comp", "rural_urban", "area", "position")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# The most pixels an image may have, at conversion, in a shard and at prediction: one above it is refused by
# name from its header, before it is decoded (8-bit RGB at the limit is already 300 MB). PIL's own
# decompression-bomb check, for every image this process opens, uses the same limit.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class SchemaError(UserError):
    """A record or tar sample that does not follow the schema; the message names it."""


@dataclass
class Sample:
    """One image with everything the corpora say about it."""

    corpus: str
    image_id: str
    split: str
    image: np.ndarray  # (H, W, C), uint8 for PNG-able images, else any numeric dtype
    label: int | None = None
    label_name: str | None = None
    captions: list[str] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)  # {"qid", "question", "answer", "type"}
    tags: list[str] = field(default_factory=list)  # names of what the image shows (multi-label); [] when unknown
    meta: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The JSON member, without the image."""
        return {
            "corpus": self.corpus,
            "image_id": self.image_id,
            "split": self.split,
            "label": self.label,
            "label_name": self.label_name,
            "captions": list(self.captions),
            "qa": [dict(q) for q in self.qa],
            "tags": list(self.tags),
            "meta": dict(self.meta),
        }


def shard_name(corpus: str, split: str, generation: str, index: int) -> str:
    """`generation`: the conversion's id, so that a re-conversion never writes over the shards that the
    manifest it replaces lists (readers take names from the manifest only)."""
    return f"{corpus}-{split}-{generation}-{index:06d}.tar"


def shard_path(corpus: str, split: str, generation: str, index: int) -> str:
    """Path of a shard relative to the store root."""
    return f"{corpus}/{split}/{shard_name(corpus, split, generation, index)}"


def manifest_path(corpus: str) -> str:
    return f"{corpus}/manifest.json"


def check_image_id(image_id: str) -> str:
    # WebDataset splits a member name at its first dot: a dot in the key would split the sample.
    if not _KEY_RE.match(image_id):
        raise SchemaError(f"image_id {image_id!r}: use letters, digits, '_' and '-' only (no dots)")
    return image_id


def check_pixels(height: int, width: int) -> None:
    """Raises SchemaError when a height x width image is above MAX_IMAGE_PIXELS."""
    if height * width > MAX_IMAGE_PIXELS:
        raise SchemaError(f"{width}x{height} image: {height * width} pixels, above the limit of {MAX_IMAGE_PIXELS} "
                          "(store/schema.py MAX_IMAGE_PIXELS)")


def as_hwc(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 1); (H, W, C) unchanged."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim != 3:
        raise SchemaError(f"image with shape {image.shape}: expected (H, W) or (H, W, C)")
    return image


# How an image of another size than its corpus's nominal size is stored (named in the manifest).
FIT_RULE = "center-crop-resize"


def fit_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """FIT_RULE: (H, W, C) -> (size[0], size[1], C), same dtype. The centre is cropped to the target's
    aspect ratio (no distortion; 242x256 loses 7 columns a side), then resized bicubic, antialiased
    when shrinking (PIL). 8-bit 1/3/4-band images resize as they are, anything else band by band."""
    image = as_hwc(image)
    (h, w), (th, tw) = image.shape[:2], size
    if min(h, w) < 1:
        raise SchemaError(f"image with shape {image.shape}: nothing to resize")
    if h * tw > w * th:  # taller than the target: crop rows
        keep = max(1, round(w * th / tw))
        image = image[(h - keep) // 2 : (h - keep) // 2 + keep]
    elif h * tw < w * th:  # wider: crop columns
        keep = max(1, round(h * tw / th))
        image = image[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    if image.shape[:2] == (th, tw):
        return np.ascontiguousarray(image)
    if image_ext(image) == "png":
        pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
        return as_hwc(np.asarray(pil.resize((tw, th), Image.BICUBIC)))
    bands = [Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32), mode="F") for c in range(image.shape[2])]
    out = np.stack([np.asarray(b.resize((tw, th), Image.BICUBIC)) for b in bands], axis=-1)  # (th, tw, C) float32
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype)


# `shards convert --image-format`: the name -> (member extension, PIL format, the band counts it holds).
IMAGE_FORMATS = {"png": ("png", "PNG", (1, 3, 4)), "jpeg": ("jpg", "JPEG", (1, 3)), "webp": ("webp", "WEBP", (3, 4))}
DEFAULT_QUALITY = 90  # --quality of the lossy formats: libjpeg's and libwebp's 0-100 scale
IMAGE_EXTS = ("png", "jpg", "webp", "npy")  # every image member a sample may hold; PIL decodes all but npy


def check_image_format(image_format: str, quality: int) -> None:
    """Raises SchemaError naming the option when `image_format` or `quality` is not one conversion takes."""
    if image_format not in IMAGE_FORMATS:
        raise SchemaError(f"--image-format {image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise SchemaError(f"--quality {quality!r}: expected an integer from 1 to 100")


def image_ext(image: np.ndarray, image_format: str = "png") -> str:
    """The member extension `image` is stored under when `image_format` is asked: that format's where it holds
    the image, else PNG for 8-bit 1/3/4-band images, else npy."""
    image = as_hwc(image)
    if image.dtype != np.uint8:
        return "npy"
    for name in (image_format, "png"):
        ext, _, bands = IMAGE_FORMATS[name]
        if image.shape[2] in bands:
            return ext
    return "npy"


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = DEFAULT_QUALITY) -> tuple[str, bytes]:
    """-> (member extension, bytes) of `image` (H, W, C) in `image_format` where that format holds it."""
    image = as_hwc(image)
    ext = image_ext(image, image_format)
    buf = io.BytesIO()
    if ext == "npy":
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return ext, buf.getvalue()
    pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
    if ext == "png":
        pil.save(buf, format="PNG", compress_level=1)
    else:  # quality, not libwebp's lossless mode: the format is asked for its decode speed and size
        pil.save(buf, format="JPEG" if ext == "jpg" else "WEBP", quality=quality)
    return ext, buf.getvalue()


def decode_image(ext: str, data: bytes) -> np.ndarray:
    """-> (H, W, C) array; raises SchemaError on undecodable bytes or too many pixels (a .npy member holds
    every byte of its array, so only a compressed image can decode to far more than it weighs)."""
    try:
        if ext in ("png", "jpg", "webp"):
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(im.height, im.width)
                return as_hwc(np.asarray(im))
        if ext == "npy":
            return as_hwc(np.load(io.BytesIO(data), allow_pickle=False))
    except SchemaError:
        raise
    except Exception as e:  # PIL and numpy raise many types on corrupt bytes
        raise SchemaError(f"undecodable .{ext} image ({e.__class__.__name__}: {e})") from None
    raise SchemaError(f"unknown image member .{ext}")


_RECORD_FIELDS = {"corpus", "image_id", "split", "label", "label_name", "captions", "qa", "tags", "meta"}  # tags: schema 2


def validate_record(rec: dict) -> dict:
    if not isinstance(rec, dict) or set(rec) - _RECORD_FIELDS:
        unknown = sorted(set(rec) - _RECORD_FIELDS) if isinstance(rec, dict) else None
        raise SchemaError(f"record: expected an object with the fields {sorted(_RECORD_FIELDS)}, got {unknown or rec!r:.60}")
    for key, typ in (("corpus", str), ("image_id", str), ("split", str), ("captions", list), ("qa", list), ("meta", dict)):
        if not isinstance(rec.get(key), typ):
            raise SchemaError(f"record field {key!r}: expected {typ.__name__}, got {rec.get(key)!r:.60}")
    if rec.get("label") is not None and not isinstance(rec["label"], int):
        raise SchemaError(f"record field 'label': expected int or null, got {rec['label']!r}")
    if rec.get("label_name") is not None and not isinstance(rec["label_name"], str):
        raise SchemaError(f"record field 'label_name': expected a string or null, got {rec['label_name']!r:.60}")
    if not all(isinstance(c, str) for c in rec["captions"]):
        raise SchemaError(f"record field 'captions': expected strings, got {rec['captions']!r:.80}")
    tags = rec.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)):
        raise SchemaError(f"record field 'tags': expected a list of names, got {tags!r:.80}")
    for q in rec["qa"]:
        if not (isinstance(q, dict) and {"qid", "question", "answer", "type"} <= set(q) and isinstance(q["question"], str)
                and isinstance(q["type"], str) and isinstance(q["answer"], (str, int, float))):
            raise SchemaError(f"record qa entry {q!r:.80}: needs qid, question (text), answer (text or number), type")
    return rec


def encode_sample(sample: Sample, image_format: str = "png", quality: int = DEFAULT_QUALITY) -> dict[str, bytes]:
    """-> tar members {"__key__": id, "<ext>": image bytes, "json": record bytes}."""
    check_image_id(sample.image_id)
    ext, data = encode_image(sample.image, image_format, quality)
    rec = validate_record(sample.record())
    return {"__key__": sample.image_id, ext: data, "json": json.dumps(rec, ensure_ascii=False).encode()}


def decode_sample(members: dict, image: np.ndarray | None = None) -> Sample:
    """WebDataset sample dict (raw bytes per extension) -> Sample. Raises SchemaError.
    `image`: this sample's image, decoded before (the image member is then not decoded again)."""
    key = members.get("__key__", "?")
    if "json" not in members:
        raise SchemaError(f"sample {key}: no .json member")
    try:
        rec = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError):
        raise SchemaError(f"sample {key}: .json member is not valid JSON") from None
    validate_record(rec)
    if image is None:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise SchemaError(f"sample {key}: no image member (.{', .'.join(IMAGE_EXTS)})")
        try:
            image = decode_image(ext, members[ext])
        except SchemaError as e:
            raise SchemaError(f"sample {key}: {e}") from None
    return Sample(image=image, **rec)
