"""The inputs of `spatialnet infer`, cut into parts: a part is the unit of work, of output (one Parquet file named by
it) and of resumption.

- A shard store (`--corpus C --split S`): one part per shard of the split, named by the shard's file.
- Raster files (a file, a folder searched for .tif/.tiff, or a glob; local or s3://): each scene tiled on a grid
  of `tile`-pixel windows every `stride` pixels (the last column and row clipped at the scene's edge, so sides
  need not be multiples of the tile), and one part per band of `rows_per_part` tile rows, named by the scene
  (its file stem and a hash of its path) and that row range.

`read_part` (run in the Ray tasks ahead of the model actors, or in the process itself) reads one part and returns
its model inputs (B, C, S, S) with their key fields; a part it cannot read is returned with an `error` naming the
input (the caller skips and counts it, or stops with --strict).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from spatialnet_dist.corpora.base import safe_key
from spatialnet_dist.errors import UserError
from spatialnet_dist.raster import Raster, RasterError, all_nodata
from spatialnet_dist.store import storage

RASTER_SUFFIXES = (".tif", ".tiff")
PART_BYTES = 128 * 2**20  # model inputs per raster part by default: a part's (B, C, S, S) float32 travels whole


def default_part_tiles(in_chans: int, size: int) -> int:
    """Tiles per raster part (whole tile rows) when --part-tiles is not given: PART_BYTES of model inputs
    (3 bands at 224 px: 222 tiles), at least 16. Each part is one file and one unit of resumption."""
    return max(16, PART_BYTES // (in_chans * size * size * 4))


def tile_starts(side: int, tile: int, stride: int) -> list[int]:
    """Window starts along one side: 0, stride, ... until a window reaches the edge (the last one clipped)."""
    return [k * stride for k in range(math.ceil(max(side - tile, 0) / stride) + 1)]


@dataclass
class Scene:
    path: str
    name: str  # the file stem, made safe, and a hash of the full path: unique among scenes of any folder
    width: int
    height: int
    bands: int
    georef: object  # raster.Georeference or None
    xs: list[int] = field(default_factory=list)  # window starts across
    ys: list[int] = field(default_factory=list)  # and down


def list_rasters(source: str) -> list[str]:
    """A file, a folder (every .tif/.tiff below it) or a glob, local or s3:// -> raster paths, sorted."""
    if storage.is_s3(source):
        if source.lower().endswith(RASTER_SUFFIXES) and not any(c in source for c in "*?["):
            return [source]
        prefix = source.split("*")[0].split("?")[0].rsplit("/", 1)[0] if any(c in source for c in "*?[") else source
        found = [storage.join(prefix, rel) for rel in storage.list_files(prefix)]
        pattern = source if any(c in source for c in "*?[") else None
        return sorted(u for u in found if u.lower().endswith(RASTER_SUFFIXES) and (pattern is None or fnmatch.fnmatch(u, pattern)))
    if os.path.isdir(source):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(source) for f in files
                      if f.lower().endswith(RASTER_SUFFIXES))
    if any(c in source for c in "*?["):
        return sorted(p for p in glob.glob(source, recursive=True) if p.lower().endswith(RASTER_SUFFIXES))
    if os.path.isfile(source):
        return [source]
    raise UserError(f"{source}: no such file, folder or glob of rasters")


