"""Memory is bounded in every process whatever a sender claims: data sets are received into
files, never held whole (four 100 MB C-STOREs at once and a deflated bomb leave the receiver
as it was), and an image whose decoding needs more than a decoding process may use fails with
that reason while the node goes on."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from storage import AuditEvent, Database, Instance, InstanceState
from tests.conftest import node_config, node_in_process, small_chests, storescu
from tests.servers import NodeProcess, free_port, wait_until

MB = 1 << 20


def _peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


def _with_private_element(chest_ds: pydicom.Dataset, path: Path, megabytes: int) -> Path:
    """The chest CR with ``megabytes`` of private data beside its pixels, a fresh UID."""
    ds = chest_ds.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x00091010, "LO", "XRAYAGE TEST")
    ds.add_new(0x00091011, "OB", bytes(megabytes * MB))
    ds.save_as(path, enforce_file_format=True)
    return path


def _deflate_bomb(chest_ds: pydicom.Dataset, path: Path, inflated_mb: int) -> Path:
    """A Deflated Explicit VR Little Endian data set of a few hundred kB that inflates to
    ``inflated_mb`` (zeros in a private element)."""
    ds = pydicom.dcmread(_with_private_element(chest_ds, path, inflated_mb))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < inflated_mb * MB // 16  # deflated indeed
    return path


def test_large_and_deflated_data_sets_at_once_leave_the_receivers_memory_flat(
    tmp_path: Path, chest_ds: pydicom.Dataset
) -> None:
    """Four C-STOREs of 100 MB each over four associations at once, and a deflated data set
    inflating to 256 MB (past the default max_dataset_bytes, refused): the receiver's peak
    resident memory grows by less than one of them. Held in memory as they arrived (the node
    before this change), the four alone took 400 MB."""
    port = free_port()
    node = NodeProcess(node_config(tmp_path, port, None, None), port, tmp_path / "node.log")
    node.start()
    try:
        assert node.proc is not None
        large = [_with_private_element(chest_ds, tmp_path / f"large{i}.dcm", 100) for i in range(4)]
        bomb = _deflate_bomb(chest_ds, tmp_path / "bomb.dcm", 256)
        Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _peak_kb(node.proc.pid)
        with ThreadPoolExecutor(5) as pool:
            refused = pool.submit(storescu, port, bomb, options=("-xd",))  # deflated as stored
            sent = list(pool.map(lambda f: storescu(port, f), large))
        assert [s.returncode for s in sent] == [0] * 4, [s.stderr for s in sent]
        assert refused.result().returncode != 0  # storescu: the C-STORE failed (0xC000)
        db = Database.sqlite_in(tmp_path / "data")
        with db.session() as s:
            said = [e.detail or "" for e in s.scalars(select(AuditEvent))]
        db.dispose()
        assert any("inflates past 134,217,728 bytes" in d for d in said), said
        growth_mb = (_peak_kb(node.proc.pid) - before) / 1024
        print(f"receiver peak RSS grew {growth_mb:.0f} MB for 4 x 100 MB and a 256 MB bomb")
        assert growth_mb < 100, f"the receiver held {growth_mb:.0f} MB"
        stored = sorted((tmp_path / "data" / "dicom" / "incoming").rglob("*.dcm"))
        assert len(stored) == 4 and all(p.stat().st_size > 100 * MB for p in stored)
        assert [p for p in (tmp_path / "data" / "dicom" / "tmp").rglob("*") if p.is_file()] == []
    finally:
        node.stop()


def test_an_image_whose_decoding_needs_more_than_its_process_may_use_fails_alone(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    """With decode_memory_mb = 256, an 8000 x 8000 radiograph (within max_dataset_bytes and
    the pixel budget, 122 MB) cannot be decoded: it ends failed with that reason, and the
    next image is reported as usual."""
    huge = chest_ds.copy()
    huge.SOPInstanceUID = huge.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pixels = np.random.default_rng(1).integers(0, 4096, (8000, 8000), dtype=np.uint16)
    huge.Rows, huge.Columns = pixels.shape
    huge.PixelData = pixels.tobytes()
    huge_path = tmp_path / "huge.dcm"
    huge.save_as(huge_path, enforce_file_format=True)
    [small] = small_chests(chest_ds, tmp_path / "small", 1)
    with node_in_process(
        tmp_path, model={"weights": str(weights), "decode_memory_mb": 256}
    ) as node:
        assert storescu(node.settings.node.port, huge_path, small).returncode == 0

        def states() -> dict[str, tuple[InstanceState, str | None]]:
            with node.db.session() as s:
                rows = s.scalars(select(Instance))
                return {i.sop_instance_uid: (i.state, i.reason) for i in rows}

        wait_until(
            lambda: {state for state, _ in states().values()}
            == {InstanceState.FAILED, InstanceState.REPORTED},
            180, "one failed, one reported",
        )  # fmt: skip
        state, reason = states()[str(huge.SOPInstanceUID)]
        assert state == InstanceState.FAILED
        assert "decoding needs more memory than a decoding process may use (256 MB)" in (
            reason or ""
        ), reason


def test_the_inflation_at_receipt_is_bounded_and_streamed(tmp_path: Path) -> None:
    """The receiver's inflation writes to a file a megabyte at a time and stops at the
    ceiling: a 1 GB bomb of 1 MB is refused having written just past the ceiling."""
    from node.dicom.header import TooLarge, inflate

    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = b"".join(packer.compress(bytes(MB)) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2 * MB
    source, out = tmp_path / "bomb", tmp_path / "out"
    source.write_bytes(bomb)
    with source.open("rb") as s, out.open("wb") as o:
        try:
            inflate(s, o, 64 * MB)
        except TooLarge:
            pass
        else:
            raise AssertionError("inflated past the ceiling")
    assert out.stat().st_size <= 64 * MB
