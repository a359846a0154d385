"""Bad input over the wire, each case built from the real chest CR with pydicom and sent with
DCMTK's storescu (or, for what storescu will not send, pynetdicom writing the file's bytes as
they are). Each ends in a clear state with its reason, and none stops the node."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from sqlalchemy import select

from node.config import load_settings
from node.service import NodeService
from storage import AuditEvent, Instance, InstanceState, Result
from tests.conftest import dciodvfy_errors, small_chests, storescu
from tests.servers import free_port, wait_until

DONE = {InstanceState.SKIPPED, InstanceState.REPORTED, InstanceState.FAILED}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[NodeService]:
    settings = load_settings(
        None,
        node={"host": "127.0.0.1", "port": free_port()},
        storage={"path": tmp_path_factory.mktemp("node")},
        model={"weights": str(weights), "device": "cpu"},
    )
    service = NodeService(settings)
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> pydicom.Dataset:
    chest = pydicom.dcmread(pydicom.data.get_testdata_file("RG1_UNCR.dcm"))  # type: ignore[attr-defined]
    [path] = small_chests(chest, tmp_path_factory.mktemp("small"), 1)
    return pydicom.dcmread(path)


def variant(small: pydicom.Dataset, folder: Path, edit: Callable[[pydicom.Dataset], None]) -> Path:
    ds = deepcopy(small)
    ds.SOPInstanceUID = generate_uid()
    edit(ds)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{uuid.uuid4().hex}.dcm"  # not named by the UID: some UIDs here are bad
    ds.save_as(path, enforce_file_format=True)
    return path


def outcome(node: NodeService, path: Path) -> Instance:
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    def done() -> Instance | None:
        with node.db.session() as s:
            inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == uid))
            return inst if inst is not None and inst.state in DONE else None

    found = wait_until(done, 60, f"a final state for {path.name}")
    assert isinstance(found, Instance)
    return found


def send_as_is(port: int, path: Path) -> int:
    """C-STORE the file's bytes unchanged (pynetdicom's chunked mode takes the SOP UIDs of the
    request from the file meta, and never re-encodes): for what a tidy SCU would not send."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae = AE("RAWSCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="XRAYAGE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    return int(status.Status)


def _set(**values: object) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return edit


def _drop(*keywords: str, **values: object) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
        _set(**values)(ds)

    return edit


def _truncate_pixels(ds: pydicom.Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _rgb(ds: pydicom.Dataset) -> None:
    grey = (ds.pixel_array >> 7).astype(np.uint8)
    ds.PixelData = np.stack([grey] * 3, axis=-1).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7


def _raw(keyword: str, vr: str, value: bytes) -> Callable[[pydicom.Dataset], None]:
    """A value that is not of its VR, as a careless modality writes it (pydicom would refuse
    to set it, so its bytes go in raw)."""

    def edit(ds: pydicom.Dataset) -> None:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        assert tag is not None
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)

    return edit


def _zero_exact_window(ds: pydicom.Dataset) -> None:
    _raw("WindowWidth", "DS", b"0 ")(ds)
    ds.VOILUTFunction = "LINEAR_EXACT"


