"""Configuration: YAML + overrides, validation messages that name the key, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from spatialnet_dist import config as config_mod
from spatialnet_dist.config import ConfigError
from spatialnet_dist.text import Vocab, map_answer, rsvqa_lr_count_bin

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "paper", "scale"])
def test_shipped_configs_load(name):
    cfg = config_mod.load(REPO / "configs" / f"{name}.yaml")
    assert cfg.tasks.enabled()


def test_paper_config_is_the_seed_paper():
    cfg = config_mod.load(REPO / "configs" / "paper.yaml")
    assert cfg.model.preset == "paper" and cfg.model.image_size == 256
    assert all(w == 1.0 for w in cfg.loss.weights.values())
    assert cfg.loss.regularization == "l2" and cfg.loss.l2 > 0
    assert {getattr(cfg.tasks, t).batch_size for t in cfg.tasks.enabled()} == {32}


def test_overrides_are_yaml_values():
    cfg = config_mod.load(None, ["train.max_steps=7", "train.use_gpu=true", "optim.betas=[0.8, 0.9]",
                                 "optim.lr=1e-3", "tasks.vqa.corpora=rsvqa-lr", "tasks.captioning.enabled=false"])
    assert cfg.train.max_steps == 7 and cfg.train.use_gpu is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.optim.lr == 1e-3
    assert cfg.tasks.vqa.corpora == ["rsvqa-lr"] and "captioning" not in cfg.tasks.enabled()


def test_a_mapping_override_changes_one_entry():
    cfg = config_mod.load(None, ["loss.weights.vqa=2"])
    assert cfg.loss.weights == {"captioning": 1.0, "vqa": 2.0, "classification": 1.0, "regression": 1.0}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.zero_stage=7", "train.zero_stage"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.max_steps=ten", "train.max_steps"),
        ("train.use_gpu=maybe", "train.use_gpu"),
        ("model.preset=huge", "model.preset"),
        ("model.image_size=100", "model.image_size"),
        ("tasks.vqa.batch_size=0", "tasks.vqa.batch_size"),
        ("tasks.vqa.questions_per_image=-1", "tasks.vqa.questions_per_image"),
        ("tasks.captioning.questions_per_image=4", "tasks.captioning.questions_per_image"),
        ("loss.weights.vqa=-1", "loss.weights.vqa"),
        ("loss.weights.segmentation=1", "loss.weights.segmentation"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        config_mod.load(None, [override])
    msg = str(e.value)
    assert named in msg and "\n" not in msg


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key train\.zero_stag .*did you mean train\.zero_stage"):
        config_mod.load(None, ["train.zero_stag=2"])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key train\.max_stepz"):
        config_mod.load(bad)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: not valid YAML"):
        config_mod.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "missing.yaml")


def test_l2_with_zero3_is_refused():
    with pytest.raises(ConfigError, match="loss.regularization"):
        config_mod.load(None, ["loss.regularization=l2", "train.zero_stage=3"])


def test_round_trip_through_dict():
    cfg = config_mod.load(REPO / "configs" / "paper.yaml", ["run.name=x"])
    assert config_mod.from_dict(cfg.to_dict()) == cfg


# ---- text: the vocabulary and the RSVQA-LR count rule ----


@pytest.mark.parametrize(
    ("answer", "bin_"),
    [("0", "0"), (1, "between 0 and 10"), ("10", "between 0 and 10"), ("11", "between 10 and 100"),
     ("100", "between 10 and 100"), ("101", "between 100 and 1000"), ("1000", "between 100 and 1000"),
     ("1001", "more than 1000"), ("12.0", "between 10 and 100")],
)
def test_rsvqa_lr_count_bins(answer, bin_):
    assert rsvqa_lr_count_bin(answer) == bin_
    assert map_answer(answer, "count", "rsvqa-lr") == bin_


def test_exact_rule_and_other_types_keep_answers():
    assert map_answer("12", "count", "exact") == "12"
    assert map_answer(" Yes ", "presence", "rsvqa-lr") == "yes"


def test_vocab_encodes_unknown_words_as_unk_and_pads():
    vocab = Vocab.build({"a": 3, "road": 2, "rare": 1}, min_count=2)
    ids = vocab.encode("A road near a lake", max_len=8)
    assert len(ids) == 8 and ids[0] == 1 and 2 in ids and ids[-1] == 0
    assert vocab.decode(ids) == "a road <unk> a <unk>"
