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


def test_a_package_of_a_feature_the_job_does_not_use_may_be_missing(monkeypatch):
    """A GPU image without pycocoevalcap, boto3 or pyproj runs a job that scores no captions on local storage;
    a job that needs one is refused at startup naming it, and the feature's own code refuses it where it starts."""
    from spatialnet_dist import config as config_mod
    from spatialnet_dist.metrics.captions import score_captions
    from spatialnet_dist.store import s3
    from spatialnet_dist.train.preflight import unused_packages

    real = importlib.metadata.version

    def version(name):
        if name in versions.FEATURE_PACKAGES:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    no_captions = config_mod.load(None, ["tasks.captioning.enabled=false"])
    assert sorted(unused_packages(no_captions)) == ["boto3", "pycocoevalcap", "pyproj"]
    versions.require_all(unused=unused_packages(no_captions))
    for needing, missing in (([], "pycocoevalcap"),  # the default job: captioning, evaluated at the end
                             (["tasks.captioning.enabled=false", "run.storage=s3://bucket/runs"], "boto3")):
        with pytest.raises(UserError, match=rf"^{missing} is not installed; spatialnet-dist needs {missing}>="):
            versions.require_all(unused=unused_packages(config_mod.load(None, needing)))
    with pytest.raises(UserError, match="^pycocoevalcap is not installed"):
        score_captions([{"image_id": "a", "caption": "a field"}], {"a": ["a field"]})
    s3._client.cache_clear()
    with pytest.raises(UserError, match="^boto3 is not installed"):
        s3.s3_client()
