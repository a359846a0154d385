"""The association server's network policy, before any DICOM is decoded.

pynetdicom 3.0.4 trusts the peer more than a hospital network should:

- its DUL reads a PDU's 6-byte header, then blocks until the whole claimed length has arrived
  (``dul._read_pdu_data``), growing a buffer as it goes: a peer claiming 4 GiB can make the
  node hold 4 GiB, and a peer trickling bytes holds a thread forever, since the idle timer is
  not checked during the read and accepted sockets have no timeout;
- with TLS it runs the handshake in the server's only accepting thread, so one silent client
  stops every other connection.

Here every read has a deadline (``network_timeout_seconds`` per PDU), a PDU longer than allowed
for its type is refused from its header (PS3.8 9.3.1: type, reserved, 4-byte length; a
P-DATA-TF PDU may not exceed the Maximum Length we announce, PS3.8 D.1), the TLS handshake
runs on the connection's own thread under the same deadline, and peers outside
``allowed_peers`` are dropped before any of this. Each refusal is logged and audited through
``on_violation(host, detail)``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from node.compat import HookedRequestHandler, server_of, use_socket_class

log = logging.getLogger("xrayage.receive")

P_DATA_TF = 0x04
# A-ASSOCIATE-RQ and the other control PDUs: a few kB in practice; user identity negotiation
# (a SAML assertion, a JWT) can be larger, so a generous bound that still caps memory.
MAX_CONTROL_PDU = 1 << 20


def _host(address: object) -> str:
    return str(address[0]) if isinstance(address, tuple) else str(address)


class GuardedSocket(AssociationSocket):
    """Reads under a deadline and refuses over-long PDUs; see the module docstring.

    pynetdicom's DUL always reads 6 header bytes, then the body it announced: ``recv`` follows
    that rhythm, so it knows which read is a header.
    """

    _header_next = True
    _hung_up = False

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
            self._header_next = False
        return data

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


class GuardedHandler(HookedRequestHandler):
    """Runs the TLS handshake on this connection's thread, then uses a :class:`GuardedSocket`."""

    server: GuardedServer

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            host = _host(self.client_address)
            try:
                self.request.settimeout(self.server.pdu_deadline)
                self.request.do_handshake()
            except (OSError, ssl.SSLError) as e:
                self.server.on_violation(host, f"TLS handshake failed: {e}")
                return
            subject = (self.request.getpeercert() or {}).get("subject")
            if subject:
                log.info("TLS client %s: %s", host, subject)
        super().handle()

    def association_created(self, assoc: Association) -> None:
        use_socket_class(assoc, GuardedSocket)  # the guarded reads


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the policy of the module docstring."""

    allowed: tuple[IPv4Network | IPv6Network, ...] = ()
    pdu_deadline = 60.0
    max_pdata_length = 1 << 17
    on_violation: Callable[[str, str], None] = staticmethod(lambda host, detail: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, request_handler=GuardedHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        # pynetdicom leaves Nagle's algorithm on: a response split over two writes would wait for
        # the peer's delayed ACK (40 ms on Linux).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:  # handshake later, on the connection's thread
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: object, client_address: object) -> bool:
        if not self.allowed:
            return True
        host = _host(client_address)
        try:
            if any(ip_address(host) in net for net in self.allowed):
                return True
        except ValueError:
            pass
        self.on_violation(host, f"connection refused: peer {host} not allowed")
        return False
