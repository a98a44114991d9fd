"""What `spatialnet infer` writes: its Parquet parts (GeoParquet 1.1 for rasters), the manifest of done parts, and
the class maps. The layout under OUT (local or s3://):

  parts/<part>.parquet        one per input part (a shard; a scene's band of tile rows), its rows sorted by key
  manifest.json               {"model", "model_sha256", "settings", "parts": {part: {"rows", "nodata_tiles"}},
                              "bad": {part: {"source", "reason"}}, "rows", "nodata_tiles", "bad_inputs"}
  class_maps/<scene>.class.tif, <scene>.probabilities.tif   with --class-map

A part is complete or absent: its bytes go to storage.write_bytes_atomic (temp + rename; on S3 one PUT), and the
manifest follows each part. The manifest is derived state: a rerun rebuilds the list of done parts by listing
parts/ (a kill between a part and its manifest entry loses nothing), reading each part's counts from its own
Parquet metadata.

GeoParquet: the tile's window as a WKB polygon (`geometry`, in the scene's CRS, exterior ring counter-clockwise),
a `bbox` struct column as its covering, and the file's "geo" metadata with the CRS as PROJJSON (pyproj, from the
GeoTIFF's EPSG code; null, "unknown", for a scene without one: its polygons are then in pixel coordinates).
"""

from __future__ import annotations

import functools
import io
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spatialnet_dist import tasks as registry
from spatialnet_dist import versions
from spatialnet_dist.store import storage

PARTS, MANIFEST, CLASS_MAPS = "parts", "manifest.json", "class_maps"
PART_COUNTS_KEY = b"spatialnet.infer"  # a part's {"rows", "nodata_tiles", "source"} in its Parquet metadata

_BBOX = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())])
KEY_FIELDS = {"shards": [("source", pa.string()), ("image_id", pa.string()), ("label_name", pa.string())],
              "rasters": [("source", pa.string()), ("tile_row", pa.int32()), ("tile_col", pa.int32()),
                          ("x", pa.int32()), ("y", pa.int32()), ("width", pa.int32()), ("height", pa.int32())]}


def schema(kind: str, tasks: list[str], embeddings: bool, class_probabilities: bool) -> pa.Schema:
    """The columns of a run: its input kind's keys, each head's fields (Task.infer_fields), then the extras asked for."""
    fields = list(KEY_FIELDS[kind])
    for task in tasks:
        fields += registry.get(task).infer_fields()
    if embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    if class_probabilities:  # every class's probability, the model's class order: what the class map averages
        fields.append(("class_probabilities", pa.list_(pa.float32())))
    if kind == "rasters":
        fields += [("geometry", pa.binary()), ("bbox", _BBOX)]
    return pa.schema(fields)


def polygon_wkb(minx: float, miny: float, maxx: float, maxy: float) -> bytes:
    """A rectangle as WKB (little-endian Polygon, one ring of 5 points, counter-clockwise)."""
    ring = (minx, miny, maxx, miny, maxx, maxy, minx, maxy, minx, miny)
    return struct.pack("<BIII10d", 1, 3, 1, 5, *ring)


def polygon_bounds(wkb: bytes) -> tuple[float, float, float, float]:
    """The (minx, miny, maxx, maxy) of a rectangle `polygon_wkb` wrote (for readers without shapely)."""
    ring = struct.unpack_from("<10d", wkb, 13)
    xs, ys = ring[0::2], ring[1::2]
    return min(xs), min(ys), max(xs), max(ys)


@functools.lru_cache(maxsize=64)
def _projjson_text(epsg: int) -> str:
    versions.require("pyproj")
    import pyproj

    return json.dumps(pyproj.CRS.from_epsg(epsg).to_json_dict())


def projjson(epsg: int | None) -> dict | None:
    """The CRS of an EPSG code as PROJJSON (pyproj), or None when there is no code."""
    return None if epsg is None else json.loads(_projjson_text(epsg))  # pyproj's lookup, once per code


