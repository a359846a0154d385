"""The application log never holds a patient's name or birth date, whatever comes in: the
audit log (a database table with its own access) is the one place for identifiers."""

from __future__ import annotations

import time
from copy import deepcopy
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.conftest import node_config, small_chests, storescu
from tests.servers import NodeProcess, free_port, wait_until

NAME, BIRTH = "Privacy^Paula^Quentin", "19511123"


def test_names_and_birth_dates_stay_out_of_the_log(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    port = free_port()
    node = NodeProcess(node_config(tmp_path, port, weights, None), port, tmp_path / "node.log")
    [small] = small_chests(chest_ds, tmp_path / "in", 1)
    base = pydicom.dcmread(small)
    files = []
    for i, edit in enumerate([
        {},  # analysed and reported
        {"PatientAge": "062"},  # invalid AS value: pydicom warns about values
        {"PatientName": NAME + "\\Extra", "PatientBirthDate": BIRTH + "9"},  # invalid VRs
        {"ViewPosition": "LL"},  # skipped
        {"PixelData": base.PixelData[:100]},  # fails at decoding
    ]):  # fmt: skip
        ds = deepcopy(base)
        ds.PatientName, ds.PatientBirthDate = NAME, BIRTH
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in edit.items():
            setattr(ds, keyword, value)
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1])
    conflicting = deepcopy(pydicom.dcmread(files[0]))
    conflicting.PatientID = "OTHER"  # different content under a stored UID: refused
    conflicting.save_as(tmp_path / "conflict.dcm")
    node.start()
    try:
        storescu(port, *files)
        storescu(port, tmp_path / "conflict.dcm")
        wait_until(lambda: "job" in node.log.read_text(), 60, "the failed job in the log")
        time.sleep(2)  # the reports of the others
    finally:
        node.stop()
    log = node.log.read_text()
    assert "pixel data cannot be decoded" in log  # the log did record these events
    assert "report cannot be built" not in log  # two names: the SR carries the first
    for fragment in ("Privacy", "Paula", "Quentin", BIRTH, "1951-11-23"):
        assert fragment not in log, f"{fragment!r} in the application log"
