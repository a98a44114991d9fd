"""`spatialnet infer` over GeoTIFF scenes and a shard corpus: GeoParquet whose polygons are the tiles' bounds in the
scene's CRS and whose predictions are `spatialnet predict`'s on the same pixels; a shard split's accuracy as
`spatialnet eval run` scores it; resumption (parts written once, another model refused), bad input and nodata."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from spatialnet_dist.errors import UserError
from spatialnet_dist.evaluate import infer_output as output
from spatialnet_dist.evaluate.predict import predict_images
from spatialnet_dist.raster import Georeference
from tests.test_eval_run import bundle_for, run_cli

REPO = Path(__file__).resolve().parents[1]
GEO = Georeference(500000.0, 4600000.0, 10.0, 10.0, 32633)  # UTM 33N, 10 m pixels
SIDE = 32  # the test model's image size: the default tile


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("shards")
    write_synthetic(str(root), images=30, seed=0, shard_size=4)
    return str(root)


@pytest.fixture(scope="module")
def bundle(store, tmp_path_factory):
    return bundle_for(store, tmp_path_factory.mktemp("bundle") / "model", captioning=False)


def write_scene(path: Path, pixels: np.ndarray, georef: Georeference | None = GEO, nodata: int | None = None,
                **kw) -> Path:
    """(H, W, C) pixels as a (Geo)TIFF, in strips of 8 rows (read window by window)."""
    tags = list(georef.geotiff_tags()) if georef is not None else []
    if nodata is not None:
        tags.append((42113, "s", 0, str(nodata), True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=8, extratags=tags, **kw)
    return path


def scene_pixels(height: int = 75, width: int = 101, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, (height, width, 3), dtype=np.uint8)


def dataset_rows(out: Path) -> list[dict]:
    return output.read_rows(str(out), output.written_parts(str(out)))


def without_paths(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "source"} for r in rows]


def test_geotiff_scene_to_geoparquet_matches_predict_on_hand_cut_tiles(bundle, tmp_path):
    import geopandas

    pixels = scene_pixels()  # 75 x 101: neither side a multiple of the 32-pixel tile
    scene = write_scene(tmp_path / "scenes" / "s2.tif", pixels)
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["infer", bundle, str(scene), str(out), "--embeddings"])
    assert rc == 0, stderr
    assert "12 rows" in stdout and "0 bad input" in stdout

    gdf = geopandas.read_parquet(out / "parts")
    assert gdf.crs.to_epsg() == 32633
    rows = dataset_rows(out)
    assert len(rows) == len(gdf) == 3 * 4  # tile rows at y 0, 32, 64; columns at x 0, 32, 64, 96
    assert [(r["tile_row"], r["tile_col"]) for r in rows] == [(i, j) for i in range(3) for j in range(4)]
    for r, geom in zip(rows, gdf.geometry):
        assert r["width"] == min(SIDE, 101 - r["x"]) and r["height"] == min(SIDE, 75 - r["y"])
        expected = (GEO.origin_x + 10 * r["x"], GEO.origin_y - 10 * (r["y"] + r["height"]),
                    GEO.origin_x + 10 * (r["x"] + r["width"]), GEO.origin_y - 10 * r["y"])
        assert np.allclose(geom.bounds, expected, rtol=0, atol=1e-6)
        assert np.allclose(output.polygon_bounds(r["geometry"]), expected, rtol=0, atol=1e-6)
        assert r["bbox"] == dict(zip(("xmin", "ymin", "xmax", "ymax"), expected))
        assert len(r["embedding"]) > 0
    geo = json.loads(pq.read_schema(next((out / "parts").iterdir())).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 32633}

    # The same tiles cut out by hand and given to `spatialnet predict`.
    tiles = []
    for r in rows:
        path = tmp_path / f"tile_{r['tile_row']}_{r['tile_col']}.npy"
        np.save(path, pixels[r["y"] : r["y"] + r["height"], r["x"] : r["x"] + r["width"]])
        tiles.append(str(path))
    for r, p in zip(rows, predict_images(bundle, tiles)):
        assert r["class"] == p["class"] and r["probability"] == pytest.approx(p["probability"], abs=1e-6)
        assert [c["class"] for c in r["class_topk"]] == [c["class"] for c in p["class_topk"]]


def test_shard_split_one_row_per_sample_and_eval_runs_accuracy(store, bundle, tmp_path):
    from spatialnet_dist.store.manifest import read_manifest

    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["infer", bundle, store, str(out), "--corpus", "synthetic", "--split", "test", "--json"])
    assert rc == 0, stderr
    result = json.loads(stdout)
    rows = dataset_rows(out)
    test = read_manifest(store, "synthetic")["splits"]["test"]
    assert len(rows) == len({r["image_id"] for r in rows}) == test["samples"] == result["rows"]
    accuracy = sum(r["class"] == r["label_name"] for r in rows) / len(rows)

    rc, stdout, stderr = run_cli(["eval", "run", bundle, "--data", store, "--split", "test", "--out", str(tmp_path / "e")])
    assert rc == 0, stderr
    assert accuracy == pytest.approx(json.loads(stdout)["classification"]["accuracy"], abs=1e-12)


def test_rerun_writes_only_missing_parts_and_another_model_is_refused(store, bundle, tmp_path):
    scene = write_scene(tmp_path / "a.tif", scene_pixels(seed=1))
    out = tmp_path / "out"
    argv = ["infer", bundle, str(scene), str(out), "--part-tiles", "4", "--json"]  # one tile row per part
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    first = dataset_rows(out)
    names = sorted(output.written_parts(str(out)))
    assert len(names) == 3 and len(json.loads(stdout)["written"]) == 3
    for name in names[1:]:  # as if killed after the first part (the manifest may list parts that are gone)
        os.remove(output.part_url(str(out), name))
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    assert sorted(json.loads(stdout)["written"]) == names[1:]
    assert dataset_rows(out) == first

    rc, stdout, _ = run_cli(argv)  # all done: nothing written
    assert rc == 0 and json.loads(stdout)["written"] == []

    other = bundle_for(store, tmp_path / "other", captioning=False)
    (Path(other) / "config.yaml").write_text((Path(other) / "config.yaml").read_text().replace("beam_size: 2", "beam_size: 3"))
    rc, _, stderr = run_cli(["infer", other, str(scene), str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert rc == 2 and stderr.count("\n") == 1 and "refusing to mix" in stderr
    from spatialnet_dist.checkpoint_weights import model_sha256

    assert manifest["model_sha256"] in stderr and model_sha256(other) in stderr
    rc, _, stderr = run_cli(["infer", bundle, str(scene), str(out), "--stride", "16"])
    assert rc == 2 and "stride" in stderr


def test_bad_rasters_named_skipped_counted_and_strict_stops(bundle, tmp_path):
    scenes = tmp_path / "scenes"
    write_scene(scenes / "good.tif", scene_pixels(seed=2))
    cut = write_scene(scenes / "cut.tif", scene_pixels(seed=3))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # the header reads, the pixels end half-way
    (scenes / "garbage.tif").write_bytes(b"not a tiff at all")
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["infer", bundle, str(scenes), str(out)])
    assert rc == 1
    assert "2 bad input(s) skipped" in stdout and "cut.tif" in stdout and "garbage.tif" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_inputs"] == 2 and manifest["rows"] == 12
    assert {Path(e["source"]).name for e in manifest["bad"].values()} == {"cut.tif", "garbage.tif"}
    written = {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}

    rc, _, stderr = run_cli(["infer", bundle, str(scenes), str(out), "--strict"])
    assert rc == 2 and stderr.count("\n") == 1 and ("cut.tif" in stderr or "garbage.tif" in stderr)
    assert {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == written  # nothing touched


def test_nodata_tiles_skipped_and_counted_and_a_scene_without_georeference(bundle, tmp_path, caplog):
    pixels = scene_pixels(64, 96)
    pixels[:32, 32:64] = 0  # one whole tile of nodata
    nodata = write_scene(tmp_path / "nodata.tif", pixels, nodata=0)
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["infer", bundle, str(nodata), str(out)])
    assert rc == 0, stderr
    assert "5 rows" in stdout and "1 all-nodata tiles skipped" in stdout
    assert json.loads((out / "manifest.json").read_text())["nodata_tiles"] == 1

    plain = write_scene(tmp_path / "plain.tif", scene_pixels(40, 40), georef=None)
    with caplog.at_level(logging.WARNING, logger="spatialnet.infer"):
        rc, _, stderr = run_cli(["infer", bundle, str(plain), str(tmp_path / "plain")])
    assert rc == 0, stderr
    assert [r.getMessage() for r in caplog.records if "no georeference" in r.getMessage()] == [
        f"{plain}: no georeference; its tiles' polygons are in pixel coordinates (x right, y down)"]
    rows = dataset_rows(tmp_path / "plain")
    assert [output.polygon_bounds(r["geometry"]) for r in rows] == [(0, 0, 32, 32), (32, 0, 40, 32), (0, 32, 32, 40),
                                                                   (32, 32, 40, 40)]
    geo = json.loads(pq.read_schema(next((tmp_path / "plain" / "parts").iterdir())).metadata[b"geo"])
    assert geo["columns"]["geometry"]["crs"] is None


def test_class_map_overlapping_tiles_averaged_and_georeferenced(bundle, tmp_path):
    from spatialnet_dist.raster import Raster

    scene = write_scene(tmp_path / "s.tif", scene_pixels(64, 80))
    out = tmp_path / "out"
    rc, _, stderr = run_cli(["infer", bundle, str(scene), str(out), "--stride", "16", "--class-map"])
    assert rc == 0, stderr
    maps = sorted(p.name for p in (out / "class_maps").iterdir())
    assert len(maps) == 2 and maps[0].endswith(".class.tif") and maps[1].endswith(".probabilities.tif")
    with Raster(str(out / "class_maps" / maps[0])) as m:
        assert (m.height, m.width) == (4, 5) and m.georef == GEO.coarser(16)
        classes = m.window(0, 0, 5, 4)[:, :, 0]
    probs = tifffile.imread(out / "class_maps" / maps[1])  # (K, 4, 5)
    assert (probs.argmax(0) == classes).all()
    rows = dataset_rows(out)
    covering = [r for r in rows if r["x"] <= 16 < r["x"] + r["width"] and r["y"] <= 16 < r["y"] + r["height"]]
    assert len(covering) == 4  # overlap: cell (1, 1) lies under four tiles
    assert np.allclose(probs[:, 1, 1], np.mean([r["class_probabilities"] for r in covering], axis=0), atol=1e-6)


def test_the_raster_reader_reads_windows_of_any_layout(tmp_path):
    from spatialnet_dist.raster import Raster

    rng = np.random.default_rng(0)
    planar = rng.integers(0, 65535, (5, 70, 90), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="minisblack", planarconfig="separate", tile=(32, 32),
                     compression="zlib")
    with Raster(str(tmp_path / "p.tif")) as r:
        assert (r.bands, r.dtype) == (5, np.uint16)
        assert (r.window(17, 40, 50, 30) == np.moveaxis(planar, 0, -1)[40:70, 17:67]).all()


@pytest.mark.slow  # real Ray: two actors on the shared cluster, which the CLI joins (RAY_ADDRESS)
def test_a_killed_run_rerun_ends_with_every_tile_once(bundle, shared_ray, tmp_path):
    scene = write_scene(tmp_path / "big.tif", scene_pixels(32 * 40, 32 * 4, seed=5))  # 40 tile rows
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "spatialnet_dist.cli", "infer", bundle, str(scene), str(out), "--part-tiles", "4"]
    proc = subprocess.Popen([*argv, "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(output.written_parts(str(out))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = len(output.written_parts(str(out)))
    assert 2 <= killed_after < 40, proc.stderr.read().decode()[-2000:]

    rerun = subprocess.run([*argv, "--workers", "2", "--json"], env=env, capture_output=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert len(json.loads(rerun.stdout)["written"]) == 40 - killed_after
    rows = dataset_rows(out)
    assert len(rows) == len({(r["tile_row"], r["tile_col"]) for r in rows}) == 160

    whole = tmp_path / "whole"  # uninterrupted, in one process: the same rows
    done = subprocess.run([*argv[:-3], str(whole), "--part-tiles", "4"], env=env, capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert without_paths(dataset_rows(whole)) == without_paths(rows)


def test_a_cut_shard_is_named_skipped_and_counted(store, bundle, tmp_path):
    import shutil

    from spatialnet_dist.store.manifest import read_manifest

    root = tmp_path / "store"
    shutil.copytree(store, root)
    split = read_manifest(str(root), "synthetic")["splits"]["test"]
    cut = root / "synthetic" / "test" / split["shards"][0]["name"]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(["infer", bundle, str(root), str(out), "--corpus", "synthetic"])
    assert rc == 1 and "1 bad input(s) skipped" in stdout and cut.name in stdout, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == split["samples"] - split["shards"][0]["samples"] == len(dataset_rows(out))
    assert [Path(e["source"]).name for e in manifest["bad"].values()] == [cut.name]
    rc, _, stderr = run_cli(["infer", bundle, str(root), str(tmp_path / "strict"), "--corpus", "synthetic", "--strict"])
    assert rc == 2 and stderr.count("\n") == 1 and cut.name in stderr


def test_scenes_on_s3_to_geoparquet_on_s3_resumable(bundle, s3_bucket, tmp_path):
    from spatialnet_dist.store import storage

    scene = write_scene(tmp_path / "a.tif", scene_pixels(seed=7))
    storage.put_file(str(scene), f"s3://{s3_bucket}/scenes/a.tif")
    out = f"s3://{s3_bucket}/predictions"
    argv = ["infer", bundle, f"s3://{s3_bucket}/scenes", out, "--part-tiles", "4", "--json"]
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    rows = output.read_rows(out, output.written_parts(out))
    local_out = tmp_path / "local"
    rc, _, stderr = run_cli(["infer", bundle, str(scene), str(local_out), "--part-tiles", "4"])
    assert rc == 0, stderr
    assert without_paths(rows) == without_paths(dataset_rows(local_out))  # the same pixels, read by byte range
    rc, stdout, _ = run_cli(argv)
    assert rc == 0 and json.loads(stdout)["written"] == []


def test_every_head_text_and_questions_as_predict_gives_them(store, tmp_path):
    from spatialnet_dist import config as config_mod
    from spatialnet_dist.data.vocab import build_vocabs
    from tests.test_eval_run import write_bundle

    cfg = config_mod.load(None, [f"data.root={store}", "data.loader_workers=0", "model.image_size=32",
                                 "eval.beam_size=2", "tasks.tagging.enabled=true"])
    model = write_bundle(tmp_path / "model", cfg, build_vocabs(cfg))
    pixels = scene_pixels(32, 64)
    scene = write_scene(tmp_path / "s.tif", pixels)
    questions = ["Is there a road?", "How many buildings are there?"]
    out = tmp_path / "out"
    argv = ["infer", model, str(scene), str(out), "--question", questions[0], "--question", questions[1]]
    rc, _, stderr = run_cli([*argv, "--tasks", "classification,tagging,captioning,vqa,regression"])
    assert rc == 0, stderr
    rows = dataset_rows(out)
    vocab = json.loads((Path(model) / "vocab.json").read_text())
    np.save(tmp_path / "t.npy", pixels[:, :32])
    predicted = predict_images(model, [str(tmp_path / "t.npy")], questions)[0]
    first = rows[0]
    assert first["caption"] == predicted["caption"] and isinstance(first["caption"], str)
    assert [a["answer"] for a in first["answers"]] == [a["answer"] for a in predicted["answers"]]
    assert [a["question"] for a in first["answers"]] == questions
    assert [c["question"] for c in first["count"]] == questions and all(c["count"] >= 0 for c in first["count"])
    scores = dict(first["tag_scores"])
    assert sorted(scores) == sorted(vocab["tags"]) and set(first["tags"]) == {t for t, p in scores.items() if p > 0.5}

    rc, _, stderr = run_cli(["infer", model, str(scene), str(tmp_path / "o2"), "--tasks", "regression"])
    assert rc == 2 and "--question" in stderr
    rc, _, stderr = run_cli(["infer", model, str(scene), str(tmp_path / "o3"), "--tasks", "mae"])
    assert rc == 2 and "no such head" in stderr


def test_a_head_that_gives_no_predictions_is_refused_in_one_line():
    """A model pretrained with mae beside classification: `--tasks mae` names the head, not a traceback."""
    from spatialnet_dist import config as config_mod
    from spatialnet_dist.evaluate.predict import Predictor
    from spatialnet_dist.model.spatialnet import assemble_model
    from spatialnet_dist.networks.heads import VocabSizes

    cfg = config_mod.load(None, ["model.image_size=32"])
    model = assemble_model(cfg.model, ["classification", "mae"], VocabSizes(20, 4, 5))
    with pytest.raises(UserError) as refused:
        Predictor(model, cfg, None, tasks=["mae"], source="m")
    assert str(refused.value) == "--tasks mae: the mae head gives no predictions (heads that do: classification)"
