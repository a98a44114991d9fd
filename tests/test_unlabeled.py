"""Image-only corpora for pretraining (`shards convert ... --unlabeled`, shards/README.md): every image of a folder
tree or of a path-only record file, train and val drawn by --val-fraction, multi-band rasters with their band
statistics, shown image-only by inspect, read by a task that needs images alone and refused by the labelled ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from spatialnet_dist import config as config_mod
from spatialnet_dist import tasks as registry
from spatialnet_dist.cli import main as cli_main
from spatialnet_dist.corpora import get_adapter
from spatialnet_dist.corpora.base import BadRecord, split_by_ratio
from spatialnet_dist.data.streams import StreamCounts, corpus_shards, eval_stream, task_stream_spec
from spatialnet_dist.data.transforms import ImageTransform
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import read_manifest
from spatialnet_dist.store.verify import verify_store
from tests.test_byo_corpora import BANDS, picture, sentinel2
from tests.test_tasks import BRIGHTNESS  # a test task that reads images alone (how bright each is)


def png_tree(root: Path, n: int = 20) -> Path:
    """n PNGs nested at several depths, a hidden folder and a text file beside them."""
    for i in range(n):
        folder = root / f"{2020 + i % 2}" / ("north" if i % 3 else "south") if i % 4 else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(i)).save(folder / f"tile {i}.png")
    (root / ".thumbs").mkdir()
    Image.fromarray(picture(99)).save(root / ".thumbs" / "t.png")
    (root / "README.txt").write_text("not an image")
    return root


def geotiff_tree(root: Path, n: int = 20) -> Path:
    """n 13-band uint16 GeoTIFFs (EuroSAT all-bands style) in two levels of folders."""
    for i in range(n):
        folder = root / f"granule{i % 3}" / "tiles"
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"s2_{i}.tif", sentinel2(i, offset=50 * i), photometric="minisblack",
                         planarconfig="separate")
    return root


def convert(*args: str) -> int:
    return cli_main(["shards", "convert", *args, "--min-shards", "2"])


def test_an_unlabeled_png_tree_is_every_image_in_train_and_val(tmp_path, capsys):
    src = png_tree(tmp_path / "tiles")
    adapter = get_adapter("imagefolder", unlabeled=True)
    records = list(adapter.records(src))
    assert adapter.classes is None and not any(isinstance(r, BadRecord) for r in records)
    ids = {r.image_id for r in records}
    assert len(ids) == 20 and "tile_0" in ids and "2021_north_tile_1" in ids and "2020_south_tile_6" in ids
    assert all(r.label is None and r.label_name is None and not r.captions and not r.qa and not r.tags for r in records)
    assert {r.image_id: r.meta["path"] for r in records}["2021_north_tile_1"] == "2021/north/tile 1.png"
    # The default val fraction 0.1, one seeded draw over the corpus sorted by path: 18 train, 2 val.
    order = sorted(records, key=lambda r: r.meta["path"].split("/"))
    assert [r.split for r in order] == split_by_ratio(20, (0.9, 0.1, 0.0), seed=0)
    root = str(tmp_path / "store")
    assert convert("imagefolder", str(src), root, "--unlabeled", "--name", "tiles") == 0
    manifest = read_manifest(root, "tiles")
    assert manifest["classes"] is None and manifest["tags"] is None
    assert {split: s["samples"] for split, s in manifest["splits"].items()} == {"train": 18, "val": 2}
    assert "band_stats" not in manifest["splits"]["train"]  # uint8 pictures keep their fixed scaling
    assert verify_store(root) == []
    capsys.readouterr()
    assert convert("imagefolder", str(src), root, "--unlabeled", "--name", "tiles", "--val-fraction", "0.25",
                   "--split-seed", "3") == 0
    splits = read_manifest(root, "tiles")["splits"]
    assert {split: s["samples"] for split, s in splits.items()} == {"train": 15, "val": 5}


def test_a_13_band_geotiff_tree_keeps_its_band_statistics(tmp_path):
    src = geotiff_tree(tmp_path / "s2")
    root = str(tmp_path / "store")
    assert convert("imagefolder", str(src), root, "--unlabeled", "--name", "s2") == 0
    manifest = read_manifest(root, "s2")
    assert {split: s["samples"] for split, s in manifest["splits"].items()} == {"train": 18, "val": 2}
    records = list(get_adapter("imagefolder", unlabeled=True).records(src))
    train = [r.image for r in records if r.split == "train"]
    assert all(im.shape == (12, 12, BANDS) and im.dtype == np.uint16 for im in train)
    pixels = np.concatenate([im.reshape(-1, BANDS).astype(np.float64) for im in train])
    stats = manifest["splits"]["train"]["band_stats"]
    assert stats["pixels"] == [18 * 12 * 12] * BANDS
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0))
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0))


def test_a_jsonl_of_paths_only_and_what_unlabeled_refuses(tmp_path):
    src = png_tree(tmp_path / "tiles", n=10)
    paths = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png") if ".thumbs" not in p.parts)
    (src / "tiles.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in paths)
                                     + json.dumps({"path": paths[0], "id": "kept", "split": "test"}) + "\n"
                                     + json.dumps({"path": paths[1], "id": "named", "label": "forest"}) + "\n")
    adapter = get_adapter("jsonl", unlabeled=True)
    out = list(adapter.records(src / "tiles.jsonl"))
    good = {r.image_id: r for r in out if not isinstance(r, BadRecord)}
    bad = [r for r in out if isinstance(r, BadRecord)]
    assert adapter.classes is None and len(good) == 11
    assert good["kept"].split == "test"  # a record's own split is kept
    assert sorted(r.split for k, r in good.items() if k != "kept") == ["train"] * 9 + ["val"]
    assert [(b.record, b.path) for b in bad] == [("line 12", str(src / "tiles.jsonl"))]
    assert bad[0].problem.startswith("field 'label': an --unlabeled corpus's records hold images only")
    # Without --unlabeled, path-only records convert as they always did: three splits, no classes.
    labelled = get_adapter("jsonl")
    plain = [r for r in labelled.records(src / "tiles.jsonl") if not isinstance(r, BadRecord)]
    assert labelled.classes == ["forest"] and {r.split for r in plain} == {"train", "val", "test"}

    with pytest.raises(UserError, match="--split-ratio: not with --unlabeled"):
        get_adapter("imagefolder", unlabeled=True, split_ratio=(0.8, 0.1, 0.1)).records(src)
    with pytest.raises(UserError, match="--val-fraction: only with --unlabeled"):
        get_adapter("jsonl", val_fraction=0.1).records(src / "tiles.jsonl")
    with pytest.raises(UserError, match=r"--val-fraction 1.0: expected a fraction"):
        get_adapter("imagefolder", unlabeled=True, val_fraction=1.0).records(src)
    with pytest.raises(UserError, match="--classes: an --unlabeled corpus has no classes"):
        get_adapter("imagefolder", unlabeled=True, class_file=tmp_path / "c.txt").records(src)
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty: no image files below it"):
        get_adapter("imagefolder", unlabeled=True).records(tmp_path / "empty")
    with pytest.raises(UserError, match=r"--unlabeled: adapter ucm-captions does not take --unlabeled"):
        get_adapter("ucm-captions", unlabeled=True)


def test_bad_images_are_named_and_too_many_write_nothing(tmp_path, capsys):
    src = png_tree(tmp_path / "tiles", n=10)
    (src / "2021" / "broken.png").write_bytes(b"not a png")
    root = str(tmp_path / "store")
    assert convert("imagefolder", str(src), root, "--unlabeled") == 1  # 1 of 11 bad: above 5%
    err = capsys.readouterr().err
    assert f"bad record: image '2021/broken.png' ({src / '2021' / 'broken.png'}): unreadable image" in err
    assert not (tmp_path / "store" / "imagefolder").exists()
    assert convert("imagefolder", str(src), root, "--unlabeled", "--max-bad-fraction", "0.1") == 0


def test_inspect_shows_an_image_only_corpus(tmp_path, capsys):
    root = str(tmp_path / "store")
    assert convert("imagefolder", str(png_tree(tmp_path / "tiles")), root, "--unlabeled", "--name", "tiles") == 0
    capsys.readouterr()
    assert cli_main(["shards", "inspect", root]) == 0
    out = capsys.readouterr().out
    assert "tiles: image-only (no classes, tags, captions or questions)" in out and "no tags" not in out
    assert cli_main(["shards", "inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["corpora"]["tiles"]
    assert info["image_only"] and info["classes"] is None and info["tags"] is None


@pytest.fixture
def brightness():
    registry.register(BRIGHTNESS)
    yield BRIGHTNESS
    registry.unregister(BRIGHTNESS.name)


def test_a_task_of_images_alone_reads_it_and_the_labelled_tasks_find_nothing(tmp_path, brightness):
    root = str(tmp_path / "store")
    assert convert("imagefolder", str(geotiff_tree(tmp_path / "s2")), root, "--unlabeled", "--name", "s2") == 0
    for task in registry.DEFAULT_TASKS + ("tagging",):
        with pytest.raises(UserError, match=rf"tasks.{task}.corpora: corpus s2 under .* has no"):
            corpus_shards(root, "s2", "train", task)
    off = [f"tasks.{t}.enabled=false" for t in registry.DEFAULT_TASKS]
    cfg = config_mod.load(None, [*off, f"data.root={root}", "model.in_chans=13", "model.image_size=32",
                                 "tasks.brightness.enabled=true", "tasks.brightness.corpora=[s2]"])
    spec = task_stream_spec(cfg, build_vocabs(cfg), "brightness", "val", ImageTransform(32, BANDS), train=False)
    rows = list(eval_stream(spec, spec.shards(), StreamCounts("brightness", 0.0, strict=True)))
    assert len(rows) == 2 and all(row["image"].shape == (BANDS, 32, 32) for row in rows)
    assert spec.rows.band_norms.keys() == {"s2"}  # normalised by the corpus's train statistics
