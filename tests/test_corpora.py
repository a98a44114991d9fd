"""Corpus adapters and `convert` on tiny fixtures built here in the published layouts."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialnet_dist.cli import main as cli_main
from spatialnet_dist.corpora import ADAPTERS, BAD_RECORDS_SHOWN, convert, get_adapter
from spatialnet_dist.corpora.base import BadRecord
from spatialnet_dist.corpora.rsvqa_lr import RSVQA_HR, RSVQA_LR
from spatialnet_dist.corpora.ucm_captions import RSICD, UCM_CAPTIONS, UCM_CLASSES
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.manifest import read_manifest, shard_urls
from spatialnet_dist.store.schema import FIT_RULE, decode_sample, fit_image
from spatialnet_dist.store.verify import verify_store


def rgb(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


# ---- fixtures in the published layouts ----


def ucm_entry(filename: str, imgid: int, split: str, captions: list[str]) -> dict:
    sentences = [
        {"raw": c, "tokens": c.lower().split(), "imgid": imgid, "sentid": imgid * 5 + k} for k, c in enumerate(captions)
    ]
    return {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": [s["sentid"] for s in sentences],
        "sentences": sentences,
    }


def small_image(entry: dict) -> np.ndarray:
    return rgb(entry["imgid"], 8 + entry["imgid"] % 25)


def make_karpathy(
    src: Path, entries: list[dict], json_name="dataset.json", image_dir="imgs", write_images=True, image=small_image
) -> Path:
    """A Karpathy-layout corpus; `image(entry)` draws each entry's picture."""
    src.mkdir(parents=True, exist_ok=True)
    (src / json_name).write_text(json.dumps({"images": entries, "dataset": "UCM"}))  # upper case, as published
    (src / image_dir).mkdir(exist_ok=True)
    if write_images:
        for e in entries:
            save(src / image_dir / e["filename"], image(e))
    return src


UCM_ENTRIES = [
    ucm_entry("1.tif", 0, "train", ["There is a Piece of Farmland.  ", "Rows of Green crops."]),
    ucm_entry("150.tif", 149, "train", ["An Airplane is parked."]),
    ucm_entry("a.b c.tif", 1000, "val", ["Cars on a Highway."]),  # odd name: sanitised to a_b_c
    ucm_entry("2100.tif", 2099, "test", ["Two Tennis courts."]),
]


@pytest.fixture
def ucm_src(tmp_path) -> Path:
    return make_karpathy(tmp_path / "ucm", UCM_ENTRIES)


def rsvqa_files(src: Path, prefix: str, splits: dict, qa: dict, image_dir: str, ext: str = "tif") -> Path:
    """`splits`: {split: [image ids]} in the order they are listed; `qa`: {image id: [(type, question, answer)]}.
    Every list spans all global ids; rows of other splits are inactive stubs."""
    src.mkdir(parents=True, exist_ok=True)
    images, questions, answers = {}, {}, {}  # global id -> (split, full row)
    for split, ids in splits.items():
        for img_id in ids:
            qids = []
            for qtype, question, answer in qa.get(img_id, []):
                qid = len(questions) + 7  # question and answer ids deliberately differ
                aid = qid + 1000
                questions[qid] = (
                    split,
                    {
                        "id": qid,
                        "img_id": img_id,
                        "type": qtype,
                        "question": question,
                        "answers_ids": [aid],
                        "active": True,
                    },
                )
                answers[aid] = (split, {"id": aid, "question_id": qid, "answer": answer, "active": True})
                qids.append(qid)
            images[img_id] = (
                split,
                {"id": img_id, "questions_ids": qids, "active": True, "original_name": f"tile_{img_id}"},
            )
            save(src / image_dir / f"{img_id}.{ext}", rgb(img_id))
    for split in splits:
        for kind, rows in (("images", images), ("questions", questions), ("answers", answers)):
            listed = [row if s == split else {"id": row["id"], "active": False} for s, row in rows.values()]
            (src / f"{prefix}_{split}_{kind}.json").write_text(json.dumps({kind: listed}))
    return src


LR_SPLITS = {"train": [5, 0, 3], "val": [1], "test": [4, 2]}  # listed out of id order
LR_QA = {
    0: [("count", "How many buildings are there?", "1234"), ("rural_urban", "Is it a rural or an urban area", "rural")],
    1: [("presence", "Is there a road?", "yes")],
    2: [("comp", "Are there more water areas than buildings?", "no")],
    3: [("count", "How many roads are there?", "0")],
    4: [("presence", "Is there a farmland?", "no")],
    5: [("count", "How many water areas are there?", "12"), ("presence", "Is there a building?", "yes")],
}


