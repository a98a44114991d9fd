"""configs/ucm.yaml, the recipe for a real corpus, and bench/real_corpus.py, which measures it. The corpus itself
never reaches a test (CI has no network): the bench says in one line when it is absent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_the_bench_says_in_one_line_when_the_corpus_is_absent(tmp_path):
    missing = tmp_path / "UCM_captions"
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "real_corpus.py"), str(missing), "--json"],
                           capture_output=True, text=True)
    assert bench.returncode == 2 and bench.stdout == ""
    assert bench.stderr.strip().splitlines() == [f"real_corpus: {missing / 'dataset.json'}: not found "
                                                 "(rebuild the corpus as ../shared/data/README.md says)"]
