"""Network abuse against a node run as an administrator runs it (``xrayage serve``): a PDU that
claims 4 GiB, a peer trickling bytes, more associations than allowed. The node stays up and
small, and says what it refused."""

from __future__ import annotations

import collections
import contextlib
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    Verification,
)

from tests.conftest import node_config
from tests.servers import NodeProcess, echo, free_port, wait_until

TIMEOUT = 3  # [node] network_timeout_seconds for these tests
REQUEST_TIMEOUT = 4  # [node] association_request_timeout_seconds
MAX_ASSOCIATIONS = 2
MAX_PENDING = 8
MB = 1 << 20
MAX_DATASET = 4 * MB


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("abuse")
    port = free_port()
    config = node_config(
        folder, port, None, None,
        node=f"network_timeout_seconds = {TIMEOUT}\nmax_associations = {MAX_ASSOCIATIONS}\n"
        f"association_request_timeout_seconds = {REQUEST_TIMEOUT}\n"
        f"max_pending_connections = {MAX_PENDING}\nmax_dataset_bytes = {MAX_DATASET}",
    )  # fmt: skip
    proc = NodeProcess(config, port, folder / "node.log")
    proc.start()
    yield proc
    proc.stop()


def _memory_kb(node: NodeProcess, field: str) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc status")


def _log(node: NodeProcess) -> str:
    return node.log.read_text()


def _still_serving(node: NodeProcess) -> None:
    """C-ECHO answered once the refused connection's slot is free (at most the timeout)."""
    wait_until(lambda: echo(node.port), TIMEOUT + 5, "C-ECHO after the refusal")


def test_a_pdu_claiming_4_gib_is_refused_and_memory_stays_flat(node: NodeProcess) -> None:
    assert node.proc is not None
    Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _memory_kb(node, "VmRSS")
    sent = 0
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        # A-ASSOCIATE-RQ header claiming 0xFFFFFFFF bytes, then as much as the node will take.
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
        chunk = bytes(MB)
        try:
            while sent < 512 * MB:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # reset by the node
            pass
    growth_mb = (_memory_kb(node, "VmHWM") - before) / 1024
    print(f"node took {sent / MB:.0f} MB before hanging up; peak RSS grew {growth_mb:.1f} MB")
    assert sent < 64 * MB, "the node kept reading"
    assert growth_mb < 64, f"peak memory grew by {growth_mb:.0f} MB"
    wait_until(lambda: "claims 4294967295 bytes" in _log(node), 10, "the refusal in the log")
    _still_serving(node)


def test_a_peer_trickling_bytes_is_dropped_after_the_network_timeout(node: NodeProcess) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 1000))
        started = time.monotonic()
        try:
            while time.monotonic() - started < 30:
                sock.sendall(b"\0")
                time.sleep(0.5)
        except OSError:  # reset by the node
            pass
        dropped_after = time.monotonic() - started
    print(f"trickler dropped after {dropped_after:.1f} s")
    assert dropped_after < TIMEOUT + 3, f"still connected after {dropped_after:.1f} s"
    assert "(network timeout): connection dropped" in _log(node)
    _still_serving(node)


def test_associations_beyond_the_maximum_are_rejected_until_one_ends(node: NodeProcess) -> None:
    ae = AE("HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="XRAYAGE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", node.port, ae_title="XRAYAGE")
        assert extra.is_rejected
        # PS3.8 9.3.4: rejected-transient (2), service provider (presentation) (3), local limit
        # exceeded (2)
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        wait_until(lambda: "rejected: local limit exceeded" in _log(node), 10, "the log line")
    finally:
        for a in held:
            a.release()
    _still_serving(node)


def test_a_p_data_pdu_longer_than_announced_is_refused(node: NodeProcess) -> None:
    ae = AE("OVERSIZE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="XRAYAGE")
    assert assoc.is_established
    announced = assoc.acceptor.maximum_length
    assert announced == 131072  # [node] max_pdu_bytes
    raw = assoc.dul.socket.socket  # under pynetdicom: write what it never would
    raw.sendall(struct.pack(">BBL", 0x04, 0, announced + 1) + bytes(announced + 1))
    wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), 10, "the node to drop us")
    assert f"PDU type 0x04 claims {announced + 1} bytes (limit {announced})" in _log(node)
    _still_serving(node)


def _closed_by_peer(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_connections_neither_count_as_associations_nor_pile_up(node: NodeProcess) -> None:
    """200 connections that never send an A-ASSOCIATE-RQ: once silent for a second, a new
    connection closes all but MAX_PENDING of them; each goes after REQUEST_TIMEOUT anyway; a
    real peer is served all along, and memory stays flat."""
    assert node.proc is not None
    Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")
    before = _memory_kb(node, "VmRSS")
    silent = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(200)]
    try:
        started = time.monotonic()
        assert echo(node.port), "C-ECHO refused beside silent connections"
        served_in = time.monotonic() - started
        print(f"C-ECHO beside 200 silent connections: {served_in * 1000:.0f} ms")
        assert served_in < 2.5  # 0.4-0.5 s measured on 2 cores (it was refused for 52-56 s)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))
        assert echo(node.port)  # this one's connection closes the longest silent
        still_open = [s for s in silent if not _closed_by_peer(s, 0.05)]
        assert len(still_open) <= MAX_PENDING, len(still_open)
        late = [s for s in still_open if not _closed_by_peer(s, REQUEST_TIMEOUT + 3)]
        assert late == [], f"{len(late)} silent connections still open"
    finally:
        for s in silent:
            s.close()
    log = _log(node)
    assert "no association request after" in log and "max_pending_connections" in log
    grown = _memory_kb(node, "VmHWM") - before
    print(f"peak RSS growth with 200 silent connections: {grown} kB")
    assert grown < 64 * 1024
    _still_serving(node)


