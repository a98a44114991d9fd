"""Per-band statistics of a corpus split's rasters, for normalising them in training.

uint8 pictures share one fixed scaling (data/transforms.py). Other images (16-bit, float, many bands:
Sentinel-2 reflectances, DEMs) have no common range, so the writer counts, per split and band, the
finite pixels of every non-uint8 image, their sum and their sum of squares. These are partial sums:
the counts of two halves of a split merge by adding them (`merge`), so conversions that write a split
in parallel combine their workers' counts before the manifest is written. The manifest keeps the
mean and standard deviation they give (`manifest()`), and training normalises a corpus's images by
its train split's (`from_manifest`) instead of standardising each image on its own.

Manifest, per split, when the split holds non-uint8 images:
  "band_stats": {"pixels": [n per band], "mean": [per band], "std": [per band]}
"""

from __future__ import annotations

import numpy as np

from spatialnet_dist.store.schema import SchemaError, as_hwc

STATS_SPLIT = "train"  # the split whose statistics normalise every split of a corpus
_MIN_STD = 1e-6  # a constant band (a mask, an empty channel) is shifted, not blown up


class BandStats:
    """Running per-band pixel count, sum and sum of squares (float64) over non-uint8 images."""

    def __init__(self):
        self.count: np.ndarray | None = None  # (C,) finite pixels per band
        self.sum: np.ndarray | None = None  # (C,)
        self.sum_sq: np.ndarray | None = None  # (C,)

    @property
    def bands(self) -> int:
        return 0 if self.count is None else len(self.count)

    def add(self, image: np.ndarray) -> None:
        """Count one (H, W, C) image; uint8 images are skipped (they have a fixed scaling)."""
        image = as_hwc(image)
        if image.dtype == np.uint8:
            return
        bands = image.shape[2]
        x = np.ascontiguousarray(image.reshape(-1, bands).T, dtype=np.float64)  # (C, H*W): rows reduce ~10x faster
        if np.issubdtype(image.dtype, np.floating):  # nodata pixels of float rasters (NaN) do not count
            finite = np.isfinite(x)
            x, count = np.where(finite, x, 0.0), finite.sum(axis=1)
        else:
            count = np.full(bands, x.shape[1])
        self._accumulate(count, x.sum(axis=1), np.einsum("ij,ij->i", x, x))

    def merge(self, other: BandStats) -> BandStats:
        """Add another part's counts to these (in place); -> self."""
        if other.count is not None:
            self._accumulate(other.count, other.sum, other.sum_sq)
        return self

    def _accumulate(self, count: np.ndarray, total: np.ndarray, total_sq: np.ndarray) -> None:
        if self.count is None:
            self.count, self.sum, self.sum_sq = (np.zeros(len(count), np.float64) for _ in range(3))
        if len(count) != self.bands:
            raise SchemaError(f"image with {len(count)} bands in a split whose other rasters have {self.bands}")
        self.count += count
        self.sum += total
        self.sum_sq += total_sq

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (mean, std) per band, population std, at least _MIN_STD; bands without pixels: 0, 1."""
        n = np.maximum(self.count, 1)
        mean = self.sum / n
        var = np.maximum(self.sum_sq / n - mean**2, 0.0)
        std = np.where(self.count > 0, np.maximum(np.sqrt(var), _MIN_STD), 1.0)
        return mean, std

    def manifest(self) -> dict:
        """{"band_stats": {...}} for a split's manifest entry, or {} when it has no non-uint8 image."""
        if self.count is None:
            return {}
        mean, std = self.mean_std()
        return {"band_stats": {"pixels": [int(n) for n in self.count], "mean": mean.tolist(), "std": std.tolist()}}


def from_manifest(manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """A corpus's normalisation, (mean, std) float32 arrays of shape (C,) from its train split's
    `band_stats`, or None when it has none (uint8 corpora; corpora converted before statistics)."""
    stats = manifest.get("splits", {}).get(STATS_SPLIT, {}).get("band_stats")
    if not stats:
        return None
    return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
