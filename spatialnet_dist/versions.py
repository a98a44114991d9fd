"""Installed dependency versions against the ranges of spatialnet_dist/requirements.txt (their one home;
pyproject.toml reads it for pip). The code relies on private internals of ray and deepspeed, so a version
outside its range is refused at startup with one line naming the package, not left to fail mid-run. A package
that serves one feature alone (FEATURE_PACKAGES) may be missing from a job that does not use the feature: a GPU
image without java or pycocoevalcap trains without caption scoring; the feature's code requires it where it starts.
Java, which caption scoring runs (pycocoevalcap), is checked here too: the driver's preflight asks before
any worker starts, and the scorer when it starts."""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement

from spatialnet_dist.errors import UserError

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
# Package -> the one feature that imports it (lazily, where the feature starts).
FEATURE_PACKAGES = {"pycocoevalcap": "caption scoring", "boto3": "s3:// storage", "pyproj": "spatialnet infer"}


def requirements() -> dict[str, Requirement]:
    """Package name -> its requirement, as requirements.txt lists them."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return {req.name: req for req in map(Requirement, filter(None, lines))}


def installed_version(package: str) -> str | None:
    """The version importlib.metadata finds, or None where `package` is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(package: str, installed: str | None = None) -> None:
    """Refuse an installed `package` outside its range (`installed`: the version to judge, default the
    one importlib.metadata finds)."""
    spec = requirements()[package].specifier
    installed = installed or installed_version(package)
    if installed is None:
        raise UserError(f"{package} is not installed; spatialnet-dist needs {package}{spec}")
    if not spec.contains(installed, prereleases=True):
        raise UserError(f"{package} {installed} is installed, but spatialnet-dist supports {package}{spec} only "
                        f"(spatialnet_dist/requirements.txt): install a version in that range")


def require_all(unused: Iterable[str] = ()) -> None:
    """Every requirement installed and in its range; a package of `unused` (FEATURE_PACKAGES whose feature the
    job does not use) only in its range, where it is installed."""
    for package in requirements():
        if package not in unused or installed_version(package) is not None:
            require(package)


def require_java() -> None:
    """Refuse at once, with the install command, where java is missing (callers may check before long work)."""
    if shutil.which("java") is None:
        raise UserError(
            "java not found on PATH: pycocoevalcap's PTB tokenizer and METEOR run on Java; "
            "install a runtime, e.g. `apt-get install -y openjdk-17-jre-headless`"
        )
