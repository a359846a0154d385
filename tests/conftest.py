from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ai import build_untrained_model
from node.config import load_settings
from node.service import NodeService, Role
from tests.servers import NodeProcess, Orthanc, PostgreSQL, free_port

STORESCU = "/usr/bin/storescu"  # DCMTK's; pynetdicom installs its own storescu earlier on PATH


def pydicom_data_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    return Path(path)


@pytest.fixture(scope="session")
def chest_pa() -> Path:
    return pydicom_data_file("RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def extremity() -> Path:
    return pydicom_data_file("RG3_UNCR.dcm")


@pytest.fixture
def chest_ds(chest_pa: Path) -> pydicom.Dataset:
    return pydicom.dcmread(chest_pa)


@contextmanager
def node_in_process(tmp_path: Path, role: Role = "all", **sections: Any) -> Iterator[NodeService]:
    """A running node in the test's own process; ``sections`` as in the config file, with
    ``node`` and ``storage`` merged into loopback, a free port and a folder under ``tmp_path``,
    and the model in a thread (``serve`` in a subprocess tests the inference process)."""
    settings = load_settings(
        None,
        node={"host": "127.0.0.1", "port": free_port(), **sections.pop("node", {})},
        storage={"path": tmp_path / "data", **sections.pop("storage", {})},
        model={"isolation": "thread", **sections.pop("model", {})},
        **sections,
    )
    service = NodeService(settings, role)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def small_chests(
    chest_ds: pydicom.Dataset, folder: Path, n: int, prefix: str = "chest", **attributes: Any
) -> list[Path]:
    """``n`` copies of the chest CR at an eighth of its size (about 110 kB), each with a fresh
    SOP Instance UID: many images for the tests that need many, at little disk and CPU cost.
    ``attributes`` (keyword = value) are set on every copy."""
    small = deepcopy(chest_ds)
    pixels = small.pixel_array[::8, ::8].copy()
    small.Rows, small.Columns = pixels.shape
    small.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(small, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small.SOPInstanceUID = generate_uid()
        paths.append(folder / f"{prefix}{i:04d}.dcm")
        small.save_as(paths[-1])
    return paths


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small TorchScript SE-ResNet with fixed-seed untrained weights: nothing is downloaded."""
    path = tmp_path_factory.mktemp("model") / "seresnet.pt"
    build_untrained_model(path, seed=1234)
    return path


def require(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if Path(f"/usr/bin/{tool}").exists() else None)
    assert path, f"{tool} is not installed: run the README's test command (bash .ci/run)"
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def storescu(
    port: int, *files: Path, called: str = "XRAYAGE", options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu; ``options`` e.g. ``("-xt",)`` to propose JPEG-LS as well."""
    require(STORESCU)
    return subprocess.run(
        [STORESCU, *options, "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQL]:
    """One throwaway PostgreSQL server for the session; each test makes its own database."""
    require("/usr/bin/pg_ctlcluster")  # Debian's postgresql package
    server = PostgreSQL(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require("Orthanc")
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port())
    pacs.start(allowed={"XRAYAGE": "xrayage", "STORESCU": "storescu"})
    yield pacs
    pacs.stop()


def node_config(
    folder: Path, port: int, weights: Path | None, pacs: Orthanc | None, **sections: str
) -> Path:
    """A config file as an administrator writes it. ``sections`` adds keys by section name,
    replacing the defaults here: e.g. ``report="secondary_capture = false"``."""
    config: dict[str, dict[str, str]] = {
        "node": {"ae_title": '"XRAYAGE"', "host": '"127.0.0.1"', "port": str(port)},
        "storage": {"path": f'"{folder / "data"}"'},
        "model": {"device": '"cpu"'} | ({"weights": f'"{weights}"'} if weights else {}),
    }
    if pacs is not None:
        config["delivery"] = {"retry_initial_seconds": "1", "retry_max_seconds": "2"}
    for name, body in sections.items():
        for line in body.splitlines():
            key, _, value = line.partition("=")
            config.setdefault(name, {})[key.strip()] = value.strip()
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for name, keys in config.items()
    )
    if pacs is not None:
        text += (
            f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\n'
            f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        )
    path = folder / "xrayage.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, weights: Path, orthanc: Orthanc
) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("node")
    port = free_port()
    proc = NodeProcess(node_config(folder, port, weights, orthanc), port, folder / "node.log")
    proc.start()
    yield proc
    proc.stop()