def geo_metadata(bounds: list[tuple[float, float, float, float]], crs: dict | None) -> dict:
    """GeoParquet 1.1 file metadata of a part's `geometry` column with its `bbox` covering."""
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    bbox = [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())] if len(b) else []
    column = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs, "orientation": "counterclockwise",
              "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}
    if bbox:
        column["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def part_bytes(rows: list[dict], sch: pa.Schema, counts: dict, crs: dict | None = None) -> bytes:
    """One part as Parquet bytes: `rows` (already sorted) in `sch`, its counts (and for rasters the geo metadata)
    in the file's key-value metadata."""
    if "geometry" in sch.names:
        bounds = [r.pop("_bounds") for r in rows]
        for r, (minx, miny, maxx, maxy) in zip(rows, bounds):
            r["geometry"] = polygon_wkb(minx, miny, maxx, maxy)
            r["bbox"] = {"xmin": minx, "ymin": miny, "xmax": maxx, "ymax": maxy}
    table = pa.Table.from_pylist([{k: r.get(k) for k in sch.names} for r in rows], schema=sch)
    metadata = {PART_COUNTS_KEY: json.dumps(counts).encode()}
    if "geometry" in sch.names:
        metadata[b"geo"] = json.dumps(geo_metadata(bounds, crs)).encode()
    table = table.replace_schema_metadata(metadata)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def part_url(out: str, name: str) -> str:
    return storage.join(out, PARTS, f"{name}.parquet")


def write_part(out: str, name: str, data: bytes) -> None:
    storage.write_bytes_atomic(part_url(out, name), data)


def part_counts(out: str, name: str) -> dict:
    """A written part's {"rows", "nodata_tiles", "source"}, from its Parquet footer."""
    data = storage.read_bytes(part_url(out, name))
    return json.loads(pq.read_metadata(io.BytesIO(data)).metadata[PART_COUNTS_KEY])


def written_parts(out: str) -> list[str]:
    """Names of the parts under OUT/parts (complete: only a rename or a PUT makes one visible)."""
    try:
        names = storage.list_dir(storage.join(out, PARTS))
    except storage.NotFoundError:
        return []
    return [n.removesuffix(".parquet") for n in names if n.endswith(".parquet") and not n.startswith(".")]


def read_manifest(out: str) -> dict | None:
    url = storage.join(out, MANIFEST)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def write_manifest(out: str, manifest: dict) -> None:
    parts = manifest["parts"]
    manifest.update(rows=sum(p["rows"] for p in parts.values()),
                    nodata_tiles=sum(p["nodata_tiles"] for p in parts.values()), bad_inputs=len(manifest["bad"]))
    storage.write_bytes_atomic(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_rows(out: str, names: list[str]) -> list[dict]:
    """The rows of the named parts, in name order (the dataset's order)."""
    rows: list[dict] = []
    for name in sorted(names):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(part_url(out, name)))).to_pylist()
    return rows


def write_class_map(out: str, scene: str, rows: list[dict], grid: tuple[int, int], stride: int, georef) -> None:
    """A scene's class map at one pixel per tile step (`grid` (rows, cols) of cells, each `stride` pixels): each
    cell the mean of the class probabilities of the tiles covering it (overlapping tiles averaged), then its
    argmax (uint16; 65535 where no tile was predicted: all-nodata tiles). Georeferenced like the scene, pixels
    `stride` times larger; written as <scene>.class.tif and <scene>.probabilities.tif (float32, a band per class,
    NaN where no tile)."""
    import tifffile

    ny, nx = grid
    classes = len(rows[0]["class_probabilities"]) if rows else 1
    total = np.zeros((ny, nx, classes), np.float64)  # (cells down, across, K)
    seen = np.zeros((ny, nx), np.int32)
    for r in rows:
        r0, r1 = r["y"] // stride, -(-(r["y"] + r["height"]) // stride)
        c0, c1 = r["x"] // stride, -(-(r["x"] + r["width"]) // stride)
        total[r0:r1, c0:c1] += np.asarray(r["class_probabilities"], np.float64)
        seen[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total / seen[:, :, None]).astype(np.float32)  # NaN where unseen
    argmax = np.where(seen > 0, np.nan_to_num(mean, nan=-1).argmax(-1), 65535).astype(np.uint16)  # (ny, nx)
    tags = georef.coarser(stride).geotiff_tags() if georef is not None else []
    for suffix, array, nodata in ((".class.tif", argmax, "65535"),
                                  (".probabilities.tif", np.moveaxis(mean, -1, 0), "nan")):
        sink = io.BytesIO()
        tifffile.imwrite(sink, array, photometric="minisblack", planarconfig="separate" if array.ndim == 3 else None,
                         extratags=[*tags, (42113, "s", 0, nodata, True)])
        storage.write_bytes_atomic(storage.join(out, CLASS_MAPS, scene + suffix), sink.getvalue())