@pytest.fixture
def lr_src(tmp_path) -> Path:
    return rsvqa_files(tmp_path / "lr", "LR_split", LR_SPLITS, LR_QA, "Images_LR")


def by_id(records) -> dict:
    return {r.image_id: r for r in records}


# ---- adapters ----


def test_registry_lists_the_corpora():
    assert {"ucm-captions", "rsicd", "sydney-captions", "rsvqa-lr", "rsvqa-hr", "synthetic"} <= set(ADAPTERS)
    for name, adapter in ADAPTERS.items():
        assert adapter.name == name and adapter.description
    with pytest.raises(UserError, match=r"unknown corpus adapter 'ucm'.*ucm-captions.*rsvqa-lr"):
        get_adapter("ucm")
    with pytest.raises(UserError, match="shards synth"):
        get_adapter("synthetic").records(Path("."))
    assert all(isinstance(c, str) for c in get_adapter("synthetic").classes)


def test_ucm_splits_labels_captions_and_ids(ucm_src):
    recs = by_id(UCM_CAPTIONS.records(ucm_src))
    assert set(recs) == {"1", "150", "a_b_c", "2100"}
    assert {r.split for r in recs.values()} == {"train", "val", "test"}
    assert recs["1"].captions == ["There is a Piece of Farmland.", "Rows of Green crops."]  # case kept, stripped
    assert (recs["1"].label, recs["1"].label_name) == (0, "agricultural")
    assert (recs["150"].label, recs["150"].label_name) == (1, "airplane")
    assert (recs["a_b_c"].label, recs["a_b_c"].label_name) == (10, "harbor")
    assert (recs["2100"].label, recs["2100"].label_name) == (20, "tenniscourt")
    assert UCM_CAPTIONS.classes == UCM_CLASSES and len(UCM_CLASSES) == 21 and UCM_CLASSES == sorted(UCM_CLASSES)
    assert recs["a_b_c"].image.dtype == np.uint8 and recs["a_b_c"].image.shape == (8 + 1000 % 25,) * 2 + (3,)
    np.testing.assert_array_equal(recs["150"].image, rgb(149, 8 + 149 % 25))
    assert recs["a_b_c"].meta == {"filename": "a.b c.tif", "imgid": 1000}


def test_rsicd_variant_has_no_labels(tmp_path):
    entries = [
        ucm_entry("airport_1.jpg", 0, "train", ["Many Planes."]),
        ucm_entry("beach_7.png", 1, "test", ["A Beach."]),
    ]
    src = make_karpathy(tmp_path / "rsicd", entries, json_name="dataset_rsicd.json", image_dir="RSICD_images")
    recs = by_id(RSICD.records(src))
    assert set(recs) == {"airport_1", "beach_7"}
    assert all(r.label is None and r.label_name is None for r in recs.values())
    assert RSICD.classes is None and get_adapter("sydney-captions").classes is None
    assert recs["airport_1"].image.shape == (8, 8, 3)  # JPEG: lossy, only the shape is checked


def test_rsvqa_lr_follows_ids_not_positions(lr_src):
    recs = by_id(RSVQA_LR.records(lr_src))
    assert set(recs) == {"0", "1", "2", "3", "4", "5"}  # inactive rows of other splits are skipped
    assert {i: r.split for i, r in recs.items()} == {
        "5": "train",
        "0": "train",
        "3": "train",
        "1": "val",
        "4": "test",
        "2": "test",
    }
    for img_id, rec in recs.items():
        expected = [{"type": t, "question": q, "answer": a} for t, q, a in LR_QA[int(img_id)]]
        assert [{k: qa[k] for k in ("type", "question", "answer")} for qa in rec.qa] == expected
        assert rec.label is None and rec.captions == []
        np.testing.assert_array_equal(rec.image, rgb(int(img_id)))
    assert recs["0"].qa[0]["answer"] == "1234"  # counts stay raw, not binned
    assert len({qa["qid"] for r in recs.values() for qa in r.qa}) == sum(len(v) for v in LR_QA.values())