def scene_name(path: str) -> str:
    stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{safe_key(stem)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def plan_rasters(source: str, tile: int, stride: int, part_tiles: int
                 ) -> tuple[list[dict], list[Scene], dict[str, dict]]:
    """-> (parts, scenes, bad): every scene's parts; the scenes whose header reads; {scene: {"source", "reason"}}
    for those whose does not (an unreadable or cut file). Any band count: the model takes its first
    `model.in_chans` bands, or repeats them (data/transforms.adapt_bands), as predict does."""
    paths = list_rasters(source)
    if not paths:
        raise UserError(f"{source}: no .tif/.tiff raster found")
    parts, scenes, bad = [], [], {}
    for path in paths:
        name = scene_name(path)
        try:
            with Raster(path) as r:
                scene = Scene(path, name, r.width, r.height, r.bands, r.georef)
        except RasterError as e:
            bad[name] = {"source": path, "reason": str(e)}
            continue
        scene.xs, scene.ys = tile_starts(scene.width, tile, stride), tile_starts(scene.height, tile, stride)
        scenes.append(scene)
        rows_per_part = max(1, part_tiles // len(scene.xs))
        for r0 in range(0, len(scene.ys), rows_per_part):
            r1 = min(r0 + rows_per_part, len(scene.ys))
            parts.append({"kind": "rasters", "name": f"{name}-rows{r0:06d}-{r1:06d}", "scene": name, "path": path,
                          "rows": [r0, r1], "xs": scene.xs, "ys": scene.ys[r0:r1], "tile": tile})
    return parts, scenes, bad


def plan_shards(root: str, corpus: str, split: str) -> tuple[list[dict], dict]:
    """-> (one part per shard of the split, the corpus's manifest); a missing corpus or split is a UserError."""
    from spatialnet_dist.store.band_stats import from_manifest
    from spatialnet_dist.store.manifest import read_manifest, shard_urls

    manifest = read_manifest(root, corpus)
    urls = shard_urls(root, corpus, split, manifest)
    norm = from_manifest(manifest)  # the corpus's band statistics, as evaluation normalises its rasters
    band_norm = None if norm is None else [np.asarray(a).tolist() for a in norm]
    parts = [{"kind": "shards", "name": url.rsplit("/", 1)[-1].removesuffix(".tar"), "url": url,
              "samples": s["samples"], "band_norm": band_norm}
             for url, s in zip(urls, manifest["splits"][split]["shards"])]
    return parts, manifest


def read_part(part: dict, transform) -> dict:
    """One part -> {"name", "keys": [key fields per row], "inputs": (B, C, S, S) float32 array, "nodata_tiles",
    "error": None or "<input>: why"}. `transform`: the Predictor's (evaluate.predict.input_transform)."""
    out = {"name": part["name"], "keys": [], "inputs": None, "nodata_tiles": 0, "error": None}
    tensors: list[torch.Tensor] = []
    try:
        if part["kind"] == "shards":
            _read_shard(part, transform, out["keys"], tensors)
        else:
            out["nodata_tiles"] = _read_tiles(part, transform, out["keys"], tensors)
    except (RasterError, UserError, storage.StoreError, OSError, ValueError) as e:
        where = part.get("path") or part.get("url")
        return {**out, "keys": [], "error": f"{where}: {e}"}
    if tensors:
        out["inputs"] = torch.stack(tensors).numpy()
    return out


def _read_shard(part: dict, transform, keys: list[dict], tensors: list[torch.Tensor]) -> None:
    from spatialnet_dist.data.streams import StreamCounts, decode_one, read_shards

    band_norm = None if part["band_norm"] is None else tuple(np.asarray(a, np.float32) for a in part["band_norm"])
    counts = StreamCounts("infer", max_bad_fraction=0.0, strict=True)  # strict: a bad sample makes the shard bad
    samples = []
    for raw in read_shards([{"url": part["url"], "samples": part["samples"]}], counts):
        samples.append(decode_one(raw, counts))
    for s in sorted(samples, key=lambda s: s.image_id):  # the part's rows in key order
        keys.append({"source": part["url"], "image_id": s.image_id, "label_name": s.label_name})
        tensors.append(transform(s.image, band_norm=band_norm))


def _read_tiles(part: dict, transform, keys: list[dict], tensors: list[torch.Tensor]) -> int:
    """A band of tile rows, read one tile row's window at a time (never the scene): -> tiles all nodata."""
    tile, nodata_tiles = part["tile"], 0
    with Raster(part["path"]) as r:
        for i, y in enumerate(part["ys"]):
            h = min(tile, r.height - y)
            strip = r.window(0, y, r.width, h)  # (h, W, C)
            for j, x in enumerate(part["xs"]):
                w = min(tile, r.width - x)
                pixels = strip[:, x : x + w]  # (h, w, C)
                if all_nodata(pixels, r.nodata):
                    nodata_tiles += 1
                    continue
                bounds = r.georef.bounds(x, y, w, h) if r.georef is not None else (x, y, x + w, y + h)
                keys.append({"source": part["path"], "tile_row": part["rows"][0] + i, "tile_col": j, "x": x, "y": y,
                             "width": w, "height": h, "_bounds": bounds})
                tensors.append(transform(pixels))
    return nodata_tiles
