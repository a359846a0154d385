"""Receive and deliver in-process: idempotency, conflicts, and a delivery that must wait."""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from node.dicom.scp import Receiver
from node.dicom.scu import on_connect, send_files
from node.service import NodeService
from storage import AuditEvent, Delivery, DeliveryState, Instance, InstanceState, Job
from storage.tables import utcnow
from tests.conftest import node_in_process
from tests.servers import free_port, wait_until


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NodeService]:
    with node_in_process(tmp_path) as node:  # no weights: receive and queue only
        yield node


def send(node: NodeService, *paths: Path) -> list[str | None]:
    return send_files("TESTSCU", "XRAYAGE", "127.0.0.1", node.settings.node.port, list(paths))


def count(node: NodeService, what: type) -> int:
    with node.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(what)) or 0)


def test_the_same_instance_twice_is_one_instance_and_one_job(
    receiver: NodeService, chest_pa: Path
) -> None:
    assert send(receiver, chest_pa, chest_pa) == [None, None]
    assert count(receiver, Instance) == 1 and count(receiver, Job) == 1
    with receiver.db.session() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.state == InstanceState.QUEUED and inst.calling_ae == "TESTSCU"
        assert Path(inst.path).read_bytes()[128:132] == b"DICM"  # stored as a DICOM file


def test_different_content_under_a_stored_uid_is_refused(
    receiver: NodeService, chest_pa: Path, tmp_path: Path
) -> None:
    assert send(receiver, chest_pa) == [None]
    changed = pydicom.dcmread(chest_pa)
    changed.PatientID = "SOMEONE-ELSE"
    other = tmp_path / "changed.dcm"
    changed.save_as(other)
    assert send(receiver, other) == ["C-STORE status 0x0111"]
    with receiver.db.session() as s:
        inst = s.scalars(select(Instance)).one()
        assert pydicom.dcmread(inst.path).PatientID == "9RG1"
        refused = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")).one()
        assert "different content" in (refused.detail or "")


def test_a_delivery_to_an_unreachable_pacs_is_kept_and_retried(
    tmp_path: Path, chest_pa: Path, weights: Path
) -> None:
    with node_in_process(
        tmp_path,
        model={"weights": str(weights), "device": "cpu"},
        delivery={"retry_initial_seconds": 60, "max_attempts": 5, "timeout_seconds": 2},
        destinations=[
            {"name": "down", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
        ],
    ) as node:
        assert send(node, chest_pa) == [None]

        def tried() -> list[Delivery]:
            with node.db.session() as s:
                rows = list(s.scalars(select(Delivery).where(Delivery.attempts >= 1)))
            return rows if len(rows) == 2 else []

        rows = wait_until(tried, 120, "two failed delivery attempts (SR and SC)")
        for d in rows:
            assert d.state == DeliveryState.PENDING and "association" in (d.last_error or "")
            # retry_initial_seconds = 60: the next try is 30-60 s away (full jitter), not now
            assert d.next_attempt_at > utcnow() + dt.timedelta(seconds=25)
        with node.db.session() as s:
            assert s.scalars(select(Instance)).one().state == InstanceState.REPORTED


def test_both_ends_of_an_association_send_each_pdu_at_once(receiver: NodeService) -> None:
    """TCP_NODELAY on the node's accepted sockets and on those it opens (``on_connect``): with
    Nagle's algorithm a small PDU after another waits for the peer's delayed ACK."""
    ae = AE("TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1", receiver.settings.node.port, ae_title="XRAYAGE",
        evt_handlers=[(evt.EVT_CONN_OPEN, on_connect)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        (scp,) = [c for c in receiver.components if isinstance(c, Receiver)]
        assert scp.server is not None
        (accepted,) = scp.server.active_associations
        ends = [a.dul.socket.socket for a in (assoc, accepted)]  # type: ignore[union-attr]
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in ends)
    finally:
        assoc.release()


def test_a_response_waits_for_the_call_that_expects_it(receiver: NodeService) -> None:
    """pynetdicom's reactor polls the DIMSE queue of every association; on those the node
    requests (``on_connect``) it takes nothing, so it cannot swallow a response meant for the
    next ``send_*()`` (pynetdicom issue 875: lost C-FIND matches in retro-scans)."""
    late = C_ECHO()
    late.MessageIDBeingRespondedTo, late.Status = 1, 0x0000
    ae = AE("TESTSCU")
    ae.add_requested_context(Verification)
    port = receiver.settings.node.port
    queued = {}
    for guarded in (False, True):
        handlers = [(evt.EVT_CONN_OPEN, on_connect)] if guarded else []
        assoc = ae.associate("127.0.0.1", port, ae_title="XRAYAGE", evt_handlers=handlers)
        assert assoc.is_established
        try:
            assoc.dimse.msg_queue.put((1, late))
            time.sleep(0.1)  # the reactor polls every millisecond
            queued[guarded] = assoc.dimse.msg_queue.qsize()
            if guarded:
                assert assoc.dimse.get_msg(block=True) == (1, late)
                assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    assert queued == {False: 0, True: 1}  # pynetdicom's own reactor takes it: the guard matters
