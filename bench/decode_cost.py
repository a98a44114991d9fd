"""Decode cost per image: what one loader worker spends turning a stored image into pixels.

Synthetic scenes (spatialnet_dist.corpora.synthetic) at their native 256 px, each encoded once as
  png_fast   what the shards hold (store.schema.encode_image: PNG, compress_level=1)
  png_6      PNG at Pillow's default compression (smaller files, the same pixels)
  npy        raw uint8 array (the store's format for non-PNG images; no decompression at all)
  jpeg_95    JPEG quality 95, for reference only: lossy, not a storage option of the store
then decoded --repeats times each through the store's own decode_image (JPEG through Pillow); the
median ms per image and the bytes per image. At N ms per image one loader worker delivers 1000/N rows/s
before transforms; the GPU check's model rate says how many workers that takes.

    python bench/decode_cost.py [--images 32] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from spatialnet_dist.corpora.synthetic import generate  # noqa: E402
from spatialnet_dist.store.schema import decode_image, encode_image  # noqa: E402


def encodings(image: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """format name -> (extension, bytes) of one (H, W, 3) uint8 image."""
    out = {"png_fast": encode_image(image)}
    for name, kwargs in (("png_6", {"format": "PNG"}), ("jpeg_95", {"format": "JPEG", "quality": 95})):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, **kwargs)
        out[name] = ("png" if name.startswith("png") else "jpeg", buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    out["npy"] = ("npy", buf.getvalue())
    return out


def decode(ext: str, data: bytes) -> np.ndarray:
    if ext == "jpeg":
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)
    return decode_image(ext, data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the images (the median counts)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    encoded = [encodings(sample.image) for sample in generate(a.images, seed=0)]
    result = {"images": a.images, "image_px": decode(*encoded[0]["npy"]).shape[0]}
    for name in encoded[0]:
        passes = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for item in encoded:
                decode(*item[name])
            passes.append((time.perf_counter() - t0) / a.images * 1e3)
        result[f"{name}_ms"] = round(statistics.median(passes), 3)
        result[f"{name}_kb"] = round(sum(len(item[name][1]) for item in encoded) / a.images / 1024, 1)
    print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
