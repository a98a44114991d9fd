"""Corpora without code: the imagefolder, jsonl and csv adapters, rasters with per-band statistics
in the manifest, and training on each kind (shards/README.md "Bring your own corpus")."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from spatialnet_dist.cli import main as cli_main
from spatialnet_dist.corpora import convert, get_adapter
from spatialnet_dist.corpora.base import BadRecord, parse_split_ratio, split_by_ratio
from spatialnet_dist.data.streams import corpus_shards, task_stream_spec
from spatialnet_dist.data.transforms import ImageTransform
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.band_stats import BandStats
from spatialnet_dist.store.manifest import read_manifest
from spatialnet_dist.store.verify import verify_store

REPO = Path(__file__).resolve().parents[1]
BANDS = 13


def picture(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def sentinel2(seed: int, offset: int = 0, size: int = 12) -> np.ndarray:
    """A 13-band 16-bit tile, (bands, H, W) as GeoTIFFs store it band-sequential."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 3000, (BANDS, size, size)) + offset + 100 * np.arange(BANDS)[:, None, None]).astype(np.uint16)


def class_folders(root: Path, classes: dict[str, int], suffix: str = ".png") -> Path:
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(picture(100 * c + i)).save(root / name / f"{i:04d}{suffix}")
    return root


def geotiff_folder(root: Path, per_class: int = 6) -> Path:
    """EuroSAT-allBands style: one folder per class of 13-band uint16 GeoTIFFs named <Class>_<n>.tif."""
    for c, name in enumerate(("AnnualCrop", "Forest")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            tifffile.imwrite(root / name / f"{name}_{i}.tif", sentinel2(10 * c + i, offset=1000 * c),
                             photometric="minisblack", planarconfig="separate")
    return root


def jsonl_corpus(root: Path, n: int = 12) -> Path:
    (root / "tiles").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(picture(i)).save(root / "tiles" / f"t{i}.png")
        rec = {"path": f"tiles/t{i}.png", "label": ["farm", "lake"][i % 2], "captions": [f"A {['farm', 'lake'][i % 2]}."],
               "qa": [{"question": "Is there water?", "answer": ["no", "yes"][i % 2], "type": "presence"},
                      {"question": "How many houses are there?", "answer": i, "type": "count"}],
               "tags": ["field"] if i % 2 == 0 else ["water", "shore"]}
        if i < 4:
            rec["split"] = "train"
        lines.append(json.dumps(rec))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root / "corpus.jsonl"


def by_id(records) -> dict:
    return {r.image_id: r for r in records if not isinstance(r, BadRecord)}


# ---- imagefolder ----


def test_imagefolder_labels_ids_and_seeded_per_class_splits(tmp_path):
    src = class_folders(tmp_path / "ucm", {"forest": 20, "beach": 10}, suffix=".jpg")
    (src / "beach" / "readme.txt").write_text("not an image")
    Image.fromarray(picture(99)).save(src / "beach" / "beach_07.png")  # a stem that names its class keeps it
    adapter = get_adapter("imagefolder")
    records = by_id(adapter.records(src))
    assert adapter.classes == ["beach", "forest"] and len(records) == 31
    assert records["forest_0003"].label == 1 and records["forest_0003"].label_name == "forest"
    assert records["beach_07"].meta == {"path": "beach/beach_07.png"} and records["beach_07"].image.dtype == np.uint8
    forest_splits = [r.split for r in records.values() if r.label_name == "forest"]
    assert {s: forest_splits.count(s) for s in set(forest_splits)} == {"train": 16, "val": 2, "test": 2}
    again = by_id(get_adapter("imagefolder").records(src))
    assert {k: r.split for k, r in again.items()} == {k: r.split for k, r in records.items()}
    other = by_id(get_adapter("imagefolder", split_seed=1, split_ratio=(0.5, 0.0, 0.5)).records(src))
    assert {r.split for r in other.values()} == {"train", "test"}
    assert get_adapter("imagefolder").classes is None  # the registry's adapter learnt nothing


def test_imagefolder_split_folders_class_file_and_refusals(tmp_path):
    src = tmp_path / "aid"
    class_folders(src / "train", {"Airport": 3, "Bridge": 2})
    class_folders(src / "test", {"Airport": 1})
    (src / "test/Airport/0000.png").rename(src / "test/Airport/0100.png")  # ids are unique across splits
    order = tmp_path / "classes.txt"
    order.write_text("Bridge\n\nAirport\nDesert\n")
    adapter = get_adapter("imagefolder", class_file=order)
    records = by_id(adapter.records(src))
    assert adapter.classes == ["Bridge", "Airport", "Desert"]
    assert sorted((r.split, r.label) for r in records.values()) == [("test", 1)] + [("train", 0)] * 2 + [("train", 1)] * 3
    with pytest.raises(UserError, match="--split-ratio is for a folder of class folders"):
        get_adapter("imagefolder", split_ratio=(0.8, 0.1, 0.1)).records(src)
    order.write_text("Bridge\n")
    with pytest.raises(UserError, match=rf"class folder 'Airport' is not in the class file {order}"):
        get_adapter("imagefolder", class_file=order).records(src)
    (src / "extra").mkdir()
    with pytest.raises(UserError, match="folder 'extra' beside the split folders"):
        get_adapter("imagefolder").records(src)
    (tmp_path / "eurosat" / "2750" / "Forest").mkdir(parents=True)  # SRC one level too high
    with pytest.raises(UserError, match="eurosat: no image files in its class folders"):
        get_adapter("imagefolder").records(tmp_path / "eurosat")
    with pytest.raises(UserError, match=r"--split-ratio: adapter ucm-captions does not take --split-ratio "
                                        r"\(only imagefolder, jsonl, csv do\)"):
        get_adapter("ucm-captions", split_ratio=(0.8, 0.1, 0.1))


def test_cli_convert_imagefolder_with_class_file_and_split_seed(tmp_path, capsys):
    src = class_folders(tmp_path / "src", {"river": 5, "beach": 5})
    (tmp_path / "classes.txt").write_text("river\nbeach\n")
    root = str(tmp_path / "store")
    args = ["shards", "convert", "imagefolder", str(src), root, "--name", "rivers", "--classes",
            str(tmp_path / "classes.txt"), "--split-ratio", "0.6,0.2,0.2", "--min-shards", "1"]
    assert cli_main([*args, "--split-seed", "3"]) == 0
    manifest = read_manifest(root, "rivers")
    assert manifest["classes"] == ["river", "beach"]
    assert {split: info["samples"] for split, info in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 2}
    assert "rivers: 10 samples" in capsys.readouterr().out
    assert cli_main(["shards", "convert", "ucm-captions", str(src), root, "--classes", "x.txt"]) == 2
    assert "--classes: adapter ucm-captions does not take --classes" in capsys.readouterr().err


def test_split_ratio_parsing_and_rounding():
    assert parse_split_ratio("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.8,0.2", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5"):
        with pytest.raises(UserError, match="--split-ratio"):
            parse_split_ratio(bad)
    splits = split_by_ratio(7, (0.6, 0.2, 0.2), seed=0)
    assert sorted(splits) == ["test"] + ["train"] * 4 + ["val"] * 2


# ---- jsonl and csv ----


def test_jsonl_fields_drawn_splits_and_bad_lines_named(tmp_path):
    path = jsonl_corpus(tmp_path / "js")
    with path.open("a") as f:
        f.write("{broken\n")
        f.write(json.dumps({"path": "tiles/none.png", "captions": ["Gone."]}) + "\n")
        f.write(json.dumps({"path": "tiles/t0.png", "caption": "typo"}) + "\n")
        f.write(json.dumps({"path": "tiles/t1.png", "qa": [{"question": "Any?", "answer": "yes"}]}) + "\n")
    tifffile.imwrite(tmp_path / "js" / "tiles" / "ms.tif", sentinel2(0), photometric="minisblack", planarconfig="separate")
    with path.open("a") as f:
        f.write(json.dumps({"path": "tiles/ms.tif", "id": "ms"}) + "\n")
    adapter = get_adapter("jsonl")
    out = list(adapter.records(path))
    good, bad = by_id(out), {b.record: b for b in out if isinstance(b, BadRecord)}
    assert adapter.classes == ["farm", "lake"] and len(good) == 12
    t3 = good["t3"]
    assert (t3.label, t3.label_name, t3.captions, t3.meta) == (1, "lake", ["A lake."], {"path": "tiles/t3.png"})
    assert t3.tags == ["water", "shore"] and good["t2"].tags == ["field"]
    assert t3.qa[1] == {"qid": "t3-1", "question": "How many houses are there?", "answer": 3, "type": "count"}
    assert all(good[f"t{i}"].split == "train" for i in range(4)) and {r.split for r in good.values()} <= {"train", "val", "test"}
    assert bad["line 13"].problem.startswith("malformed JSON at column 2") and bad["line 13"].path == str(path)
    assert bad["line 14"].path == str(path.parent / "tiles/none.png") and bad["line 14"].problem == "image file missing"
    assert "unknown field 'caption'" in bad["line 15"].problem
    assert "qa[0]" in bad["line 16"].problem
    assert bad["line 17"].problem == "13 band(s), expected 3"
    with pytest.raises(UserError, match=r"bad record line 13 .*malformed JSON.*--strict"):
        convert(get_adapter("jsonl"), path, str(tmp_path / "store"), strict=True)
    assert not (tmp_path / "store" / "jsonl" / "manifest.json").exists()


def test_csv_gives_the_records_jsonl_gives(tmp_path):
    path = jsonl_corpus(tmp_path / "src")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with (path.parent / "corpus.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "split", "label", "captions", "tags", "qa"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "captions": "|".join(row["captions"]), "tags": "|".join(row["tags"]),
                             "qa": json.dumps(row["qa"])})
    from_jsonl, from_csv = by_id(get_adapter("jsonl").records(path)), by_id(get_adapter("csv").records(path.parent / "corpus.csv"))
    assert from_jsonl.keys() == from_csv.keys()
    for key, a in from_jsonl.items():
        b = from_csv[key]
        assert (a.split, a.label, a.captions, a.tags, a.meta) == (b.split, b.label, b.captions, b.tags, b.meta)
        assert [{**q, "answer": str(q["answer"])} for q in a.qa] == [{**q, "answer": str(q["answer"])} for q in b.qa]
    (path.parent / "bad.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(UserError, match=r"bad.csv: unknown column 'file' in the header"):
        get_adapter("csv").records(path.parent / "bad.csv")


# ---- rasters and per-band statistics ----


def test_band_stats_are_mergeable_partial_sums():
    rng = np.random.default_rng(0)
    images = [rng.normal(100 * b, 1 + b, (8, 9, 3)).astype(np.float32) for b in range(4)]
    images[1][0, 0, 2] = np.nan  # nodata does not count
    whole, first, second = BandStats(), BandStats(), BandStats()
    for i, image in enumerate(images):
        whole.add(image)
        (first if i < 2 else second).add(image)
    whole.add(picture(0))  # uint8 pictures have their fixed scaling: not counted
    merged = first.merge(second)
    np.testing.assert_allclose(merged.mean_std(), whole.mean_std())
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    np.testing.assert_allclose(whole.mean_std()[0], np.nanmean(pixels, axis=0), rtol=1e-9)
    np.testing.assert_allclose(whole.mean_std()[1], np.nanstd(pixels, axis=0), rtol=1e-6)
    assert whole.manifest()["band_stats"]["pixels"] == [288, 288, 287]
    assert BandStats().manifest() == {}


def test_geotiffs_become_npy_shards_with_train_band_stats(tmp_path):
    src = geotiff_folder(tmp_path / "eurosat")
    tifffile.imwrite(src / "Forest" / "Forest_pages.tif", sentinel2(77))  # one page per band: read as a band stack
    root = str(tmp_path / "store")
    assert convert(get_adapter("imagefolder", split_ratio=(0.5, 0.25, 0.25)), src, root, name="eurosat") == 0
    assert verify_store(root) == []
    manifest = read_manifest(root, "eurosat")
    adapter = get_adapter("imagefolder", split_ratio=(0.5, 0.25, 0.25))
    train = [r.image for r in by_id(adapter.records(src)).values() if r.split == "train"]
    assert all(im.shape == (12, 12, BANDS) and im.dtype == np.uint16 for im in train)
    pixels = np.concatenate([im.reshape(-1, BANDS).astype(np.float64) for im in train])
    stats = manifest["splits"]["train"]["band_stats"]
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0))
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0))
    shard = next((tmp_path / "store" / "eurosat" / "train").glob("*.tar"))
    assert any(name.endswith(".npy") for name in subprocess.run(["tar", "tf", shard], capture_output=True,
                                                                 text=True).stdout.split())


