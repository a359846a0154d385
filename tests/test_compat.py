"""The fence around private library names (node/compat.py): an upgrade outside the checked
versions, or one that removes a name the node uses, fails here first."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from node.compat import CHECKED, PRIVATE_NAMES


def test_installed_versions_are_the_checked_ones() -> None:
    for name, (low, high) in CHECKED.items():
        assert Version(low) <= Version(version(name)) < Version(high), name


def test_pyproject_allows_only_the_checked_versions() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pinned = {(r := Requirement(d)).name: r.specifier for d in project["project"]["dependencies"]}
    for name, (low, high) in CHECKED.items():
        assert str(pinned[name]) == f"<{high},>={low}", name


def test_every_private_name_is_there() -> None:
    for where, get in PRIVATE_NAMES.items():
        assert get() is not None, where
