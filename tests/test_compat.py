"""The fence around private library names (node/compat.py): an upgrade outside the checked
versions, or one that removes a name the node uses, fails here first."""

from __future__ import annotations

import copy
import tomllib
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

from packaging.requirements import Requirement
from packaging.version import Version
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from node.compat import CHECKED, PRIVATE_NAMES, copy_contexts_cheaply


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


def test_context_copies_are_whole_and_independent() -> None:
    ae = AE()
    for context in AllStoragePresentationContexts[:5]:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = SimpleNamespace(contexts=ae.supported_contexts)
    copy_contexts_cheaply(server)  # type: ignore[arg-type]
    copied = copy.deepcopy(server.contexts)
    for original, new in zip(server.contexts, copied, strict=True):
        assert new is not original and new.transfer_syntax == original.transfer_syntax
        assert new.abstract_syntax == original.abstract_syntax
        new.transfer_syntax.clear()  # what negotiation may do to its copy
        assert original.transfer_syntax  # leaves the server's own alone