def test_rsvqa_hr_layout_with_area_and_second_test_set(tmp_path):
    splits = {"train": [3, 1], "val": [0], "test": [2], "test_phili": [4]}
    qa = {
        i: [
            ("area", "What is the area covered by residential buildings?", f"{i * 10}m2"),
            ("presence", "Is there a road?", "yes"),
        ]
        for i in range(5)
    }
    src = rsvqa_files(tmp_path / "hr", "USGS_split", splits, qa, "Data", ext="png")
    recs = by_id(RSVQA_HR.records(src))
    assert {i: r.split for i, r in recs.items()} == {
        "3": "train",
        "1": "train",
        "0": "val",
        "2": "test",
        "4": "test_phili",
    }
    assert recs["2"].qa[0] == {"qid": recs["2"].qa[0]["qid"], "question": qa[2][0][1], "answer": "20m2", "type": "area"}


# ---- bad input ----


def test_malformed_json_names_the_file_and_position(ucm_src, lr_src):
    (ucm_src / "dataset.json").write_text('{"images": [\n  {"filename": "1.tif",, }]}')
    with pytest.raises(UserError, match=r"dataset\.json: malformed JSON at line 2 column"):
        UCM_CAPTIONS.records(ucm_src)
    (lr_src / "LR_split_val_questions.json").write_text("{")
    with pytest.raises(UserError, match=r"LR_split_val_questions\.json: malformed JSON at line 1"):
        list(RSVQA_LR.records(lr_src))


def test_missing_source_files_are_named(tmp_path, lr_src):
    with pytest.raises(UserError, match=r"nowhere: corpus folder not found"):
        UCM_CAPTIONS.records(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"dataset\.json: not found"):
        UCM_CAPTIONS.records(tmp_path / "empty")
    (lr_src / "LR_split_test_answers.json").unlink()
    with pytest.raises(UserError, match=r"LR_split_test_answers\.json: not found"):
        RSVQA_LR.records(lr_src)


def test_bad_records_name_record_and_file(tmp_path):
    entries = [
        ucm_entry("ok.tif", 0, "train", ["Fine."]),
        ucm_entry("rgba.png", 1, "train", ["Alpha is dropped."]),
        ucm_entry("missing.tif", 2, "train", ["No file."]),
        ucm_entry("garbage.tif", 3, "train", ["Not a TIFF."]),
        ucm_entry("twoband.tif", 4, "train", ["Two bands."]),
        ucm_entry("silent.tif", 5, "train", ["   "]),
    ]
    src = make_karpathy(tmp_path / "ucm", entries, write_images=False)
    save(src / "imgs/ok.tif", rgb(0))
    save(src / "imgs/rgba.png", np.dstack([rgb(1), np.full((16, 16), 7, np.uint8)]), mode="RGBA")
    (src / "imgs/garbage.tif").write_bytes(b"II*\x00" + b"\x13" * 64)
    save(src / "imgs/twoband.tif", np.zeros((8, 8, 2), np.uint8), mode="LA")
    save(src / "imgs/silent.tif", rgb(5))
    out = list(UCM_CAPTIONS.records(src))
    good = {r.image_id: r for r in out if not isinstance(r, BadRecord)}
    bad = {b.record: b for b in out if isinstance(b, BadRecord)}
    assert set(good) == {"ok", "rgba"}
    np.testing.assert_array_equal(good["rgba"].image, rgb(1))
    assert set(bad) == {f"image {n!r}" for n in ("missing.tif", "garbage.tif", "twoband.tif", "silent.tif")}
    assert (
        bad["image 'missing.tif'"].path == str(src / "imgs/missing.tif")
        and "missing" in bad["image 'missing.tif'"].problem
    )
    assert bad["image 'garbage.tif'"].path.endswith("garbage.tif") and "tifffile" in bad["image 'garbage.tif'"].problem
    assert "2 band(s), expected 3" in bad["image 'twoband.tif'"].problem
    assert (
        bad["image 'silent.tif'"].path.endswith("dataset.json") and "no captions" in bad["image 'silent.tif'"].problem
    )
    assert str(bad["image 'missing.tif'"]) == f"image 'missing.tif' ({src / 'imgs/missing.tif'}): image file missing"


def test_tifffile_reads_what_pil_cannot(tmp_path):
    """A TIFF that PIL rejects goes to tifffile; 16-bit planar data stays 16-bit, (H, W, C)."""
    import tifffile

    planar = np.arange(3 * 20 * 20, dtype=np.uint16).reshape(3, 20, 20) * 50
    src = make_karpathy(tmp_path / "ucm", [ucm_entry("deep.tif", 0, "train", ["Sixteen bits."])], write_images=False)
    tifffile.imwrite(src / "imgs/deep.tif", planar, photometric="minisblack", planarconfig="separate")
    (rec,) = UCM_CAPTIONS.records(src)
    assert rec.image.dtype == np.uint16
    np.testing.assert_array_equal(rec.image, np.moveaxis(planar, 0, -1))


