"""Dependency ranges (spatialnet_dist/requirements.txt, their one home): pip reads them through
pyproject.toml, and a ray or deepspeed outside them is refused at startup, naming the package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from spatialnet_dist import versions
from spatialnet_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_takes_its_dependencies_from_the_one_list():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "dependencies" not in project["project"] and "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["spatialnet_dist/requirements.txt"]
    assert versions.REQUIREMENTS == REPO / "spatialnet_dist" / "requirements.txt"


@pytest.mark.parametrize("package", ["ray", "deepspeed"])
def test_private_internals_are_pinned_to_a_range_with_an_upper_bound(package):
    spec = versions.requirements()[package].specifier
    assert any(s.operator == "<" for s in spec) and any(s.operator == ">=" for s in spec)


def test_the_installed_versions_are_supported():
    versions.require_all()


@pytest.mark.parametrize("package,outside", [("ray", "2.59.0"), ("ray", "2.61.0"), ("deepspeed", "0.18.9"),
                                             ("deepspeed", "0.20.0")])
def test_a_version_outside_the_range_is_refused_naming_the_package(package, outside):
    with pytest.raises(UserError, match=rf"^{package} {outside} is installed, but spatialnet-dist supports {package}"):
        versions.require(package, outside)


def test_the_startup_check_reads_the_installed_version(monkeypatch, capsys):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.61.0" if name == "ray" else real(name))
    from spatialnet_dist import jobs

    assert jobs.train_with_ray(["--set", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spatialnet: error: ray 2.61.0 is installed")