def test_training_normalises_rasters_by_their_corpus_band_stats(tmp_path):
    src = geotiff_folder(tmp_path / "eurosat")
    root = str(tmp_path / "store")
    convert(get_adapter("imagefolder"), src, root, name="eurosat")
    shards = corpus_shards(root, "eurosat", "test", "classification")  # test rows use the train split's statistics
    mean, std = shards.band_norm
    np.testing.assert_allclose(mean, read_manifest(root, "eurosat")["splits"]["train"]["band_stats"]["mean"], rtol=1e-6)
    image = np.moveaxis(sentinel2(5, offset=1000), 0, -1)
    x = ImageTransform(12, BANDS)(image, band_norm=(mean, std))
    expected = (torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) - torch.from_numpy(mean)[:, None, None]) \
        / torch.from_numpy(std)[:, None, None]
    torch.testing.assert_close(x, expected)
    first_four = ImageTransform(12, 4)(image, band_norm=(mean, std))  # in_chans < bands: the first bands, their stats
    torch.testing.assert_close(first_four, expected[:4])
    # Through the task stream: the row's image is normalised by the corpus statistics, not per image.
    from spatialnet_dist import config as config_mod
    from spatialnet_dist.data.vocab import build_vocabs

    cfg = config_mod.load(None, [f"data.root={root}", "model.in_chans=13", "model.image_size=32",
                                 "tasks.classification.corpora=[eurosat]", "tasks.captioning.enabled=false",
                                 "tasks.vqa.enabled=false", "tasks.regression.enabled=false"])
    spec = task_stream_spec(cfg, build_vocabs(cfg), "classification", "test", ImageTransform(32, BANDS), train=False)
    assert spec.rows.band_norms.keys() == {"eurosat"}


