"""Mixup and cutmix (data/mixing.py): mixed images and targets by the numbers, the lambda-weighted loss, draws as a
function of (seed, micro-batch, rank), classification and tagging mixing alike and still sharing their encoder
pass, captioning and unmixed micro-batches untouched, and the config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spatialnet_dist import config as config_mod
from spatialnet_dist.batch_format import IMAGE_KEY, IMAGE_ROW, IMAGES, task_images
from spatialnet_dist.config import ConfigError, LossConfig
from spatialnet_dist.data.batches import make_eval_loader, make_train_loader
from spatialnet_dist.data.mixing import MixSettings, draw_mix, mix_rng, mix_settings, mix_sub_batch
from spatialnet_dist.data.vocab import build_vocabs
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.writer import ShardWriter
from spatialnet_dist.tasks import get

B, S = 4, 8  # rows and image size of the hand-made sub-batches


def sub_batch(seed: int = 0) -> dict:
    """A training sub-batch with both tasks' targets: labels (one outside the vocabulary) and multi-hot tags."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(B, 3, S, S, generator=g), "image_id": [f"im{i}" for i in range(B)],
            "label": torch.tensor([0, 2, -1, 1]), "tags": (torch.rand(B, 5, generator=g) > 0.5).float(),
            IMAGE_KEY: ["c/0@0", "c/1@2m", "", "c/3@1"]}


def mixed(settings: MixSettings, task: str, index: int = 3):
    """(the unmixed sub-batch, it mixed at micro-batch `index`, the mix drawn there)."""
    sub = sub_batch()
    mix = draw_mix(settings, mix_rng(0, "stream", index, 0), S, S)
    return sub, mix_sub_batch(sub, task, settings, mix_rng(0, "stream", index, 0)), mix


def test_mixup_blends_row_i_with_row_b_minus_1_minus_i_and_weighs_the_targets_alike():
    settings = MixSettings(mixup=0.4, cutmix=0.0, prob=1.0)
    sub, out, mix = mixed(settings, "classification")
    lam, x = mix.lam, sub["image"]
    assert mix.kind == "mixup" and mix.box is None and 0 < lam < 1
    for i in range(B):
        assert torch.equal(out["image"][i], lam * x[i] + (1 - lam) * x[B - 1 - i])
    assert out["label_mix"].tolist() == [1, -1, 2, 0] and out["mix_lambda"].tolist() == [pytest.approx(lam)] * B
    assert out["mix_lambda"].dtype == torch.float32 and out["label_mix"].dtype == torch.int64
    assert out[IMAGE_KEY] == [f"mix(c/0@0,c/3@1,mixup,{lam!r},None)", "", "", f"mix(c/3@1,c/0@0,mixup,{lam!r},None)"]
    assert torch.equal(sub["image"], x) and "mix_lambda" not in sub  # the collated sub-batch is left as it was

    tagged = mixed(settings, "tagging")[1]
    t = sub["tags"]
    assert torch.equal(tagged["tags"], lam * t + (1 - lam) * t.flip(0)) and "mix_lambda" not in tagged
    assert torch.equal(tagged["image"], out["image"]) and tagged[IMAGE_KEY] == out[IMAGE_KEY]


