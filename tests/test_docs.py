"""The documentation site builds with `mkdocs build --strict` (no broken link, no docstring mkdocstrings cannot
read), and its configuration reference, generated from the schema at build time, lists the keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # mkdocs renders every page and the API reference: ~5 s of CPU
def test_the_site_builds_strict_with_every_page_and_the_configuration_reference_lists_the_keys(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (site / "reference" / "configuration" / "index.html").read_text()
    for key in ("train.max_steps", "run.name", "data.root", "tasks.captioning.batch_size", "tasks.tagging.pos_weight",
                "eval.knn.corpus", "loss.weights", "faults.kind"):
        assert f"<code>{key}</code>" in reference, key
    for page in ("", "corpora", "training", "cluster", "reliability", "evaluation", "inference", "performance",
                 "results", "layout", "paper", "api/jobs", "api/config"):
        assert (site / page / "index.html").is_file(), page
    assert "train_with_torchrun" in (site / "api" / "jobs" / "index.html").read_text()  # rendered from the source