def _association_request() -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends for C-ECHO, as bytes: a burst of raw sockets
    then costs the test nothing, and measures the node rather than 200 pynetdicom threads."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        ae = AE("BURST")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 1
        port = listener.getsockname()[1]
        asking = threading.Thread(target=ae.associate, args=("127.0.0.1", port), daemon=True)
        asking.start()
        conn, _ = listener.accept()
        with conn:
            header = conn.recv(6, socket.MSG_WAITALL)
            body = conn.recv(struct.unpack(">BBL", header)[2], socket.MSG_WAITALL)
        asking.join(5)
    return header + body.replace(b"ANY-SCP".ljust(16), b"XRAYAGE".ljust(16))


RELEASE_RQ = struct.pack(">BBLL", 0x05, 0, 4, 0)


def test_a_burst_of_200_requests_admits_exactly_the_maximum(node: NodeProcess) -> None:
    """200 A-ASSOCIATE-RQs at once: exactly MAX_ASSOCIATIONS are admitted (counted by the
    node, in its audit log), the others rejected with local-limit-exceeded, about as fast."""
    request = _association_request()
    start = threading.Barrier(200)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def ask() -> None:
        start.wait()
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
            sock.sendall(request)
            answer = sock.recv(10, socket.MSG_WAITALL)
            took = time.monotonic() - began
            if answer[:1] == b"\x02":  # A-ASSOCIATE-AC: held while the others ask
                time.sleep(2)
                sock.sendall(RELEASE_RQ)
                outcome = "accepted"
            elif answer[:1] == b"\x03":  # A-ASSOCIATE-RJ: result, source, reason (PS3.8 9.3.4)
                outcome = "rejected {} {} {}".format(*answer[7:10])
            else:
                outcome = f"answer {answer!r}"
            with lock:
                outcomes.append((outcome, took))

    with sqlite3.connect(node.config.parent / "data" / "xrayage.db") as db:
        accepted_before = _accepted(db)
        threads = [threading.Thread(target=ask) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        counts = collections.Counter(o for o, _ in outcomes)
        assert counts == {"accepted": MAX_ASSOCIATIONS, "rejected 2 3 2": 198}, counts
        rejections = sorted(took for o, took in outcomes if o.startswith("rejected"))
        median, slowest = rejections[len(rejections) // 2], rejections[-1]
        print(f"burst rejections: median {median * 1000:.0f} ms, slowest {slowest * 1000:.0f} ms")
        # 0.6-0.8 s and 1.2-1.5 s measured on 2 cores, the 200 requesting threads on them too
        assert median < 1.0 and slowest < 2.5
        wait_until(lambda: _accepted(db) - accepted_before == MAX_ASSOCIATIONS, 10, "audit")
    _still_serving(node)


def _accepted(db: sqlite3.Connection) -> int:
    query = "SELECT count(*) FROM audit_events WHERE detail LIKE 'association accepted%'"
    return int(db.execute(query).fetchone()[0])


def _dataset(pixel_bytes: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", "BIG"
    ds.PixelData = bytes(pixel_bytes)
    ds["PixelData"].VR = "OB"
    return ds


def test_a_data_set_over_max_dataset_bytes_is_dropped_as_it_arrives(node: NodeProcess) -> None:
    """pynetdicom holds a C-STORE's data set whole before a handler sees it: one over the limit
    ends the association while it arrives, memory stays flat, and the next C-STORE is stored."""
    assert node.proc is not None
    Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")
    before = _memory_kb(node, "VmRSS")
    ae = AE("BIGSENDER")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="XRAYAGE")
    assert assoc.is_established
    with contextlib.suppress(Exception):  # the node drops the connection mid-send
        assoc.send_c_store(_dataset(64 * MB))
    wait_until(lambda: not assoc.is_alive(), 10, "the node to drop the association")
    assert "(max_dataset_bytes): connection dropped" in _log(node)
    grown = _memory_kb(node, "VmHWM") - before
    print(f"peak RSS growth with a 64 MB data set against a 4 MB limit: {grown} kB")
    assert grown < 2 * MAX_DATASET // 1024 + 16 * 1024
    assoc = ae.associate("127.0.0.1", node.port, ae_title="XRAYAGE")
    try:
        assert assoc.send_c_store(_dataset(MAX_DATASET // 2)).Status == 0x0000
    finally:
        assoc.release()


def test_a_deflate_bomb_is_refused_before_it_inflates(node: NodeProcess) -> None:
    """A Deflated Explicit VR data set of a few hundred kB that inflates to 256 MB: refused with
    0xC000 as it passes max_dataset_bytes, audited, memory flat, nothing stored."""
    assert node.proc is not None
    bomb = _dataset(256 * MB)
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")
    before = _memory_kb(node, "VmRSS")
    ae = AE("DEFLATER")
    ae.add_requested_context(ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="XRAYAGE")
    try:
        assert assoc.send_c_store(bomb).Status == 0xC000
    finally:
        assoc.release()
    grown = _memory_kb(node, "VmHWM") - before
    print(f"peak RSS growth with a deflate bomb of 256 MB: {grown} kB")
    assert grown < 2 * MAX_DATASET // 1024 + 16 * 1024
    stored = list((node.config.parent / "data" / "dicom").rglob(f"{bomb.SOPInstanceUID}*"))
    assert stored == []
    with sqlite3.connect(node.config.parent / "data" / "xrayage.db") as db:
        query = "SELECT detail FROM audit_events WHERE detail LIKE '%inflates past%'"
        (detail,) = db.execute(query).fetchone()
    assert "(max_dataset_bytes): refused" in detail