def test_cutmix_pastes_the_partners_box_and_lambda_is_the_kept_area():
    settings = MixSettings(mixup=0.0, cutmix=1.0, prob=1.0)
    boxes = []
    for index in range(20):
        sub, out, mix = mixed(settings, "classification", index)
        top, bottom, left, right = mix.box
        area = (bottom - top) * (right - left)
        assert mix.kind == "cutmix" and mix.lam == 1 - area / (S * S) and out["mix_lambda"][0] == np.float32(mix.lam)
        inside = torch.zeros(S, S, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        x = sub["image"]
        assert torch.equal(out["image"][:, :, inside], x.flip(0)[:, :, inside])
        assert torch.equal(out["image"][:, :, ~inside], x[:, :, ~inside])
        assert int((out["image"][0] != x[0]).any(0).sum()) == area  # exactly the box changed (random pixels)
        boxes.append(mix.box)
    assert len(set(boxes)) > 10  # a new box each micro-batch


def test_mix_prob_and_the_switch_between_mixup_and_cutmix():
    both = MixSettings(mixup=0.8, cutmix=1.0, prob=0.5)
    draws = [draw_mix(both, mix_rng(0, "stream", index, 0), S, S) for index in range(400)]
    mixes = [d for d in draws if d is not None]
    assert 0.4 < len(mixes) / len(draws) < 0.6
    assert 0.4 < sum(d.kind == "cutmix" for d in mixes) / len(mixes) < 0.6
    unmixed = next(i for i, d in enumerate(draws) if d is None)
    sub = sub_batch()
    assert mix_sub_batch(sub, "tagging", both, mix_rng(0, "stream", unmixed, 0)) is sub  # untouched, bit for bit


def test_the_draw_is_a_function_of_seed_stream_micro_batch_and_rank():
    settings = MixSettings(mixup=0.4, cutmix=0.0, prob=1.0)

    def lam(seed=0, stream="stream", index=0, rank=0) -> float:
        return draw_mix(settings, mix_rng(seed, stream, index, rank), S, S).lam

    assert lam() == lam()
    assert len({lam(), lam(seed=1), lam(stream="other"), lam(index=1), lam(rank=1)}) == 5


def test_a_mixed_classification_loss_is_the_lambda_weighted_cross_entropy_of_both_labels():
    settings = MixSettings(mixup=0.4, cutmix=0.0, prob=1.0)
    out = mixed(settings, "classification")[1]
    logits = torch.randn(B, 3, generator=torch.Generator().manual_seed(1))
    cfg, lam = LossConfig(label_smoothing=0.1), float(out["mix_lambda"][0])
    loss = get("classification").loss({"logits": logits}, out, cfg, None)

    def ce(rows: list[int], labels: list[int]) -> torch.Tensor:  # mean CE of the labelled rows (label -1: none)
        return F.cross_entropy(logits[rows], torch.tensor(labels), label_smoothing=0.1, reduction="sum") / 3

    # labels [0, 2, -1, 1], partners' [1, -1, 2, 0]: row 2's own and row 1's partner's label count nothing
    expected = lam * ce([0, 1, 3], [0, 2, 1]) + (1 - lam) * ce([0, 2, 3], [1, 2, 0])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    unmixed = get("classification").loss({"logits": logits}, sub_batch(), cfg, None)
    assert unmixed.item() == pytest.approx(ce([0, 1, 3], [0, 2, 1]).item(), rel=1e-6)


# ---- through the loader ----

CLASSES = ["field", "forest", "water"]
TAGS = ["car", "tree", "water"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """12 train images, each with a label, tags and a caption."""
    root = str(tmp_path_factory.mktemp("mix"))
    rng = np.random.default_rng(0)
    with ShardWriter(root, "toy", classes=CLASSES, shard_size=6, min_shards=1) as w:
        for i in range(12):
            w.write(Sample("toy", f"toy_{i}", "train", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                           label=i % 3, label_name=CLASSES[i % 3], captions=[f"a {CLASSES[i % 3]} scene"],
                           tags=[t for k, t in enumerate(TAGS) if (i >> k) & 1] or ["car"]))
    return root


def load(store: str, mix: bool) -> config_mod.Config:
    """classification, tagging and captioning on one corpus with one batch size, all under symmetry augmentation."""
    mixing = ["mixup=0.4", "cutmix=1.0", "mix_prob=0.75"] if mix else []
    return config_mod.load(None, [
        f"data.root={store}", "data.loader_workers=0", "model.image_size=32", "tasks.vqa.enabled=false",
        "tasks.regression.enabled=false", "tasks.tagging.enabled=true", "tasks.classification.augment=symmetry",
        *[f"tasks.{t}.{k}" for t in ("classification", "tagging", "captioning") for k in ("corpora=[toy]", "batch_size=4")],
        *[f"tasks.{t}.{m}" for t in ("classification", "tagging") for m in mixing]])


def batches(cfg, n: int, start: int = 0, rank: int = 0) -> list[dict]:
    loader = make_train_loader(cfg, build_vocabs(cfg), rank, 2, start)
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def same(a: dict | torch.Tensor, b: dict | torch.Tensor) -> bool:
    if isinstance(a, torch.Tensor):  # a micro-batch's IMAGES
        return torch.equal(a, b)
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k]
                                        for k, v in a.items())


