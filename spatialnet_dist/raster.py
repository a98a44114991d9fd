"""The one raster reader: TIFF and GeoTIFF files of any size, read window by window through tifffile (a wheel on
numpy; rasterio would need GDAL), with their georeference from the GeoTIFF keys.

Only the strips or tiles a window touches are read and decoded, so a 10,000 x 10,000 scene is never in memory
at once. Band layouts: one page with its samples interleaved (H, W, C) or in planes (PlanarConfiguration 2),
and a stack of single-band pages of one shape (one band per page). Local paths and s3:// URLs (read by byte
range). corpora/base.py reads whole TIFFs through `read_raster`; evaluate/infer.py reads scenes by window.

Georeference (GeoTIFF 1.1): ModelPixelScaleTag (33550) and ModelTiepointTag (33922), or a ModelTransformationTag
(34264) without rotation, give the world position of pixel (0, 0)'s outer corner and the pixel size;
GeoKeyDirectoryTag (34735) the CRS's EPSG code (ProjectedCSTypeGeoKey 3072, else GeographicTypeGeoKey 2048) and
whether values mark pixel centres (GTRasterTypeGeoKey 1025 = 2, RasterPixelIsPoint: shifted by half a pixel, as
GDAL does). GDAL_NODATA (42113) is the nodata value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PIXEL_SCALE, TIEPOINT, TRANSFORMATION, GEO_KEYS, GDAL_NODATA = 33550, 33922, 34264, 34735, 42113
GEOGRAPHIC_TYPE, PROJECTED_TYPE, RASTER_TYPE = 2048, 3072, 1025
PIXEL_IS_POINT = 2
USER_DEFINED = 32767


class RasterError(Exception):
    """A raster that cannot be read (the message says why; the caller names the file)."""


@dataclass(frozen=True)
class Georeference:
    """Pixel (col, row) -> world (origin_x + col * pixel_width, origin_y - row * pixel_height): north up, rows
    going south. `epsg` None: the CRS is not given by an EPSG code."""

    origin_x: float
    origin_y: float
    pixel_width: float
    pixel_height: float
    epsg: int | None

    def bounds(self, x: int, y: int, width: int, height: int) -> tuple[float, float, float, float]:
        """The pixel window's (minx, miny, maxx, maxy) in world coordinates."""
        left, top = self.origin_x + x * self.pixel_width, self.origin_y - y * self.pixel_height
        return left, top - height * self.pixel_height, left + width * self.pixel_width, top

    def coarser(self, factor: int) -> Georeference:
        """The same origin with pixels `factor` times larger (a map with one pixel per tile step)."""
        return Georeference(self.origin_x, self.origin_y, self.pixel_width * factor, self.pixel_height * factor,
                            self.epsg)

    def geotiff_tags(self) -> list[tuple]:
        """tifffile `extratags` that write this georeference (PixelIsArea)."""
        keys = [1, 1, 0, 0]
        if self.epsg is not None:
            geographic = 4000 <= self.epsg < 5000
            entries = [(1024, 0, 1, 2 if geographic else 1), (RASTER_TYPE, 0, 1, 1),
                       (GEOGRAPHIC_TYPE if geographic else PROJECTED_TYPE, 0, 1, self.epsg)]
            keys[3] = len(entries)
            keys += [v for e in entries for v in e]
        return [(PIXEL_SCALE, "d", 3, (self.pixel_width, self.pixel_height, 0.0), True),
                (TIEPOINT, "d", 6, (0.0, 0.0, 0.0, self.origin_x, self.origin_y, 0.0), True),
                (GEO_KEYS, "H", len(keys), tuple(keys), True)]


def _geo_keys(directory) -> dict[int, int]:
    """GeoKeyDirectoryTag (4 shorts of header, then (key, location, count, value) quadruples) -> {key: value}
    for the keys stored in the directory itself (location 0), which the ones read here all are."""
    values = [int(v) for v in directory]
    return {values[i]: values[i + 3] for i in range(4, 4 + 4 * values[3], 4) if values[i + 1] == 0}


def georeference(tags) -> Georeference | None:
    """A page's tags -> its Georeference, or None when it has none (or only a rotated transformation)."""
    keys = _geo_keys(tags[GEO_KEYS].value) if GEO_KEYS in tags else {}
    code = keys.get(PROJECTED_TYPE) or keys.get(GEOGRAPHIC_TYPE)
    epsg = code if code and code != USER_DEFINED else None
    if PIXEL_SCALE in tags and TIEPOINT in tags:
        sx, sy = (float(v) for v in tags[PIXEL_SCALE].value[:2])
        i, j, _, wx, wy, _ = (float(v) for v in tags[TIEPOINT].value[:6])
        ox, oy = wx - i * sx, wy + j * sy
    elif TRANSFORMATION in tags:
        m = [float(v) for v in tags[TRANSFORMATION].value]
        if m[1] or m[4] or m[5] >= 0:
            return None
        sx, sy, ox, oy = m[0], -m[5], m[3], m[7]
    else:
        return None
    if keys.get(RASTER_TYPE) == PIXEL_IS_POINT:  # values at pixel centres: the corner is half a pixel out
        ox, oy = ox - sx / 2, oy + sy / 2
    return Georeference(ox, oy, sx, sy, epsg)


