"""The association server's network policy, before any DICOM is decoded.

pynetdicom 3.0.4 trusts the peer more than a hospital network should:

- its DUL reads a PDU's 6-byte header, then blocks until the whole claimed length has arrived
  (``dul._read_pdu_data``), growing a buffer as it goes: a peer claiming 4 GiB can make the
  node hold 4 GiB, and a peer trickling bytes holds a thread forever, since the idle timer is
  not checked during the read and accepted sockets have no timeout;
- with TLS it runs the handshake in the server's only accepting thread, so one silent client
  stops every other connection.

- it counts a connection that has sent nothing yet as an association: silent connections fill
  ``maximum_associations`` until the ACSE timeout, and the count, taken by each negotiating
  thread on its own, is not exact under a burst of requests.

Here every read has a deadline (``network_timeout_seconds`` per PDU; the first PDU, the
A-ASSOCIATE-RQ, ``association_request_timeout_seconds``), a PDU longer than allowed
for its type is refused from its header (PS3.8 9.3.1: type, reserved, 4-byte length; a
P-DATA-TF PDU may not exceed the Maximum Length we announce, PS3.8 D.1), the TLS handshake
runs on the connection's own thread under the same deadline, and peers outside
``allowed_peers`` are dropped before any of this. Connections that have not yet sent their
A-ASSOCIATE-RQ are capped (``max_pending_connections``: a new one closes those silent for
longest, once silent for a second, so that a flood of silent connections cannot keep a real
peer out) and do not count as associations; an association is admitted when its request
arrives, under one lock, so that no more than ``max_associations`` are ever admitted at once,
and the others are rejected at once with local-limit-exceeded (PS3.8 9.3.4). Each refusal is
logged and audited through ``on_violation(host, detail)``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from node.compat import HookedRequestHandler, server_of, use_socket_class

log = logging.getLogger("xrayage.receive")

P_DATA_TF = 0x04
# A-ASSOCIATE-RQ and the other control PDUs: a few kB in practice; user identity negotiation
# (a SAML assertion, a JWT) can be larger, so a generous bound that still caps memory.
MAX_CONTROL_PDU = 1 << 20
SILENT_SECONDS = 1.0  # a connection silent this long may be closed for a new one


def _host(address: object) -> str:
    return str(address[0]) if isinstance(address, tuple) else str(address)


class GuardedSocket(AssociationSocket):
    """Reads under a deadline and refuses over-long PDUs; see the module docstring.

    pynetdicom's DUL always reads 6 header bytes, then the body it announced: ``recv`` follows
    that rhythm, so it knows which read is a header.
    """

    _header_next = True
    _hung_up = False
    _pdata = False  # the body about to be read is a P-DATA-TF PDU's
    _dataset_bytes = 0  # of the data set being received

    @property
    def _server(self) -> GuardedServer:
        return server_of(self.assoc)  # type: ignore[return-value]

    def recv(self, nr_bytes: int) -> bytearray:
        if self._hung_up:  # what the peer already sent is discarded, not parsed
            return bytearray()
        server = self._server
        data = self._recv_before(nr_bytes, time.monotonic() + server.pdu_deadline)
        if not self._header_next:
            self._header_next = True
            if self._pdata and not self._count_dataset(data):
                return self._hang_up()
            return data
        if len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            limit = server.max_pdata_length if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
            if length > limit:
                server.on_violation(
                    _host(self.assoc.requestor.address),
                    f"PDU type 0x{pdu_type:02X} claims {length} bytes (limit {limit}): aborted",
                )
                return self._hang_up()
            self._header_next, self._pdata = False, pdu_type == P_DATA_TF
        return data

    def _count_dataset(self, body: bytearray) -> bool:
        """Add a P-DATA-TF PDU's data set fragments to the message's total (PS3.8 9.3.5 and
        E.2: items of a 4-byte length, the context ID, a control header whose bit 0 marks a
        command and bit 1 the last fragment); False once over ``max_dataset_bytes``, which
        pynetdicom would otherwise hold in memory whole before any handler sees it."""
        offset, limit = 0, self._server.max_dataset_bytes
        while offset + 6 <= len(body):
            length = struct.unpack_from(">L", body, offset)[0]
            control = body[offset + 5]
            if not control & 0x01:  # a data set fragment
                self._dataset_bytes += max(0, length - 2)
                if self._dataset_bytes > limit:
                    self._server.on_violation(
                        _host(self.assoc.requestor.address),
                        f"a data set over {limit:,} bytes (max_dataset_bytes): connection "
                        "dropped before it was held in memory",
                    )
                    return False
                if control & 0x02:
                    self._dataset_bytes = 0
            offset += 4 + length
        return True

    def _recv_before(self, nr_bytes: int, deadline: float) -> bytearray:
        sock = self.socket
        assert sock is not None
        # Received in place: a 128 KiB P-DATA PDU is one buffer, not pieces joined.
        data = bytearray(nr_bytes)
        view = memoryview(data)
        got = 0
        blocking = sock.gettimeout()  # restored: sends must not inherit a read's deadline
        try:
            while got < nr_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    n = sock.recv_into(view[got:])
                except TimeoutError:
                    break
                if not n:  # the peer closed: not a violation
                    return data[:got]
                got += n
        finally:
            view.release()
            with contextlib.suppress(OSError):  # closed meanwhile: hung up from the accept thread
                sock.settimeout(blocking)
        if got < nr_bytes:
            self._server.on_violation(
                _host(self.assoc.requestor.address),
                f"{got} of {nr_bytes} bytes in {self._server.pdu_deadline:g} s "
                "(network timeout): connection dropped",
            )
            return self._hang_up()
        return data

    def _hang_up(self) -> bytearray:
        """End the connection as if the peer had closed it: the DUL's own path for that (a short
        read, then Evt17) tidies up, and the peer sees the connection go at once."""
        self._hung_up = True
        with contextlib.suppress(OSError):  # already gone
            self.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        return bytearray()


class _Summary:
    """Reports a flood of one kind of refusal as its first, then one line a second with the
    count: auditing each would make the flood a flood of database writes."""

    def __init__(self, report: Callable[[str, str], None]) -> None:
        self.report, self.since, self.quiet = report, 0.0, 0

    def add(self, host: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.since < 1.0:
            self.quiet += 1
            return
        more = f" (and {self.quiet} more since the last report)" if self.quiet else ""
        self.since, self.quiet = now, 0
        self.report(host, detail + more)


class GuardedHandler(HookedRequestHandler):
    """Runs the TLS handshake on this connection's thread, then uses a :class:`GuardedSocket`."""

    server: GuardedServer

    def handle(self) -> None:
        host = _host(self.client_address)
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(self.server.pdu_deadline)
                self.request.do_handshake()
            except (OSError, ssl.SSLError) as e:
                self.server.on_violation(host, f"TLS handshake failed: {e}")
                self.server.shutdown_request(self.request)
                return
            subject = (self.request.getpeercert() or {}).get("subject")
            if subject:
                log.info("TLS client %s: %s", host, subject)
        # Until its first bytes arrive a connection is only this thread, blocked: pynetdicom's
        # association and its polling DUL thread are made for peers that speak.
        if not self.server.await_request(self.request, host):
            self.server.shutdown_request(self.request)
            return
        super().handle()

    def association_created(self, assoc: Association) -> None:
        use_socket_class(assoc, GuardedSocket)  # the guarded reads
        assoc.bind(evt.EVT_REQUESTED, self.server.admit)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the policy of the module docstring."""

    # socketserver listens with a backlog of 5: a burst of connections beyond it has its SYNs
    # dropped and retried by the peers' kernels after 1, 3, 7 s, as if the node were slow.
    request_queue_size = 1024
    allowed: tuple[IPv4Network | IPv6Network, ...] = ()
    pdu_deadline = 60.0
    request_deadline = 10.0
    max_pdata_length = 1 << 17
    max_dataset_bytes = 1 << 30
    max_associations = 10
    max_pending = 20
    on_violation: Callable[[str, str], None] = staticmethod(lambda host, detail: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, request_handler=GuardedHandler, **kwargs)
        self._admission = threading.Lock()
        # The admitted associations; an ended one leaves ``active_associations`` (its thread is
        # gone) and so frees its place by itself.
        self._admitted: weakref.WeakSet[Association] = weakref.WeakSet()
        # When each connection was accepted (a handler thread may start much later in a
        # flood), and those waiting for their first bytes, by when they were accepted.
        self.accepted: weakref.WeakKeyDictionary[socket.socket, float] = (
            weakref.WeakKeyDictionary()
        )
        self._waiting: dict[socket.socket, tuple[float, str]] = {}
        self._dropped: set[socket.socket] = set()
        report = lambda host, detail: self.on_violation(host, detail)  # noqa: E731 (set later)
        self._evictions, self._rejections = _Summary(report), _Summary(report)
        self._silences = _Summary(report)

    def admit(self, event: evt.Event) -> None:
        """EVT_REQUESTED: admit the association if fewer than ``max_associations`` are, else
        reject it now with local-limit-exceeded (pynetdicom then skips its negotiation)."""
        assoc = event.assoc
        with self._admission:
            admitted = [a for a in self.active_associations if a in self._admitted]
            if len(admitted) < self.max_associations:
                self._admitted.add(assoc)
                return
        # PS3.8 9.3.4: rejected-transient, service provider (presentation), local limit exceeded.
        # kill() returns once the DUL has sent it and the peer closed (or the ARTIM timer ran
        # out), as pynetdicom's own rejections do; else the reactor would close the socket
        # under the queued A-ASSOCIATE-RJ.
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()
        self._rejections.add(
            _host(assoc.requestor.address),
            f"association from {assoc.requestor.primitive.calling_ae_title} rejected: local "
            f"limit exceeded ({self.max_associations} associations)",
        )

    def await_request(self, conn: socket.socket, host: str) -> bool:
        """Wait up to ``request_deadline`` for the connection's first bytes (its
        A-ASSOCIATE-RQ); False, with the reason reported, when none came or when it was closed
        to make way for a newer connection."""
        if getattr(conn, "pending", lambda: 0)():  # TLS: already decrypted and buffered
            return True
        with self._admission:
            self._waiting[conn] = (self.accepted.pop(conn, time.monotonic()), host)
        poller = select.poll()
        try:
            poller.register(conn, select.POLLIN)
            spoke = bool(poller.poll(self.request_deadline * 1000))  # bytes, or the peer closed
        except (OSError, ValueError):  # closed meanwhile
            spoke = False
        with self._admission:
            opened, _ = self._waiting.pop(conn)
            dropped = conn in self._dropped
            self._dropped.discard(conn)
        if not spoke and not dropped:
            self._silences.add(
                host,
                f"no A-ASSOCIATE-RQ within {time.monotonic() - opened:.3g} s "
                "(association_request_timeout_seconds): connection dropped",
            )
        return spoke and not dropped

    def _make_way(self) -> None:
        """At most ``max_pending`` connections wait for their first bytes: those silent for
        longest are closed (once silent for a while: in a burst, a peer may be between its
        connect and its send)."""
        cutoff = time.monotonic() - min(SILENT_SECONDS, self.request_deadline / 2)
        with self._admission:
            silent = sorted(
                (when, host, conn)
                for conn, (when, host) in self._waiting.items()
                if conn not in self._dropped
            )
            over = len(silent) - self.max_pending + 1
            victims = [v for v in silent[: max(0, over)] if v[0] < cutoff]
            self._dropped.update(conn for _, _, conn in victims)
        for opened, host, conn in victims:
            with contextlib.suppress(OSError):  # wakes its thread's poll
                conn.shutdown(socket.SHUT_RDWR)
            self._evictions.add(
                host,
                f"connection dropped: no association request after "
                f"{time.monotonic() - opened:.1f} s, and {len(silent)} connections were waiting "
                f"to send one (max_pending_connections = {self.max_pending})",
            )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        accepted = time.monotonic()
        # pynetdicom leaves Nagle's algorithm on: a response split over two writes would wait for
        # the peer's delayed ACK (40 ms on Linux).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:  # handshake later, on the connection's thread
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        self.accepted[client] = accepted
        return client, address

    def verify_request(self, request: object, client_address: object) -> bool:
        host = _host(client_address)
        if self.allowed and not self._allowed(host):
            self.on_violation(host, f"connection refused: peer {host} not allowed")
            return False
        self._make_way()
        return True

    def _allowed(self, host: str) -> bool:
        try:
            return any(ip_address(host) in net for net in self.allowed)
        except ValueError:
            return False
