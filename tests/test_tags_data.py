"""Tags from the corpora: the UC Merced multi-label table merged into UCM-captions (`--tags FILE`), read
back from the tar shards and the manifest, and its one-line errors."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialnet_dist.cli import main as cli_main
from spatialnet_dist.corpora.ucm_captions import UCM_CLASSES
from spatialnet_dist.corpora.ucm_multilabel import row_name
from spatialnet_dist.store.manifest import read_manifest, shard_urls

# The release's 17 labels, in its column order.
LABELS = ["airplane", "bare-soil", "buildings", "cars", "chaparral", "court", "dock", "field", "grass",
          "mobile-home", "pavement", "sand", "sea", "ship", "tanks", "trees", "water"]
# UCM-captions file -> (its row in the table, the labels set in that row); None: the table has no row for it.
IMAGES = {
    "1.tif": ("agricultural00", ["field", "trees"]),
    "150.tif": ("airplane49", ["airplane", "cars", "pavement"]),
    "1001.tif": ("harbor00", ["dock", "ship", "water"]),
    "2100.tif": ("tenniscourt99", ["court", "grass", "trees"]),
    "105.tif": None,  # airplane04: no row
}
EXTRA_ROW = ("beach07", ["sand", "sea"])  # 308.tif: not in the captions corpus


def table_text(rows: list[tuple[str, list[str]]], header: str = "IMAGE\\LABEL") -> str:
    lines = ["\t".join([header, *LABELS])]
    lines += ["\t".join([name, *("1" if label in on else "0" for label in LABELS)]) for name, on in rows]
    return "\r\n".join(lines) + "\r\n"  # Windows line endings, as published


@pytest.fixture
def ucm_with_table(tmp_path) -> tuple[Path, Path]:
    """A UCM-captions source (dataset.json + imgs/) of the images of IMAGES, and the multi-label table."""
    src = tmp_path / "UCM_captions"
    (src / "imgs").mkdir(parents=True)
    entries = []
    for filename in IMAGES:
        imgid = int(Path(filename).stem) - 1
        split = "test" if filename == "2100.tif" else "train"
        sentence = {"raw": f"Image {imgid}.", "tokens": ["image"], "imgid": imgid, "sentid": imgid}
        entries.append({"filename": filename, "imgid": imgid, "split": split, "sentids": [imgid], "sentences": [sentence]})
        Image.fromarray(np.full((256, 256, 3), imgid % 256, np.uint8)).save(src / "imgs" / filename)
    (src / "dataset.json").write_text(json.dumps({"images": entries, "dataset": "UCM"}))
    table = tmp_path / "LandUse_Multilabeled.txt"
    table.write_bytes(table_text([row for row in IMAGES.values() if row] + [EXTRA_ROW]).encode())
    return src, table


def stored_records(root: Path, corpus: str) -> dict[str, dict]:
    """image_id -> the .json record, read from the tar shards the manifest lists."""
    manifest = read_manifest(str(root), corpus)
    records = {}
    for split in manifest["splits"]:
        for url in shard_urls(str(root), corpus, split, manifest):
            with tarfile.open(url) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        record = json.load(tar.extractfile(member))
                        records[record["image_id"]] = record
    return records


def test_row_names_follow_the_class_by_class_numbering():
    assert row_name("1.tif", UCM_CLASSES, 100) == "agricultural00"
    assert row_name("100.tif", UCM_CLASSES, 100) == "agricultural99"
    assert row_name("101.tif", UCM_CLASSES, 100) == "airplane00"
    assert row_name("2100.tif", UCM_CLASSES, 100) == "tenniscourt99"
    assert [row_name(f, UCM_CLASSES, 100) for f in ("0.tif", "2101.tif", "a.tif")] == [None, None, None]


def test_ucm_tags_merge_into_the_shards_and_the_manifest(ucm_with_table, tmp_path, capsys):
    src, table = ucm_with_table
    out = tmp_path / "store"
    assert cli_main(["shards", "convert", "ucm-captions", str(src), str(out), "--tags", str(table)]) == 0
    printed = capsys.readouterr().out
    assert (f"tags from {table} (17 labels): 4 images tagged, 1 images without a row (105.tif), "
            "1 rows without an image (beach07)") in printed

    records = stored_records(out, "ucm-captions")
    assert {r["image_id"]: r["tags"] for r in records.values()} == {
        Path(f).stem: (row[1] if row else []) for f, row in IMAGES.items()
    }
    manifest = read_manifest(str(out), "ucm-captions")
    assert manifest["schema_version"] == 2
    assert manifest["tags"] == sorted({t for row in IMAGES.values() if row for t in row[1]})
    assert manifest["splits"]["test"]["tag_counts"] == {"court": 1, "grass": 1, "trees": 1}
    assert manifest["splits"]["train"]["tag_counts"]["trees"] == 1  # agricultural00 only
    assert manifest["tags_source"] == {
        "file": str(table), "labels": LABELS, "images_tagged": 4,
        "images_without_row": {"count": 1, "first": ["105.tif"]},
        "rows_without_image": {"count": 1, "first": ["beach07"]},
    }

    assert cli_main(["shards", "inspect", str(out)]) == 0
    assert "ucm-captions: 21 classes, 10 tags" in capsys.readouterr().out

    # Without --tags the same corpus has no tags and no tags_source.
    assert cli_main(["shards", "convert", "ucm-captions", str(src), str(tmp_path / "plain")]) == 0
    plain = read_manifest(str(tmp_path / "plain"), "ucm-captions")
    assert plain["tags"] is None and "tags_source" not in plain
    assert {r["tags"] == [] for r in stored_records(tmp_path / "plain", "ucm-captions").values()} == {True}


ROWS = [row for row in IMAGES.values() if row]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (table_text(ROWS, header="IMAGE"), r"line 1: expected the header IMAGE\\LABEL then distinct label names"),
        (table_text(ROWS).replace("harbor00\t0", "harbor00\t2"), r"line 4: value '2', expected 0 or 1"),
        (table_text(ROWS).replace("\t0\r\nharbor00", "\r\nharbor00"), r"line 3: 16 values, expected 17 \(one per label\)"),
        (table_text(ROWS).replace("harbor00", "harbour00"), r"line 4: image 'harbour00': expected a UC Merced class name"),
        (table_text(ROWS).replace("harbor00", "harbor0"), r"line 4: image 'harbor0': expected"),
        (table_text([*ROWS, ROWS[0]]), r"line 6: image 'agricultural00' has a row already"),
        ("", r"empty, expected the header"),
    ],
)
def test_a_malformed_table_is_one_line_naming_it_and_nothing_is_written(ucm_with_table, tmp_path, capsys, text, problem):
    src, table = ucm_with_table
    table.write_bytes(text.encode())
    out = tmp_path / "store"
    assert cli_main(["shards", "convert", "ucm-captions", str(src), str(out), "--tags", str(table)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"spatialnet: error: {table}: "), err
    assert re.search(problem, err), err
    assert not (out / "ucm-captions").exists()


def test_tags_is_refused_by_other_adapters_and_a_missing_table_is_named(ucm_with_table, tmp_path, capsys):
    src, table = ucm_with_table
    assert cli_main(["shards", "convert", "rsicd", str(src), str(tmp_path / "s"), "--tags", str(table)]) == 2
    assert "--tags: adapter rsicd does not take --tags (only ucm-captions do)" in capsys.readouterr().err
    missing = tmp_path / "none.txt"
    assert cli_main(["shards", "convert", "ucm-captions", str(src), str(tmp_path / "s"), "--tags", str(missing)]) == 2
    assert f"{missing}: not found (the UC Merced multi-label table" in capsys.readouterr().err
