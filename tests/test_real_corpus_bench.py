"""configs/ucm.yaml, the recipe for a real corpus, and bench/real_corpus.py, which measures it. The corpus itself
never reaches a test (CI has no network): the bench says in one line when it is absent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from spatialnet_dist import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
# UC Merced's land-use classes and UCM-captions' split sizes: what a recipe tuned to that corpus alone would name.
UCM_CLASSES = ("agricultural airplane baseballdiamond beach buildings chaparral denseresidential forest freeway "
               "golfcourse harbor intersection mediumresidential mobilehomepark overpass parkinglot river runway "
               "sparseresidential storagetanks tenniscourt").split()
UCM_SIZES = ("2100", "1680", "210", "21")


def test_the_real_corpus_recipe_loads_and_names_none_of_the_corpus_classes_or_sizes():
    cfg = config_mod.load(ROOT / "configs" / "ucm.yaml")
    assert cfg.tasks.enabled() == ["captioning", "classification", "tagging"]
    assert {t: getattr(cfg.tasks, t).corpora for t in cfg.tasks.enabled()} == dict.fromkeys(cfg.tasks.enabled(),
                                                                                             ["ucm-captions"])
    assert cfg.train.num_workers == 2 and not cfg.train.use_gpu
    settings = "\n".join(line.split("#")[0] for line in (ROOT / "configs" / "ucm.yaml").read_text().splitlines())
    assert not [c for c in UCM_CLASSES if c in settings.lower()]
    assert not set(re.findall(r"\d+", settings)) & set(UCM_SIZES)
    retargeted = config_mod.load(ROOT / "configs" / "ucm.yaml", ["data.root=s3://bucket/shards"])
    assert retargeted.data.root == "s3://bucket/shards"


def test_the_pretraining_recipe_pretrains_the_encoder_the_real_corpus_recipe_fine_tunes():
    """configs/pretrain.yaml: mae alone, on the images of the corpus configs/ucm.yaml trains on, with its stem,
    patch and image size (so that every encoder weight loads), naming none of the corpus's classes or sizes."""
    pretrain, ucm = config_mod.load(ROOT / "configs" / "pretrain.yaml"), config_mod.load(ROOT / "configs" / "ucm.yaml")
    assert pretrain.tasks.enabled() == ["mae"] and pretrain.tasks.mae.corpora == ucm.tasks.classification.corpora
    assert [(c.model.preset, c.model.stem, c.model.patch_size, c.model.image_size, c.model.in_chans)
            for c in (pretrain, ucm)] == [(ucm.model.preset, ucm.model.stem, ucm.model.patch_size,
                                          ucm.model.image_size, ucm.model.in_chans)] * 2
    settings = "\n".join(line.split("#")[0] for line in (ROOT / "configs" / "pretrain.yaml").read_text().splitlines())
    assert not [c for c in UCM_CLASSES if c in settings.lower()]
    assert not set(re.findall(r"\d+", settings)) & set(UCM_SIZES)


@pytest.mark.parametrize("bench", ["real_corpus", "pretraining"])
def test_the_bench_says_in_one_line_when_the_corpus_is_absent(tmp_path, bench):
    missing = tmp_path / "UCM_captions"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / f"{bench}.py"), str(missing), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"{bench}: {missing / 'dataset.json'}: not found "
                                               "(rebuild the corpus as ../shared/data/README.md says)"]