def _two_frames(ds: pydicom.Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


CASES = {
    "truncated pixel data": (
        _truncate_pixels,
        InstanceState.FAILED,
        "pixel data cannot be decoded: The number of bytes of pixel data is less than expected",
    ),
    "no pixel data": (_drop("PixelData"), InstanceState.SKIPPED, "no Pixel Data"),
    "DX for processing": (
        _set(SOPClassUID=DigitalXRayImageStorageForProcessing),
        InstanceState.SKIPPED,
        "DX For Processing (raw detector image, not for presentation)",
    ),
    "lateral": (_set(ViewPosition="LL"), InstanceState.SKIPPED, "view LL is not frontal (PA/AP)"),
    "no view or body part, described as a chest PA": (
        _drop("ViewPosition", "BodyPartExamined", SeriesDescription="Chest PA erect"),
        InstanceState.REPORTED,
        None,
    ),
    "no view or body part, described as a knee": (
        _drop("ViewPosition", "BodyPartExamined", "StudyDescription", SeriesDescription="Knee"),
        InstanceState.SKIPPED,
        "no BodyPartExamined, and no description names the chest",
    ),
    "child": (
        _set(PatientAge="007Y"),
        InstanceState.SKIPPED,
        "patient age 7 outside the model's validated range 18-100",
    ),
    "RGB": (_rgb, InstanceState.SKIPPED, "colour image (RGB)"),
    "multi-frame": (_two_frames, InstanceState.SKIPPED, "multi-frame image"),
    "a study UID that is a path": (
        _raw("StudyInstanceUID", "UI", b"../../../etc/passwd\x00"),
        InstanceState.FAILED,
        "report cannot be built: source StudyInstanceUID '../../../etc/passwd' is not a valid UID",
    ),
    "RescaleSlope NaN": (
        _raw("RescaleSlope", "DS", b"NaN "),
        InstanceState.FAILED,
        "RescaleSlope NaN is not a finite number",
    ),
    "WindowWidth 0 with LINEAR_EXACT": (
        _zero_exact_window,
        InstanceState.FAILED,
        "WindowWidth 0 is not above 0 (LINEAR_EXACT)",
    ),
    "60000 x 60000 claimed over a small payload": (
        _set(Rows=60000, Columns=60000),
        InstanceState.SKIPPED,
        "60000 x 60000 pixels (x 1 samples and frames) exceed the pixel budget",
    ),
    "NumberOfFrames abc": (
        _raw("NumberOfFrames", "IS", b"abc "),
        InstanceState.SKIPPED,
        "NumberOfFrames cannot be read ('abc')",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_a_state_with_its_reason(
    case: str, node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    edit, state, reason = CASES[case]
    path = variant(small, tmp_path, edit)
    out = storescu(node.settings.node.port, path)
    assert out.returncode == 0, out.stderr  # accepted, so the PACS does not resend forever
    inst = outcome(node, path)
    assert (inst.state, inst.reason and inst.reason[: len(reason or "")]) == (state, reason)


def test_a_patient_age_without_unit_is_not_guessed(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    """ "062" could be years or months: the age comes from the dates when they are there."""
    dated = variant(small, tmp_path, _set(PatientAge="062"))
    undated = variant(small, tmp_path, _drop("PatientBirthDate", PatientAge="062"))
    assert storescu(node.settings.node.port, dated, undated).returncode == 0
    ages = []
    for path in (dated, undated):
        inst = outcome(node, path)
        assert inst.state == InstanceState.REPORTED
        with node.db.session() as s:
            ages.append(s.scalars(select(Result).where(Result.instance_id == inst.id)).one())
    assert ages[0].chronological_age == 64.48  # 1940-03-05 to 2004-08-26
    assert ages[1].chronological_age is None
    assert dciodvfy_errors(Path(str(ages[1].sr_path))) == []  # birth date absent: still valid


def test_a_japanese_name_is_kept_byte_for_byte_in_the_sr(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    def japanese(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"

    path = variant(small, tmp_path, japanese)
    sent = pydicom.dcmread(path, stop_before_pixels=True)
    raw_name = sent.get_item("PatientName").value
    assert b"\x1b$B" in raw_name  # ISO 2022 escape to JIS X 0208: the test means what it says
    assert storescu(node.settings.node.port, path).returncode == 0
    inst = outcome(node, path)
    assert inst.state == InstanceState.REPORTED
    with node.db.session() as s:
        result = s.scalars(select(Result).where(Result.instance_id == inst.id)).one()
    for made in (result.sr_path, result.sc_path):  # the SR and the Secondary Capture
        ds = pydicom.dcmread(str(made))
        assert ds.get_item("PatientName").value == raw_name
        assert ds.SpecificCharacterSet == sent.SpecificCharacterSet
        assert str(ds.PatientName) == str(sent.PatientName)
    assert dciodvfy_errors(Path(str(result.sr_path))) == []


def _failures(node: NodeService) -> list[str]:
    with node.db.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure"))
        return [r.detail or "" for r in rows]


def test_dataset_uids_that_differ_from_the_request_get_a900(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    path = variant(small, tmp_path, lambda ds: None)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    data = path.read_bytes()
    at = data.index(uid.encode()) + len(uid) - 1  # the file meta's copy, which comes first
    other = b"9" if data[at : at + 1] != b"9" else b"8"
    path.write_bytes(data[:at] + other + data[at + 1 :])  # the request will name this UID
    assert send_as_is(node.settings.node.port, path) == 0xA900
    assert any("differ from the C-STORE request" in d for d in _failures(node))
    with node.db.session() as s:
        assert s.scalars(select(Instance.sop_instance_uid)).all().count(uid) == 0


def test_a_uid_with_path_characters_writes_nothing_and_gets_c000(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    path = variant(small, tmp_path, _set(SOPInstanceUID="1.2/../../../../escaped"))
    before = set(node.settings.storage.path.parent.rglob("*"))  # the store and its neighbours
    assert send_as_is(node.settings.node.port, path) == 0xC000
    assert "not a valid DICOM UID: '1.2/../../../../escaped'" in _failures(node)
    assert set(node.settings.storage.path.parent.rglob("*")) - before == set()


def test_an_unknown_transfer_syntax_is_refused_at_negotiation(node: NodeService) -> None:
    ae = AE("RAWSCU")
    ae.add_requested_context(DigitalXRayImageStorageForProcessing, "1.2.840.10008.1.2.4.999")
    ae.add_requested_context(DigitalXRayImageStorageForProcessing, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="XRAYAGE")
    try:
        result = {c.transfer_syntax[0]: c.result for c in assoc.accepted_contexts}
        rejected = [c.transfer_syntax[0] for c in assoc.rejected_contexts]
    finally:
        assoc.release()
    assert result == {ExplicitVRLittleEndian: 0x00}
    assert rejected == ["1.2.840.10008.1.2.4.999"]


def _nested(depth: int, payload: bytes) -> bytes:
    """Content Sequence (0040,A730) items nested ``depth`` deep, defined lengths, explicit VR
    little endian, around ``payload``: bytes pydicom itself could not write (it encodes each
    level again for the lengths)."""
    content = struct.pack("<HH2sHL", 0x0040, 0xA160, b"UT", 0, len(payload)) + payload
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content
        content = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return content


def test_sequences_nested_250_deep_are_refused_in_the_reader(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    ds = deepcopy(small)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    split = Tag(0x0040, 0xA730)
    before, after = pydicom.Dataset(), pydicom.Dataset()
    for elem in ds:
        (before if elem.tag < split else after).add(elem)
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, before)
    out.write(_nested(250, b"x" * 65536))
    write_dataset(out, after)
    path = tmp_path / "deep.dcm"
    path.write_bytes(out.getvalue())
    stored = set(node.settings.storage.path.rglob("*.dcm"))
    assert send_as_is(node.settings.node.port, path) == 0xC000
    assert "sequences nested deeper than 16 levels: refused" in " ".join(_failures(node))
    assert set(node.settings.storage.path.rglob("*.dcm")) == stored


def test_the_node_still_reports_after_all_that(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    path = variant(small, tmp_path, lambda ds: None)
    assert storescu(node.settings.node.port, path).returncode == 0
    assert outcome(node, path).state == InstanceState.REPORTED


def test_a_huge_header_value_is_not_copied_into_the_reports(
    node: NodeService, small: pydicom.Dataset, tmp_path: Path
) -> None:
    path = variant(small, tmp_path, _set(PatientComments="x" * 200_000))
    assert storescu(node.settings.node.port, path).returncode == 0
    inst = outcome(node, path)
    assert inst.state == InstanceState.REPORTED
    with node.db.session() as s:
        result = s.scalars(select(Result).where(Result.instance_id == inst.id)).one()
    sr, sc = Path(str(result.sr_path)), Path(str(result.sc_path))
    assert sr.stat().st_size < 100_000
    for made in (sr, sc):
        assert "PatientComments" not in pydicom.dcmread(made, stop_before_pixels=True)
    assert dciodvfy_errors(sr) == []
