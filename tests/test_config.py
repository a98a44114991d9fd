"""Configuration: YAML + overrides, validation messages that name the key, the shipped configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spatialnet_dist import config as config_mod
from spatialnet_dist.config import ConfigError
from spatialnet_dist.tasks import DEFAULT_TASKS
from spatialnet_dist.text import Vocab, map_answer, rsvqa_lr_count_bin
from spatialnet_dist.train.plan import resolve

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
    assert {getattr(cfg.tasks, t).global_batch_size for t in cfg.tasks.enabled()} == {32}
    assert cfg.train.epochs == 50 and cfg.train.max_steps == 0  # resolved from the manifests at start


@pytest.mark.parametrize(("workers", "accum", "per_worker"), [(1, 1, 32), (4, 1, 8), (8, 2, 2), (32, 1, 1)])
def test_paper_global_batch_is_32_on_any_number_of_workers(workers, accum, per_worker):
    cfg = config_mod.load(REPO / "configs" / "paper.yaml",
                          ["train.max_steps=10", f"train.num_workers={workers}", f"optim.grad_accum={accum}"])
    resolved, line = resolve(cfg, workers)
    for task in resolved.tasks.enabled():
        assert getattr(resolved.tasks, task).batch_size == per_worker
        assert per_worker * workers * accum == 32
    assert f"{workers} workers x {accum} accum" in line
    assert resolved.train.max_steps == 10 and cfg.tasks.vqa.batch_size == 8  # the input config is left as it was


@pytest.mark.parametrize(("workers", "accum"), [(64, 1), (3, 1), (16, 4)])
def test_an_impossible_global_batch_is_one_line_naming_the_key(workers, accum):
    cfg = config_mod.load(REPO / "configs" / "paper.yaml", ["train.max_steps=10", f"optim.grad_accum={accum}"])
    with pytest.raises(ConfigError, match=r"tasks\.captioning\.global_batch_size: 32 is not a multiple") as e:
        resolve(cfg, workers)
    assert "\n" not in str(e.value)


def test_overrides_are_yaml_values():
    cfg = config_mod.load(None, ["train.max_steps=7", "train.use_gpu=true", "optim.betas=[0.8, 0.9]",
                                 "optim.lr=1e-3", "tasks.vqa.corpora=rsvqa-lr", "tasks.captioning.enabled=false"])
    assert cfg.train.max_steps == 7 and cfg.train.use_gpu is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.optim.lr == 1e-3
    assert cfg.tasks.vqa.corpora == ["rsvqa-lr"] and "captioning" not in cfg.tasks.enabled()


def test_a_mapping_override_changes_one_entry():
    cfg = config_mod.load(None, ["loss.weights.vqa=2"])
    assert cfg.loss.weights == {"captioning": 1.0, "vqa": 2.0, "classification": 1.0, "regression": 1.0, "tagging": 1.0,
                                "mae": 1.0}


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
        ("tasks.vqa.global_batch_size=-32", "tasks.vqa.global_batch_size"),
        ("train.epochs=-1", "train.epochs"),
        ("optim.layer_decay=0", "optim.layer_decay"),
        ("optim.layer_decay=1.5", "optim.layer_decay"),
        ("optim.ema_decay=1", "optim.ema_decay"),
        ("optim.ema_decay=-0.1", "optim.ema_decay"),
        ("model.freeze_encoder_blocks=-1", "model.freeze_encoder_blocks"),
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


def test_ema_with_zero3_is_refused():
    """ZeRO-3's ranks hold parameter shards: the EMA has no whole weights to average."""
    with pytest.raises(ConfigError, match=r"^config key optim\.ema_decay: .*train\.zero_stage=3") as e:
        config_mod.load(None, ["optim.ema_decay=0.999", "train.zero_stage=3"])
    assert "\n" not in str(e.value)
    assert config_mod.load(None, ["optim.ema_decay=0.999", "train.zero_stage=2"]).optim.ema_decay == 0.999


def test_loss_balance_is_fixed_unless_asked_and_a_bad_value_names_the_key():
    assert config_mod.load(None, []).loss.balance == "fixed"
    assert config_mod.load(None, ["loss.balance=uncertainty"]).loss.balance == "uncertainty"
    with pytest.raises(ConfigError, match=r"^config key loss\.balance: 'kendall' is not allowed \(expected fixed or "
                                          r"uncertainty\)$"):
        config_mod.load(None, ["loss.balance=kendall"])


EVERY_2 = ["eval.every=4", "train.checkpoint_every=2"]


def test_keep_best_takes_a_validation_metric_of_an_enabled_task():
    assert config_mod.load(None, [*EVERY_2, "eval.keep_best=classification_accuracy"]).eval.keep_best
    assert config_mod.load(None, [*EVERY_2, "eval.keep_best=captioning_loss"]).eval.keep_best  # a loss, no score
    assert config_mod.load(None, [*EVERY_2, "tasks.tagging.enabled=true", "eval.keep_best=tagging_mAP_macro"])
    for items, message in [
        (["eval.keep_best=classification_acc"], r"'classification_acc' is not a validation metric of the enabled "
                                                r"tasks \(expected one of captioning_loss, vqa_loss, vqa_OA, vqa_AA, .*"
                                                r"\(did you mean classification_accuracy\?\)"),
        (["eval.keep_best=tagging_mAP_macro"], "'tagging_mAP_macro' is not a validation metric"),  # tagging is off
        (["eval.keep_best=vqa_CIDEr"], "'vqa_CIDEr' is not a validation metric"),  # not scored at validation
        (["eval.every=0", "eval.keep_best=vqa_OA"], r"eval.every=0, train.checkpoint_every=2"),
        (["eval.every=3", "eval.keep_best=vqa_OA"], r"eval.every=3, train.checkpoint_every=2"),
    ]:
        with pytest.raises(ConfigError) as e:
            config_mod.load(None, ["train.checkpoint_every=2", *items])
        assert str(e.value).startswith("config key eval.keep_best: ") and "\n" not in str(e.value), items
        assert e.match(message), items