# ---- the command line, and training on each kind of corpus ----


def _convert(*args: str) -> None:
    assert cli_main(["shards", "convert", *args]) == 0


def _train_local(root: str, runs: Path, name: str, *sets: str) -> dict:
    """A few steps of the one-process training path (python -m spatialnet_dist.jobs)."""
    base = [f"data.root={root}", f"run.storage={runs}", f"run.name={name}", "model.image_size=32",
            "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1", "eval.every=0",
            "eval.at_end=false", "data.loader_workers=0", "optim.warmup_steps=1", "tasks.captioning.batch_size=4",
            "tasks.vqa.batch_size=4", "tasks.classification.batch_size=4", "tasks.regression.batch_size=4"]
    argv = [a for s in (*base, *sets) for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(29600 + os.getpid() % 300)}
    done = subprocess.run([sys.executable, "-m", "spatialnet_dist.jobs", *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    return metrics[-1]


@pytest.mark.slow
def test_convert_and_train_a_class_folder_a_jsonl_and_13_band_geotiffs(tmp_path):
    root = str(tmp_path / "store")
    _convert("imagefolder", str(class_folders(tmp_path / "ucm", {"forest": 8, "river": 8})), root, "--name", "folders",
             "--split-ratio", "0.75,0.125,0.125")
    _convert("jsonl", str(jsonl_corpus(tmp_path / "js")), root, "--name", "records")
    _convert("imagefolder", str(geotiff_folder(tmp_path / "eurosat")), root, "--name", "eurosat")
    assert read_manifest(root, "eurosat")["splits"]["train"]["band_stats"]["pixels"] == [10 * 144] * BANDS
    last = _train_local(root, tmp_path / "runs", "rgb", "tasks.classification.corpora=[folders]",
                        "tasks.captioning.corpora=[records]", "tasks.vqa.corpora=[records]",
                        "tasks.regression.corpora=[records]")
    assert {"classification_loss", "captioning_loss", "vqa_loss", "regression_loss"} <= set(last)
    last = _train_local(root, tmp_path / "runs", "s2", "model.in_chans=13", "tasks.classification.corpora=[eurosat]",
                        "tasks.captioning.enabled=false", "tasks.vqa.enabled=false", "tasks.regression.enabled=false")
    assert "classification_loss" in last
