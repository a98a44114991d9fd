"""Inference throughput: does `spatialnet infer --workers N` scale, and is the loader the bottleneck?

Makes a GeoTIFF scene (uint8 RGB, strips of 16 rows, EPSG:32633) and an untrained inference bundle (`--preset`,
`--image-size`: the tile), then runs `spatialnet infer` over the scene on Ray Data with 1 actor and with N
(`--workers`), each into a fresh OUT, alternating, `--repeats` times. Tiles/s is the run's steady state (from its
first part done to its last: Ray's start and the actors' model loading left out), median over repeats.
`model_tiles_per_s` is the model alone (the Predictor on ready inputs, one thread, the actors' setting), and
`loader_tiles_per_s` the reading and tiling alone (read_part, one process). `cpu_1` / `cpu_n`: the CPU
milliseconds the reads and predictions took per tile, and the cores they kept busy (CPU seconds / wall seconds
of the steady state): on a machine shared with other jobs, a second worker that gets no second core shows as
cores_busy near 1 with the same CPU per tile. Target (issue 27):
tiles_per_s_n >= 0.8 x N x model_tiles_per_s where cores allow, and speedup >= 1.6 with 2 workers on 2 cores.
Nothing is asserted.

    python bench/infer_throughput.py [--workers 2] [--side 12288] [--image-size 128] [--repeats 2] [--json]
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from spatialnet_dist.raster import Georeference  # noqa: E402


def make_scene(path: Path, side: int, seed: int = 0) -> None:
    """(side, side, 3) uint8: smooth fields (upsampled noise) plus sensor noise, georeferenced."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 220, (side // 64 + 1, side // 64 + 1, 3)).astype(np.float32)
    field = np.repeat(np.repeat(coarse, 64, 0), 64, 1)[:side, :side]
    pixels = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
    tags = Georeference(500000.0, 4600000.0, 10.0, 10.0, 32633).geotiff_tags()
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=16, extratags=tags)


def make_bundle(directory: Path, preset: str, image_size: int) -> str:
    from safetensors.torch import save_file

    from spatialnet_dist import checkpoint as ckpt
    from spatialnet_dist import config as config_mod
    from spatialnet_dist.model.spatialnet import build_model
    from spatialnet_dist.text import AnswerVocab, TextVocabs, Vocab

    cfg = config_mod.load(None, [f"model.preset={preset}", f"model.image_size={image_size}",
                                 "tasks.captioning.enabled=false", "tasks.vqa.enabled=false",
                                 "tasks.regression.enabled=false", "tasks.tagging.enabled=false"])
    vocabs = TextVocabs(Vocab.build({}), AnswerVocab.build({}, "exact", 1), [f"class{i}" for i in range(21)])
    torch.manual_seed(0)
    model = build_model(cfg.model, ["classification"], vocabs)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(directory / ckpt.BUNDLE_WEIGHTS))
    (directory / ckpt.CONFIG).write_text(cfg.to_yaml())
    vocabs.save(directory)
    return str(directory)


def model_rate(bundle: str, image_size: int, seconds: float = 8.0) -> float:
    """Tiles/s of the Predictor alone on ready (64, C, S, S) inputs, one thread."""
    from spatialnet_dist.checkpoint_weights import load_model
    from spatialnet_dist.evaluate.predict import Predictor

    torch.set_num_threads(1)
    predictor = Predictor(*load_model(bundle))
    batch = torch.randn(64, 3, image_size, image_size)
    predictor.predict(batch)
    start, tiles = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        predictor.predict(batch)
        tiles += len(batch)
    return tiles / (time.perf_counter() - start)


def loader_rate(scene: Path, bundle: str, image_size: int) -> float:
    from spatialnet_dist.checkpoint import local_copy
    from spatialnet_dist.checkpoint_weights import load_config_and_vocabs
    from spatialnet_dist.evaluate.infer_sources import plan_rasters, read_part
    from spatialnet_dist.evaluate.predict import input_transform

    with local_copy(bundle) as d:
        cfg, _ = load_config_and_vocabs(d)
    parts, _, _ = plan_rasters(str(scene), image_size, image_size, 256)
    start = time.perf_counter()
    tiles = sum(len(read_part(p, input_transform(cfg))["keys"]) for p in parts)
    return tiles / (time.perf_counter() - start)


def run_infer(bundle: str, scene: Path, out: Path, workers: int, part_tiles: int) -> dict:
    from spatialnet_dist.evaluate.infer import infer

    with contextlib.redirect_stdout(sys.stderr):
        result = infer(bundle, str(scene), str(out), workers=workers, use_ray=True, part_tiles=part_tiles,
                       progress=False)
    return {k: result[k] for k in ("tiles_per_s", "cpu_ms_per_tile", "cores_busy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--side", type=int, default=12288, help="scene side in pixels (9,216 tiles of 128 px: the steady state dominates)")
    p.add_argument("--image-size", type=int, default=128, help="the model's input and the tile, pixels")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--part-tiles", type=int, default=384, help="tiles per part (the CLI default: 128 MB of inputs)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        tmp = Path(tmp)
        scene = tmp / "scene.tif"
        make_scene(scene, a.side)
        bundle = make_bundle(tmp / "bundle", a.preset, a.image_size)
        model = model_rate(bundle, a.image_size)
        loader = loader_rate(scene, bundle, a.image_size)
        ones, ns = [], []
        for r in range(a.repeats):
            ones.append(run_infer(bundle, scene, tmp / f"one-{r}", 1, a.part_tiles))
            ns.append(run_infer(bundle, scene, tmp / f"n-{r}", a.workers, a.part_tiles))
    one, n = (statistics.median(r["tiles_per_s"] for r in runs) for runs in (ones, ns))

    def summary(runs: list[dict]) -> dict:
        return {k: round(statistics.median(r[k] for r in runs), 2) for k in ("cpu_ms_per_tile", "cores_busy")}

    result = {"tiles_per_s_1": round(one, 1), "tiles_per_s_n": round(n, 1), "workers": a.workers,
              "speedup": round(n / one, 3) if one else None, "model_tiles_per_s": round(model, 1),
              "loader_tiles_per_s": round(loader, 1), "tiles": (-(-a.side // a.image_size)) ** 2,
              "image_size": a.image_size, "preset": a.preset, "cpus": os.cpu_count(),
              "cpu_1": summary(ones), "cpu_n": summary(ns), "model_cpu_ms_per_tile": round(1000 / model, 2),
              "runs_1": [round(r["tiles_per_s"], 1) for r in ones], "runs_n": [round(r["tiles_per_s"], 1) for r in ns],
              "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
