"""Hostile and broken inputs: images above the pixel limit, and a fuzz of byte flips and truncations over
shards and manifests that `shards verify`, `shards inspect` and training reads meet with named errors or
counted skips, never a traceback."""

from __future__ import annotations

import random
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatialnet_dist import config as config_mod
from spatialnet_dist.data.streams import StreamCounts, decode_samples, read_shards, task_rows, task_stream_spec
from spatialnet_dist.data.transforms import task_transform
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.errors import UserError
from spatialnet_dist.evaluate.predict import load_image
from spatialnet_dist.store import schema
from spatialnet_dist.store.inspect import format_inspect, inspect_store
from spatialnet_dist.store.verify import verify_store
from spatialnet_dist.store.writer import ShardWriter
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS

FUZZ_CASES = 1000


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_predict_refuses_images_above_the_pixel_limit(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"big{suffix}"
    image = np.zeros((40, 30, 3), np.uint8)
    if suffix == ".png":
        Image.fromarray(image).save(path)
    else:
        np.save(path, image)
    assert load_image(path).shape == (40, 30, 3)
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match=rf"big\{suffix}: 30x40 image: 1200 pixels, above the limit of 1000"):
        load_image(path)


def test_pil_decompression_bombs_are_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses in Image.open above twice its limit
    with pytest.raises(UserError, match=r"bomb\.png: image too large"):
        load_image(path)


def test_shard_images_above_the_pixel_limit_are_schema_errors(monkeypatch):
    _, png = schema.encode_image(np.zeros((40, 30, 3), np.uint8))
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(schema.SchemaError, match="30x40 image: 1200 pixels"):
        schema.decode_image("png", png)


# ---- fuzz ----


def _tiny_store(root: Path) -> None:
    """One corpus with every task's content: 8x8 images (PNG and NPY), captions, questions, labels; 2 splits."""
    rng = np.random.default_rng(0)
    with ShardWriter(str(root), "tiny", classes=["field", "town"], shard_size=2, min_shards=2) as writer:
        for i in range(8):
            image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) if i % 4 else rng.random((8, 8, 4), np.float32)
            writer.write(schema.Sample(
                corpus="tiny", image_id=f"im{i}", split="train" if i < 6 else "val", image=image, label=i % 2,
                label_name=("field", "town")[i % 2], captions=[f"a {('field', 'town')[i % 2]} with {i} houses"],
                qa=[{"qid": f"q{i}", "question": "how many houses", "answer": str(i), "type": "count"},
                    {"qid": f"p{i}", "question": "is there a road", "answer": "yes", "type": "presence"}]))


def _read_as_training_does(cfg, task: str) -> str:
    """What a training run of `task` reads: the manifest (vocabularies, shard list), then every train shard
    once through the training pipeline's stages (read, decode, task rows), skipping and counting bad input."""
    vocabs = build_vocabs(cfg)
    spec = task_stream_spec(cfg, vocabs, task, "train", task_transform(cfg, task, train=True), train=True)
    counts = StreamCounts(task, cfg.data.max_bad_fraction)
    shards = [{"url": s.url, "samples": s.samples} for s in spec.shards()]
    for _ in task_rows(decode_samples(read_shards(shards, counts), counts), spec.rows, np.random.default_rng(0)):
        pass
    return "skipped" if counts.skipped else "clean"


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """A truncation (a third of the cases) or 1-8 random byte flips."""
    if rng.random() < 1 / 3:
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
    return bytes(out)


@pytest.mark.parametrize("cases", [150, pytest.param(FUZZ_CASES, marks=pytest.mark.slow)])
def test_fuzzed_shards_and_manifests_give_named_errors_not_tracebacks(tmp_path, cases):
    root = tmp_path / "store"
    _tiny_store(root)
    pristine = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert root / "tiny/manifest.json" in pristine and len(pristine) >= 5
    cfg = config_mod.load(None, [f"data.root={root}", "model.image_size=32", "model.in_chans=4"]
                          + [f"tasks.{t}.corpora=[tiny]" for t in TASKS])
    steps = {  # -> how the reader met the case: "error" (a named UserError), "reported", "skipped" or "clean"
        "verify": lambda case: "reported" if verify_store(str(root)) else "clean",
        "inspect": lambda case: format_inspect(inspect_store(str(root))) and "clean",
        "train": lambda case: _read_as_training_does(cfg, TASKS[case % len(TASKS)]),  # each task in turn
    }
    assert verify_store(str(root)) == []  # the pristine store reads cleanly
    for task in TASKS:
        _read_as_training_does(cfg, task)

    rng, tracebacks, outcomes = random.Random(0), [], Counter()
    for case in range(cases):
        path = rng.choice(list(pristine))
        path.write_bytes(_mutate(pristine[path], rng))
        for name, step in steps.items():
            try:
                outcome = step(case)
            except UserError as e:
                assert "\n" not in str(e), str(e)
                outcome = "error"
            except Exception:
                tracebacks.append(f"case {case} ({path.name}, {name}): {traceback.format_exc(limit=-3)}")
                outcome = "traceback"
            outcomes[name, outcome] += 1
            if name == "verify" and path.suffix == ".tar":
                assert outcome in ("reported", "error"), f"case {case}: verify missed a damaged shard {path.name}"
        path.write_bytes(pristine[path])
    print(f"fuzz: {cases} cases, {len(tracebacks)} tracebacks; outcomes {dict(sorted(outcomes.items()))}")
    assert not tracebacks, f"{len(tracebacks)} tracebacks, first: {tracebacks[0]}"