class _RangeFile:
    """A read-only, seekable file over an s3:// object, read by byte range (tifffile seeks to each segment)."""

    def __init__(self, url: str):
        from spatialnet_dist.store import s3

        self.url, self.pos, self.size = url, 0, s3.size(url)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        from spatialnet_dist.store import storage

        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        data = storage.read_range(self.url, self.pos, n) if n > 0 else b""
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


class Raster:
    """An open TIFF: `height`, `width`, `bands`, `dtype`, `nodata` (None when not given), `georef`; `window`
    reads a pixel window. A context manager; any failure to read is a RasterError."""

    def __init__(self, path: str):
        import tifffile

        self.path = path
        try:
            source = _RangeFile(path) if path.startswith("s3://") else path
            self._tif = tifffile.TiffFile(source)
            first = self._tif.pages.first
            pages = [first]
            if len(self._tif.pages) > 1 and first.samplesperpixel == 1:  # a band stack: every page of one shape
                pages = [p for p in self._tif.pages if p.shape == first.shape and p.dtype == first.dtype]
            self._pages = pages
            planes, _, self.height, self.width, contig = first.shaped  # (S, depth, H, W, s)
            self.bands, self.dtype = len(pages) * planes * contig, np.dtype(first.dtype)
            nodata = first.tags.get(GDAL_NODATA)
            self.nodata = float(str(nodata.value).strip("\x00 ")) if nodata is not None else None
            self.georef = georeference(first.tags)
        except RasterError:
            raise
        except Exception as e:  # tifffile raises many types on corrupt or cut files
            self.close()
            raise RasterError(f"unreadable TIFF (tifffile: {e.__class__.__name__}: {e})") from None

    def __enter__(self) -> Raster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_tif", None) is not None:
            self._tif.close()

    def window(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels [y, y + height) x [x, x + width) -> (height, width, bands), of the raster's dtype."""
        if x < 0 or y < 0 or width < 1 or height < 1 or x + width > self.width or y + height > self.height:
            raise ValueError(f"window {(x, y, width, height)} outside the {self.width} x {self.height} raster")
        try:
            parts = [self._page_window(p, x, y, width, height) for p in self._pages]
        except Exception as e:
            raise RasterError(f"unreadable pixels in window x={x} y={y} {width}x{height} "
                              f"(tifffile: {e.__class__.__name__}: {e})") from None
        return np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]

    def _page_window(self, page, x: int, y: int, width: int, height: int) -> np.ndarray:
        planes, depth, H, W, contig = page.shaped
        if depth != 1:
            raise ValueError("volumetric TIFF (depth > 1)")
        # Segments: tiles (th, tw) in a grid, or strips of `rowsperstrip` full-width rows; each plane in turn.
        th, tw = (page.tilelength, page.tilewidth) if page.is_tiled else (min(page.rowsperstrip or H, H), W)
        rows, cols = math.ceil(H / th), math.ceil(W / tw)
        out = np.zeros((planes, height, width, contig), page.dtype)  # (S, h, w, s)
        decode, fh = page.decode, self._tif.filehandle
        for plane in range(planes):
            for r in range(y // th, (y + height - 1) // th + 1):
                for c in range(x // tw, (x + width - 1) // tw + 1):
                    index = plane * rows * cols + r * cols + c
                    offset, count = page.dataoffsets[index], page.databytecounts[index]
                    if not count:  # an empty segment: nodata (zeros)
                        continue
                    fh.seek(offset)
                    data = fh.read(count)
                    if len(data) < count:
                        raise ValueError(f"file cut short: segment {index} has {len(data)} of {count} bytes")
                    segment = decode(data, index, jpegtables=page.jpegtables)[0]  # (1, th', tw', s)
                    segment = segment.reshape(-1, *segment.shape[-3:])[0]  # (th', tw', s)
                    y0, x0 = r * th, c * tw  # the segment's corner in the page
                    ys, xs = max(y, y0), max(x, x0)
                    ye, xe = min(y + height, y0 + segment.shape[0], H), min(x + width, x0 + segment.shape[1], W)
                    out[plane, ys - y : ye - y, xs - x : xe - x] = segment[ys - y0 : ye - y0, xs - x0 : xe - x0]
        return np.moveaxis(out, 0, 2).reshape(height, width, planes * contig)  # (h, w, S * s)


def read_raster(path: str) -> np.ndarray:
    """A whole TIFF -> (H, W, bands). RasterError naming the problem."""
    with Raster(path) as r:
        return r.window(0, 0, r.width, r.height)


def all_nodata(pixels: np.ndarray, nodata: float | None) -> bool:
    """(h, w, C): every pixel of every band nodata (the value, or NaN for float rasters)."""
    if nodata is None:
        return False
    return bool(np.all(np.isnan(pixels))) if math.isnan(nodata) else bool(np.all(pixels == nodata))