def test_classification_and_tagging_mix_alike_share_their_encoder_pass_and_captioning_is_never_mixed(store):
    plain, mixed_batches = batches(load(store, mix=False), 12), batches(load(store, mix=True), 12)
    kinds = set()
    for before, after in zip(plain, mixed_batches):
        assert same(*({k: v for k, v in b["captioning"].items() if k != IMAGE_ROW} for b in (after, before)))
        assert torch.equal(task_images(after, "captioning"), task_images(before, "captioning"))
        cls, tags = after["classification"], after["tagging"]
        if "mix_lambda" not in cls:  # an unmixed micro-batch: the tasks' sub-batches as without mixing
            assert all(same(after[t], before[t]) for t in (IMAGES, "classification", "tagging", "captioning"))
            kinds.add("none")
            continue
        _, _, kind, lam, _ = cls[IMAGE_KEY][0].split(",", 4)  # mix(key_i,key_j,kind,lam,box): lam in full
        lam, x, t = float(lam), task_images(before, "classification"), before["tagging"]["tags"]
        kinds.add(kind)
        assert cls["mix_lambda"].tolist() == [np.float32(lam)] * 4
        assert all(k.startswith("mix(") for k in cls[IMAGE_KEY]) and cls[IMAGE_KEY] == tags[IMAGE_KEY]
        assert torch.equal(cls[IMAGE_ROW], tags[IMAGE_ROW])  # one row of IMAGES per mixed image, for both tasks
        assert cls["label_mix"].tolist() == cls["label"].flip(0).tolist()
        assert torch.equal(tags["tags"], lam * t + (1 - lam) * t.flip(0))
        if kind == "mixup":
            assert torch.equal(task_images(after, "classification"), lam * x + (1 - lam) * x.flip(0))
        assert len(after[IMAGES]) == 8  # 4 mixed images for both tasks, 4 plain ones for captioning
    assert kinds == {"none", "mixup", "cutmix"}
    lams = {float(b["classification"]["mix_lambda"][0]) for b in mixed_batches if "mix_lambda" in b["classification"]}
    assert len(lams) > 3  # a new lambda each mixed micro-batch

    again = batches(load(store, mix=True), 12)
    assert all(same(a[t], b[t]) for a, b in zip(mixed_batches, again) for t in a)
    resumed = batches(load(store, mix=True), 4, start=8)  # a resumed loader: the same micro-batches 8..11
    assert all(same(a[t], b[t]) for a, b in zip(mixed_batches[8:], resumed) for t in a)
    other_rank = batches(load(store, mix=True), 12, rank=1)
    assert lams != {float(b["classification"]["mix_lambda"][0]) for b in other_rank if "mix_lambda" in b["classification"]}


def test_evaluation_is_never_mixed(store):
    cfg = load(store, mix=True)
    for sub in make_eval_loader(cfg, build_vocabs(cfg), "classification", "train", 0, 1):
        assert "mix_lambda" not in sub and IMAGE_KEY not in sub


# ---- config ----


def test_mixing_is_off_by_default_and_on_for_classification_and_tagging_only():
    cfg = config_mod.load(None, ["tasks.tagging.cutmix=1", "tasks.tagging.mix_prob=0.5"])
    assert mix_settings(cfg, "tagging") == MixSettings(mixup=0.0, cutmix=1.0, prob=0.5)
    assert mix_settings(cfg, "classification") is None and mix_settings(cfg, "captioning") is None
    assert mix_settings(config_mod.load(None, ["tasks.classification.mixup=0.2", "tasks.classification.mix_prob=0"]),
                        "classification") is None


@pytest.mark.parametrize(("override", "message"), [
    ("tasks.captioning.mixup=0.2", "unknown config key tasks.captioning.mixup"),
    ("tasks.vqa.cutmix=1", "unknown config key tasks.vqa.cutmix"),
    ("tasks.classification.mixup=-0.1", "config key tasks.classification.mixup: -0.1 is not allowed (expected >= 0"),
    ("tasks.tagging.cutmix=-1", "config key tasks.tagging.cutmix: -1.0 is not allowed (expected >= 0"),
    ("tasks.tagging.mix_prob=1.5", "config key tasks.tagging.mix_prob: 1.5 is not allowed (expected between 0 and 1)"),
])
def test_mixing_keys_outside_their_tasks_or_ranges_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