def test_rsvqa_image_without_questions_or_with_dangling_ids(lr_src):
    path = lr_src / "LR_split_train_images.json"
    doc = json.loads(path.read_text())
    rows = {r["id"]: r for r in doc["images"]}
    rows[0]["questions_ids"] = []
    rows[3]["questions_ids"] = [99999]
    path.write_text(json.dumps(doc))
    (lr_src / "Images_LR/5.tif").unlink()
    out = list(RSVQA_LR.records(lr_src))
    bad = {b.record: b for b in out if isinstance(b, BadRecord)}
    assert set(bad) == {"train image 0", "train image 3", "train image 5"}
    assert "no questions" in bad["train image 0"].problem and bad["train image 0"].path == str(path)
    assert "question 99999" in bad["train image 3"].problem and bad["train image 3"].path.endswith(
        "LR_split_train_questions.json"
    )
    assert bad["train image 5"].path.endswith("Images_LR/5.tif")
    assert len(out) - len(bad) == 3


# ---- convert through the store's writer ----


def read_store(root: Path, corpus: str) -> dict:
    """image_id -> Sample, read back from the tar shards the manifest lists."""
    manifest = read_manifest(str(root), corpus)
    samples = {}
    for split in manifest["splits"]:
        for url in shard_urls(str(root), corpus, split, manifest):
            members: dict[str, dict] = {}
            with tarfile.open(url) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
            for key, sample_members in members.items():
                samples[key] = decode_sample(sample_members)
    return samples


def test_convert_round_trip_ucm(ucm_src, tmp_path, capsys):
    out = tmp_path / "store"
    assert convert("ucm-captions", ucm_src, str(out), shard_size=2) == 0
    assert "4 samples (train 2, val 1, test 1)" in capsys.readouterr().out
    expected = by_id(UCM_CAPTIONS.records(ucm_src))
    stored = read_store(out, "ucm-captions")
    assert set(stored) == set(expected)
    for key, sample in stored.items():  # the fixture's small images are fitted to UCM's 256x256
        want = expected[key]
        assert sample.record() == {**want.record(), "meta": {**want.meta, "original_size": [*want.image.shape[:2]]}}
        np.testing.assert_array_equal(sample.image, fit_image(want.image, (256, 256)))
    assert verify_store(str(out)) == []
    manifest = read_manifest(str(out), "ucm-captions")
    assert manifest["classes"] == UCM_CLASSES and manifest["image_size"] == [256, 256]
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert [len(v["shards"]) for v in manifest["splits"].values()] == [1, 2, 1]  # one sample each: under 16


# The published UCM-captions release in small: images numbered class by class (the label is
# imgid // 100), so dataset.json lists them sorted by class; 256x256 but for a few of the odd sizes of
# the release; one image whose captions describe another class (its label still comes from imgid).
ODD_SIZES = {3: (247, 247), 104: (257, 257), 2009: (242, 256)}  # imgid -> (H, W): two train images, one test
OFF_CLASS = 205  # a baseballdiamond image captioned as an airplane scene


