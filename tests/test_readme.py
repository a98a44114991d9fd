"""README.md's quick start, run as a user would after `make setup`: every command of its one bash block, in a
fresh folder (the checkout is not written), with the venv and DeepSpeed's compiled op of this checkout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import harness
import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_start_block() -> str:
    """The first ```bash block under README.md's "## Quick start" heading."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```bash\n(.*?)^```$", section, re.S | re.M)
    assert found, "README.md: no ```bash block under ## Quick start"
    return found.group(1)


@pytest.mark.slow
def test_the_quick_start_runs_and_writes_a_checkpoint_an_evaluation_and_predictions(tmp_path):
    venv = Path(sys.executable).parent.parent  # .venv, whose bin holds this python and `spatialnet`
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    if (REPO / ".torch_extensions").is_dir():  # make setup compiled DeepSpeed's op there; else the block builds it
        (tmp_path / ".torch_extensions").symlink_to(REPO / ".torch_extensions", target_is_directory=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "MASTER_PORT": str(harness.free_ports(1)[0])}  # the one-process path's process group
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + quick_start_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    out = tmp_path / "quickstart"
    checkpoint = out / "runs" / "tiny" / "checkpoint-000004"
    assert (checkpoint / "manifest.json").is_file()
    assert set(json.loads((out / "metrics.json").read_text())) >= {"captioning", "vqa", "classification"}
    assert (out / "eval" / "report.md").is_file()
    assert "land use:" in done.stdout and "A:" in done.stdout  # predict's answer for the image
    assert (out / "predictions" / "manifest.json").is_file()
    assert "label_name" in done.stdout  # the predictions table, printed by pandas
