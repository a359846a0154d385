"""Network abuse against a node run as an administrator runs it (``xrayage serve``): a PDU that
claims 4 GiB, a peer trickling bytes, more associations than allowed. The node stays up and
small, and says what it refused."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import node_config
from tests.servers import NodeProcess, echo, free_port, wait_until

TIMEOUT = 3  # [node] network_timeout_seconds for these tests
MB = 1 << 20


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("abuse")
    port = free_port()
    config = node_config(
        folder, port, None, None, node=f"network_timeout_seconds = {TIMEOUT}\nmax_associations = 2"
    )
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
        # PS3.8 9.3.4: rejected-transient (2), service provider (ACSE) (3), local limit exceeded (2)
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
