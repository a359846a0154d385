"""ATNA export: every audit event reaches a syslog collector on 127.0.0.1 as an RFC 5424 message
carrying a DICOM audit message (PS3.15 A.5), and a collector that was away gets the backlog."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom

from tests.conftest import node_in_process, small_chests, storescu
from tests.servers import free_port, wait_until
from tests.test_tls import pki  # noqa: F401  (the fixture)

HEADER = re.compile(
    rb"<85>1 \S+Z \S+ xrayage \d+ DICOM\+RFC3881 - (<AuditMessage>.*</AuditMessage>)$", re.S
)


class Collector:
    """A syslog receiver: RFC 6587 octet-counted frames over TCP (or TLS), or UDP datagrams."""

    def __init__(self, port: int, transport: str, tls: ssl.SSLContext | None = None) -> None:
        self.messages: list[ET.Element] = []
        self.transport, self.tls = transport, tls
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        if transport != "udp":
            self.sock.listen()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _take(self, frame: bytes) -> None:
        match = HEADER.match(frame)
        assert match, frame[:200]
        self.messages.append(ET.fromstring(match.group(1)))

    def _serve(self) -> None:
        try:
            while True:
                if self.transport == "udp":
                    self._take(self.sock.recv(65536))
                    continue
                conn, _ = self.sock.accept()
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                self.conns.append(conn)
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()
        except OSError:
            return

    def _read(self, conn: socket.socket) -> None:
        stream = conn.makefile("rb")
        try:
            while True:
                length = b""
                while (c := stream.read(1)) != b" ":
                    if not c:
                        return
                    length += c
                self._take(stream.read(int(length)))
        except (OSError, ValueError):
            return

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # the node may have closed it already
                conn.shutdown(socket.SHUT_RDWR)  # the reader's file object keeps it open
            conn.close()
        if self.transport != "udp":
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.sock.close()

    def event_ids(self) -> list[str]:
        return [m.find("EventIdentification/EventID").get("csd-code") for m in self.messages]  # type: ignore[union-attr]


def test_events_reach_a_tcp_collector_and_a_backlog_follows_an_outage(
    tmp_path: Path, chest_ds: pydicom.Dataset
) -> None:
    port = free_port()
    collector = Collector(port, "tcp")
    chest = small_chests(chest_ds, tmp_path / "in", 2)
    syslog = {"host": "127.0.0.1", "port": port, "transport": "tcp"}
    with node_in_process(tmp_path, audit={"syslog": syslog}) as node:
        assert storescu(node.settings.node.port, chest[0]).returncode == 0
        wait_until(lambda: "110104" in collector.event_ids(), 20, "DICOM Instances Transferred")
        received = next(
            m for m in collector.messages
            if m.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
        )  # fmt: skip
        patient = str(chest_ds.PatientID)
        objects = {o.get("ParticipantObjectTypeCode"): o.get("ParticipantObjectID")
                   for o in received.iter("ParticipantObjectIdentification")}  # fmt: skip
        assert objects == {"1": patient, "2": str(chest_ds.StudyInstanceUID)}
        users = [p.get("UserID") for p in received.iter("ActiveParticipant")]
        assert users == ["STORESCU", "XRAYAGE"]
        (described,) = received.iter("SOPClass")  # PS3.15 A.5.3: UID is required
        assert described.get("UID") == chest_ds.SOPClassUID
        first = pydicom.dcmread(chest[0], stop_before_pixels=True).SOPInstanceUID
        assert [i.get("UID") for i in described.iter("Instance")] == [first]
        assert "110100" in collector.event_ids()  # application activity: the node started

        collector.close()  # the collector goes away; events keep happening
        assert storescu(node.settings.node.port, chest[1]).returncode == 0
        later = str(pydicom.dcmread(chest[1], stop_before_pixels=True).SOPInstanceUID)
        collector = Collector(port, "tcp")
        wait_until(
            lambda: later in {i.get("UID") for m in collector.messages for i in m.iter("Instance")},
            30, "the events of the outage",
        )  # fmt: skip
    collector.close()


def test_events_reach_a_tls_collector(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "pacs.crt", pki / "pacs.key")
    port = free_port()
    collector = Collector(port, "tls", ctx)
    syslog = {"host": "127.0.0.1", "port": port, "transport": "tls",
              "tls": {"ca_certificates": str(pki / "ca.crt")}}  # fmt: skip
    with node_in_process(tmp_path, audit={"syslog": syslog}):
        wait_until(lambda: "110100" in collector.event_ids(), 20, "the node's start over TLS")
    collector.close()


def test_events_reach_a_udp_collector(tmp_path: Path) -> None:
    port = free_port()
    collector = Collector(port, "udp")
    with node_in_process(
        tmp_path, audit={"syslog": {"host": "127.0.0.1", "port": port, "transport": "udp"}}
    ):
        wait_until(lambda: "110100" in collector.event_ids(), 20, "the node's start over UDP")
    collector.close()
