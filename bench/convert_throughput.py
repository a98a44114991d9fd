"""Conversion throughput: does `spatialnet shards convert --workers N` scale with the cores?

A UCM-captions-like source (dataset.json + imgs/*.tif, 256x256 RGB with texture and sensor noise,
so PNG has real work to do) is converted into a fresh local store with 1 worker and with N, in
alternating order, `--repeats` times; a conversion's time is its whole wall time (reading the
source, the worker pool's start, encoding, the shuffle into shards, the manifest). Images per second
are medians over the repeats; `speedup_range` gives the spread of the per-repeat ratios.
Target (issue 14): speedup >= 1.7 with 2 workers on a 2-core machine. Nothing is asserted.

    python bench/convert_throughput.py [--images 1200] [--workers 2] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from spatialnet_dist.corpora import convert  # noqa: E402
from spatialnet_dist.corpora.ucm_captions import UCM_CLASSES, UCM_IMAGES_PER_CLASS  # noqa: E402


def aerial_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """(size, size, 3) uint8: smooth fields of a few colours (upsampled 8x8 noise) plus sensor noise."""
    coarse = rng.integers(40, 220, (8, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    return np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)


def make_source(folder: Path, images: int, seed: int = 0) -> Path:
    """A Karpathy-style dataset.json + imgs/<n>.tif, sorted by class as UCM-captions is."""
    rng = np.random.default_rng(seed)
    (folder / "imgs").mkdir(parents=True)
    entries = []
    for imgid in range(images):
        name = f"{imgid}.tif"
        Image.fromarray(aerial_like(rng)).save(folder / "imgs" / name)
        topic = UCM_CLASSES[(imgid // UCM_IMAGES_PER_CLASS) % len(UCM_CLASSES)]
        split = ("train", "train", "train", "train", "train", "train", "train", "train", "val", "test")[imgid % 10]
        sentences = [{"raw": f"There is a {topic} area with {k} parts."} for k in range(5)]
        entries.append({"filename": name, "imgid": imgid % 2100, "split": split, "sentences": sentences})
    (folder / "dataset.json").write_text(json.dumps({"images": entries}))
    return folder


def time_convert(src: Path, out: Path, workers: int) -> float:
    """Seconds of one conversion; its own lines go to stderr (stdout holds the result only)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = convert("ucm-captions", src, str(out), workers=workers)
    if code != 0:
        raise SystemExit(f"convert exited {code}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200, help="images in the generated source (default 1200)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the parallel run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs, 1 worker and N, alternating (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object, alone on stdout")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        src = make_source(Path(tmp) / "src", a.images)
        seconds: dict[int, list[float]] = {1: [], a.workers: []}
        for repeat in range(a.repeats):
            order = (1, a.workers) if repeat % 2 == 0 else (a.workers, 1)  # neither always runs first
            for workers in order:
                seconds[workers].append(time_convert(src, Path(tmp) / f"out-{repeat}-{workers}", workers))
    ratios = [one / n for one, n in zip(seconds[1], seconds[a.workers])]
    result = {
        "images_per_s_1": round(a.images / statistics.median(seconds[1]), 1),
        "images_per_s_n": round(a.images / statistics.median(seconds[a.workers]), 1),
        "workers": a.workers,
        "speedup": round(statistics.median(seconds[1]) / statistics.median(seconds[a.workers]), 2),
        "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "images": a.images,
        "repeats": a.repeats,
        "cpus": os.cpu_count(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    if a.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22s} {value}")


if __name__ == "__main__":
    main()