def test_which_validation_metrics_are_better_higher():
    from spatialnet_dist.tasks import higher_is_better, validation_metrics

    logged = validation_metrics(["vqa", "classification", "regression", "tagging"])
    assert {m: higher_is_better(m) for m in logged} == {
        "vqa_loss": False, "vqa_OA": True, "vqa_AA": True, "classification_loss": False,
        "classification_accuracy": True, "regression_loss": False, "regression_MAE": False, "tagging_loss": False,
        "tagging_mAP_macro": True}
    assert not higher_is_better("regression_RMSE")  # an error, should a validation ever score it


def test_eval_tta_is_none_or_symmetry():
    assert config_mod.load(None, ["eval.tta=symmetry"]).eval.tta == "symmetry"
    with pytest.raises(ConfigError, match=r"config key eval.tta: 'flips' is not allowed \(expected none or symmetry\)"):
        config_mod.load(None, ["eval.tta=flips"])


def test_max_steps_or_epochs_one_per_level(tmp_path):
    """A level (file, then --set) that gives one length key replaces the other; one level giving both is an error."""
    file = tmp_path / "run.yaml"
    file.write_text("train:\n  max_steps: 300\n")
    cfg = config_mod.load(file, ["train.epochs=2.5"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (2.5, 0)
    cfg = config_mod.load(REPO / "configs" / "paper.yaml", ["train.max_steps=7"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (0, 7)
    with pytest.raises(ConfigError, match=r"--set: config keys train\.max_steps and train\.epochs are both set"):
        config_mod.load(None, ["train.max_steps=5", "train.epochs=1"])
    file.write_text("train:\n  max_steps: 300\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: config keys train\.max_steps and train\.epochs"):
        config_mod.load(file)
    with pytest.raises(ConfigError, match="train.max_steps and train.epochs: both 0"):
        config_mod.load(None, ["train.max_steps=0"])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> str:
    from spatialnet_dist.corpora.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("store") / "shards"
    write_synthetic(str(root), images=40, seed=0, shard_size=10)
    return str(root)


def test_epochs_become_max_steps_from_the_manifest(synth_root):
    from spatialnet_dist.store.manifest import read_manifest

    train = read_manifest(synth_root, "synthetic")["splits"]["train"]
    rows = {"captioning": train["captions"], "vqa": train["questions"], "classification": train["samples"],
            "regression": train["questions_by_type"]["count"]}
    assert rows["vqa"] > rows["captioning"] > 0 and rows["regression"] > 0
    cfg = config_mod.load(None, [f"data.root={synth_root}", "train.epochs=3", "tasks.vqa.batch_size=5",
                                 "tasks.vqa.questions_per_image=1", "tasks.regression.questions_per_image=1", "optim.grad_accum=2",
                                 "train.num_workers=2"])
    resolved, line = resolve(cfg, 2)
    steps = math.ceil(3 * rows["vqa"] / (5 * 2 * 2))  # vqa has the most rows: every question 3 times
    assert resolved.train.max_steps == steps
    assert line == (f"train.epochs=3 -> train.max_steps={steps}; rows per epoch: "
                    + ", ".join(f"{t} {rows[t]}" for t in DEFAULT_TASKS)
                    + f"; global rows per step: captioning {32 * train['captions'] / train['samples']:g}, vqa 20, "
                    "classification 32, regression 32")  # a captioning visit trains all its image's captions
    # The resolved config (saved with the run, sent to the workers) keeps the steps; resolving it again is a no-op.
    saved = config_mod.from_dict(resolved.to_dict())
    assert saved.train.max_steps == steps and resolve(saved, 2)[0] == saved
    # Fan-out (the default: all of an image's questions per visit): a visit answers the mean questions per image.
    fanout, _ = resolve(config_mod.load(None, [f"data.root={synth_root}", "train.epochs=3", "tasks.vqa.batch_size=5",
                                               "optim.grad_accum=2", "train.num_workers=2"]), 2)
    assert fanout.train.max_steps == math.ceil(3 * rows["vqa"] / (5 * 2 * 2 * (rows["vqa"] / train["samples"])))
    assert fanout.train.max_steps < steps
    # One task per step in alternate mode: each task gets a step in 4 on average.
    alternate, _ = resolve(config_mod.load(None, [f"data.root={synth_root}", "train.epochs=1",
                                                  "train.mode=alternate", "tasks.vqa.batch_size=8",
                                                  "tasks.vqa.questions_per_image=1"]), 1)
    assert alternate.train.max_steps == math.ceil(rows["vqa"] / 2)
    only_captions = config_mod.load(None, [f"data.root={synth_root}", "train.epochs=1"]
                                    + [f"tasks.{t}.enabled=false" for t in ("vqa", "classification", "regression")])
    assert resolve(only_captions, 1)[0].train.max_steps == math.ceil(train["samples"] / 8)  # every caption once


def test_freezing_more_blocks_than_the_preset_has_is_a_config_error():
    with pytest.raises(ConfigError, match="model.freeze_encoder_blocks: 5 exceeds the 4 blocks of preset tiny"):
        resolve(config_mod.load(None, ["model.freeze_encoder_blocks=5"]), 1)
    assert resolve(config_mod.load(None, ["model.preset=base", "model.freeze_encoder_blocks=12"]), 1)[1] == ""


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