def ucm_release(src: Path, per_class: int = 10) -> Path:
    """21 classes x `per_class` images: per class all but two train, then one val, one test."""
    entries = []
    for c, name in enumerate(UCM_CLASSES):
        for k in range(per_class):
            imgid = 100 * c + k
            split = "train" if k < per_class - 2 else "val" if k == per_class - 2 else "test"
            topic = "airplane" if imgid == OFF_CLASS else name
            entries.append(ucm_entry(f"{imgid + 1}.tif", imgid, split, [f"A {topic} scene.", f"Some {topic} {k}."]))

    def picture(entry: dict) -> np.ndarray:  # flat colours: small files, and fitting keeps them exact
        h, w = ODD_SIZES.get(entry["imgid"], (256, 256))
        return np.full((h, w, 3), (entry["imgid"] // 100 * 12, entry["imgid"] % 100 * 20, 128), np.uint8)

    return make_karpathy(src, entries, image=picture)


def test_class_sorted_ucm_release_converts_into_mixed_shards(tmp_path, capsys):
    """Every train shard holds at least 5 of the 21 classes. In source order the 168 train records
    (8 per class) would fill 16 shards of 10-11 consecutive records, each spanning at most 3 classes;
    shuffled, some shard holds fewer than 5 classes for under 1 in 2000 seeds (simulated)."""
    src = ucm_release(tmp_path / "UCM_captions")
    out = tmp_path / "store"
    assert convert("ucm-captions", src, str(out)) == 0
    printed = capsys.readouterr().out
    assert "210 samples (train 168, val 21, test 21) in 48 shards" in printed and "0 bad records skipped" in printed
    assert f"3 images of another size fitted to 256x256 ({FIT_RULE})" in printed
    manifest = read_manifest(str(out), "ucm-captions")
    assert manifest["shuffle_seed"] == 0 and manifest["image_size"] == [256, 256]
    resized = {split: v["resized"]["count"] for split, v in manifest["splits"].items()}
    assert resized == {"train": 2, "val": 0, "test": 1}
    assert {v["resized"]["rule"] for v in manifest["splits"].values()} == {FIT_RULE}

    train_urls = shard_urls(str(out), "ucm-captions", "train", manifest)
    assert len(train_urls) == 16
    for url in train_urls:
        with tarfile.open(url) as tar:
            records = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        assert len({r["label"] for r in records}) >= 5, (url, sorted(r["label"] for r in records))

    stored = read_store(out, "ucm-captions")
    assert len(stored) == 210 and {s.image.shape for s in stored.values()} == {(256, 256, 3)}
    original = {key: s.meta["original_size"] for key, s in stored.items() if "original_size" in s.meta}
    assert original == {"4": [247, 247], "105": [257, 257], "2010": [242, 256]}
    off = stored[str(OFF_CLASS + 1)]
    assert off.label_name == "baseballdiamond" and off.captions[0] == "A airplane scene."
    assert verify_store(str(out)) == []

    # The same seed gives the same shards, byte for byte, whatever the number of worker processes
    # (shard names differ: they carry each conversion's id); another seed another order of the same samples.
    def unnamed(splits: dict) -> dict:
        return {split: {**v, "shards": [{**s, "name": None} for s in v["shards"]]} for split, v in splits.items()}

    assert convert("ucm-captions", src, str(tmp_path / "again"), workers=2) == 0
    assert unnamed(read_manifest(str(tmp_path / "again"), "ucm-captions")["splits"]) == unnamed(manifest["splits"])
    assert convert("ucm-captions", src, str(tmp_path / "other"), shuffle_seed=7) == 0
    other = read_manifest(str(tmp_path / "other"), "ucm-captions")
    assert other["shuffle_seed"] == 7 and set(read_store(tmp_path / "other", "ucm-captions")) == set(stored)
    train_sha = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    assert not set(train_sha) & {s["sha256"] for s in other["splits"]["train"]["shards"]}


def test_convert_rsvqa_lr_with_another_name(lr_src, tmp_path):
    out = tmp_path / "store"
    assert convert("rsvqa-lr", lr_src, str(out), name="lr-copy") == 0
    stored = read_store(out, "lr-copy")
    assert {s.corpus for s in stored.values()} == {"lr-copy"}
    assert stored["0"].qa[0]["answer"] == "1234"


def test_bad_records_are_skipped_counted_and_capped(tmp_path, capsys):
    entries = [ucm_entry(f"{i}.tif", i, "train", ["A Field."]) for i in range(BAD_RECORDS_SHOWN + 25)]
    src = make_karpathy(tmp_path / "ucm", entries)
    for i in range(BAD_RECORDS_SHOWN + 5):
        (src / f"imgs/{i}.tif").unlink()
    out = tmp_path / "store"
    assert convert("ucm-captions", src, str(out), max_bad_fraction=0.6) == 0
    err = capsys.readouterr()
    assert err.err.count("bad record: image ") == BAD_RECORDS_SHOWN
    assert "... and 5 more bad records" in err.err
    assert "20 samples (train 20)" in err.out and "25 bad records skipped" in err.out
    assert len(read_store(out, "ucm-captions")) == 20


def test_over_the_bad_fraction_keeps_the_prior_corpus(ucm_src, tmp_path, capsys):
    out = tmp_path / "store"
    assert convert("ucm-captions", ucm_src, str(out)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (ucm_src / "imgs/1.tif").unlink()  # 1 of 4 bad: 25% > 5%
    assert convert("ucm-captions", ucm_src, str(out)) == 1
    assert "1 of 4 records bad" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert convert("ucm-captions", ucm_src, str(out), max_bad_fraction=0.25) == 0  # at the fraction: accepted
    assert set(read_store(out, "ucm-captions")) == {"150", "a_b_c", "2100"}


def test_strict_stops_at_the_first_bad_record(ucm_src, tmp_path):
    (ucm_src / "imgs/150.tif").unlink()
    (ucm_src / "imgs/2100.tif").unlink()
    out = tmp_path / "store"
    with pytest.raises(UserError, match=r"bad record image '150\.tif' \(.*150\.tif\): image file missing \(--strict"):
        convert("ucm-captions", ucm_src, str(out), strict=True)
    assert not (out / "ucm-captions" / "manifest.json").exists()


def test_malformed_later_split_file_writes_nothing(lr_src, tmp_path):
    out = tmp_path / "store"
    assert convert("rsvqa-lr", lr_src, str(out)) == 0
    before = (out / "rsvqa-lr/manifest.json").read_bytes()
    (lr_src / "LR_split_test_answers.json").write_text('{"answers": [}')
    with pytest.raises(UserError, match=r"LR_split_test_answers\.json: malformed JSON at line 1 column 14"):
        convert("rsvqa-lr", lr_src, str(out))
    assert (out / "rsvqa-lr/manifest.json").read_bytes() == before
    assert set(read_store(out, "rsvqa-lr")) == {"0", "1", "2", "3", "4", "5"}


def test_convert_duplicate_image_ids_are_bad(tmp_path, capsys):
    entries = [ucm_entry("x.tif", 0, "train", ["One."]), ucm_entry("x.tif", 1, "test", ["Two."])]
    src = make_karpathy(tmp_path / "ucm", entries)
    assert convert("ucm-captions", src, str(tmp_path / "store"), max_bad_fraction=0.5) == 0
    assert "duplicate image_id" in capsys.readouterr().err


def test_cli_convert(ucm_src, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli_main(["shards", "convert", "ucm-captions", str(ucm_src), str(out), "--shard-size", "3"]) == 0
    assert len(read_store(out, "ucm-captions")) == 4
    options = ["--shard-bytes", "1G", "--min-shards", "1", "--shuffle-seed", "5"]
    assert cli_main(["shards", "convert", "ucm-captions", str(ucm_src), str(out), *options]) == 0
    manifest = read_manifest(str(out), "ucm-captions")
    assert manifest["shuffle_seed"] == 5 and [len(v["shards"]) for v in manifest["splits"].values()] == [1, 1, 1]
    assert cli_main(["shards", "convert", "ucm-captions", str(ucm_src), str(out), "--min-shards", "0"]) == 2
    assert "--min-shards 0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["shards", "convert", "ucm-captions", str(ucm_src), str(out), "--shard-bytes", "12X"])
    assert "'12X': expected a positive size such as 268435456, 256M or 1G" in capsys.readouterr().err
    assert cli_main(["shards", "convert", "nope", str(ucm_src), str(out)]) == 2
    assert "unknown corpus adapter 'nope'" in capsys.readouterr().err
    (ucm_src / "dataset.json").write_text("[")
    assert cli_main(["shards", "convert", "ucm-captions", str(ucm_src), str(out)]) == 2
    assert "dataset.json: malformed JSON" in capsys.readouterr().err


def test_8bit_rgb_is_stored_as_png(ucm_src, tmp_path):
    out = tmp_path / "store"
    assert convert("ucm-captions", ucm_src, str(out)) == 0
    names = [n for tar in (out / "ucm-captions").rglob("*.tar") for n in tarfile.open(tar).getnames()]
    assert sorted(names) == sorted(f"{k}.{ext}" for k in ("1", "150", "a_b_c", "2100") for ext in ("png", "json"))


def test_images_above_the_pixel_limit_are_refused_by_name(ucm_src, tmp_path, monkeypatch):
    from spatialnet_dist.store import schema

    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 10)  # checked from the header, before decoding
    with pytest.raises(UserError, match=r"bad record image '\w+\.tif' \(.*\.tif\): \d+x\d+ image: \d+ pixels, above "
                                        r"the limit of 10 \(store/schema\.py MAX_IMAGE_PIXELS\) \(--strict"):
        convert("ucm-captions", ucm_src, str(tmp_path / "store"), strict=True)
