"""The SCP: C-ECHO and C-STORE, durable before Success (ARCHITECTURE.md).

C-STORE status codes (PS3.4 Table B.2-1, PS3.7 Annex C):

=======  ==========================================================================
0x0000   stored: file fsynced under its final name and its row committed
0x0111   Duplicate SOP Instance: different content under a UID already stored
0xA700   Out of Resources: the file or the row could not be made durable (resend later)
0xA900   Data Set does not match SOP Class: dataset UIDs differ from the command's
0xC000   Cannot Understand: the dataset cannot be decoded, or its UID is not valid
=======  ==========================================================================

The handler reads header attributes only; pixels are decoded by the inference worker.

Association policy: the network rules of :mod:`node.dicom.guard` (peer addresses, PDU lengths,
read deadlines, TLS handshake) apply before any DICOM is decoded; a calling AE title outside
``allowed_calling_aets`` gets A-ASSOCIATE-RJ (rejected-permanent, calling AE title not
recognised, PS3.8 9.3.4). All are audited, as is every accepted association.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.utils import make_target
from sqlalchemy.exc import SQLAlchemyError

from node.compat import (
    copy_contexts_cheaply,
    drop_partial_dataset,
    receive_datasets_to_files,
    register_server,
)
from node.config import NodeSection
from node.dicom.guard import GuardedServer
from node.dicom.header import TooLarge, parse_da, read_received, text
from node.dicom.statuses import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    DUPLICATE_CONFLICT,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from node.dicom.tls import server_context
from node.gate import Decision, Gate
from node.metrics import RECEIVED, SKIPPED, STAGE_SECONDS
from storage import Database, FileStore, InvalidUID, record_event
from storage.filestore import ConflictingContent
from storage.intake import Intake, Received, record_received
from xrayage.errors import CannotListen

log = logging.getLogger("xrayage.receive")


class Receiver:
    """The SCP under ``[node]``: C-STORE handling with the ``gate``'s rules; images to analyse
    are queued for the node's models (storage/queue.py) and ``on_queued`` wakes the inference
    worker. The retro-scan's C-GET uses
    :meth:`handle_store` alone."""

    def __init__(
        self,
        node: NodeSection,
        gate: Gate,
        db: Database,
        store: FileStore,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.node = node
        self.gate = gate
        self.server: GuardedServer | None = None
        self.db = db
        self.store = store
        self.on_queued = on_queued
        # Data sets are received into files in the store, as they arrive: memory stays the same
        # whatever their size (their size is bounded by ``max_dataset_bytes``, guard.py).
        receive_datasets_to_files(store.receiving_file)

    def _audit_failure(self, event: str, calling: str, detail: str) -> None:
        try:
            with self.db.session() as s:
                record_event(s, event, outcome="failure", actor=calling, detail=detail)
        except SQLAlchemyError:
            log.exception("audit log unavailable")

    def _audit_association(self, event: evt.Event, outcome: str, detail: str) -> None:
        peer = event.assoc.requestor
        try:
            with self.db.session() as s:
                record_event(
                    s, "association", outcome=outcome, actor=peer.ae_title,
                    detail=f"{detail}; peer {peer.address}:{peer.port}",
                )  # fmt: skip
        except SQLAlchemyError:
            log.exception("audit log unavailable")

    def handle_accepted(self, event: evt.Event) -> None:
        self._audit_association(event, "success", "association accepted")

    def handle_rejected(self, event: evt.Event) -> None:
        # PS3.8 9.3.4: calling AE title not recognised, local limit exceeded (max associations)...
        reason = event.assoc.acceptor.primitive.reason_str.lower()
        log.warning(
            "association from %s (%s) rejected: %s",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
            reason,
        )
        self._audit_association(event, "failure", f"association rejected: {reason}")

    def _network_violation(self, host: str, detail: str) -> None:
        log.warning("connection from %s: %s", host, detail)
        self._audit_failure("association", "-", f"{detail}; peer {host}")

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        status = self._store(event)
        STAGE_SECONDS.labels("store").observe(time.perf_counter() - started)
        return status

    def _store(self, event: evt.Event) -> int:
        assoc, request = event.assoc, event.request
        # A C-STORE on a C-GET association that we requested, or a C-MOVE sub-operation that we
        # originated (Move Originator AE Title, PS3.7 9.1.1.1), is a retro-scan's fetch.
        calling = (assoc.requestor if assoc.is_acceptor else assoc.acceptor).ae_title
        mover = (request.MoveOriginatorApplicationEntityTitle or "").strip()
        origin = "retro" if not assoc.is_acceptor or mover == self.node.ae_title else "push"
        received = Path(event.dataset_path)  # written by pynetdicom as the data set arrived
        try:
            digest = self.store.finish_receiving(received)
        except OSError as e:  # a full disk, a write the kernel refused, the reserve reached
            log.error("cannot store a data set from %s: %s", calling, e)
            self._audit_failure("received", calling, f"storage error: {e}")
            return OUT_OF_RESOURCES
        try:
            ds = read_received(received, self.node.max_dataset_bytes)
            sop_uid = str(ds.SOPInstanceUID)
            sop_class = str(ds.SOPClassUID)
        except TooLarge as e:
            self._audit_failure("received", calling, f"{e}: refused")
            return CANNOT_UNDERSTAND
        except Exception as e:  # any decoding error of a peer's bytes
            self._audit_failure("received", calling, f"dataset cannot be decoded: {e}")
            return CANNOT_UNDERSTAND
        if sop_uid != request.AffectedSOPInstanceUID or sop_class != request.AffectedSOPClassUID:
            self._audit_failure(
                "received",
                calling,
                f"dataset UIDs ({sop_class}, {sop_uid[:64]}) differ from the C-STORE "
                f"request ({request.AffectedSOPClassUID}, {request.AffectedSOPInstanceUID})",
            )
            return DOES_NOT_MATCH
        # The bytes as received, behind a preamble and File Meta Information (PS3.10 7.1): no
        # decoded copy of the pixels, no re-encoding, nothing of it held in memory.
        try:  # the store validates the UID before it links anything
            path, digest, _ = self.store.store_received_file(sop_uid, received, digest)
        except InvalidUID as e:
            self._audit_failure("received", calling, str(e))
            return CANNOT_UNDERSTAND
        except ConflictingContent:
            self._audit_failure(
                "received",
                calling,
                f"{sop_uid}: different content under a SOP Instance UID already stored; "
                "stored file kept",
            )
            return DUPLICATE_CONFLICT
        except OSError as e:
            log.error("cannot store %s: %s", sop_uid, e)
            self._audit_failure("received", calling, f"{sop_uid}: storage error: {e}")
            return OUT_OF_RESOURCES

        try:
            decision = self._commit(
                ds,
                path=str(path),
                digest=digest,
                size=path.stat().st_size,
                calling=calling,
                origin=origin,
            )
        except SQLAlchemyError as e:
            log.error("cannot record %s: %s", sop_uid, e)
            return OUT_OF_RESOURCES
        if decision is not None:
            RECEIVED.labels(origin).inc()
            if decision.analyse:
                self.on_queued()
            else:
                SKIPPED.labels(decision.code).inc()
        return SUCCESS

    def _commit(
        self, ds: Dataset, *, path: str, digest: str, size: int, calling: str, origin: str
    ) -> Decision | None:
        """Record the instance, its gate decision and its job in one transaction; the decision,
        or None for a duplicate."""
        received = Received(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=text(ds, "StudyInstanceUID"),
            series_instance_uid=text(ds, "SeriesInstanceUID"),
            patient_id=text(ds, "PatientID"),
            accession_number=text(ds, "AccessionNumber", 16),
            modality=text(ds, "Modality", 16),
            patient_sex=text(ds, "PatientSex", 16),
            study_date=parse_da(text(ds, "StudyDate")),
            manufacturer=text(ds, "Manufacturer"),
            manufacturer_model_name=text(ds, "ManufacturerModelName"),
            view_position=text(ds, "ViewPosition", 16),
            path=path,
            sha256=digest,
            size=size,
            calling_ae=calling,
            origin=origin,
        )
        decision = self.gate.decide(ds)
        with self.db.session() as s:
            intake = record_received(s, received, decision.reason)
        return None if intake == Intake.DUPLICATE else decision

    def make_ae(self) -> AE:
        node = self.node
        ae = AE(ae_title=node.ae_title)
        ae.network_timeout = ae.acse_timeout = node.network_timeout_seconds
        # The server admits associations itself, exactly and not counting silent connections
        # (guard.py); pynetdicom's own count, which does both, must never be the one that binds.
        ae.maximum_associations = 1 << 20
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.require_calling_aet = node.allowed_calling_aets
        ae.add_supported_context(Verification)
        # Every storage class is accepted (non-radiographs are then skipped, so the PACS does not
        # retry), in every transfer syntax pynetdicom knows: files are stored as sent.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Start listening on ``[node] host`` and ``port``."""
        node = self.node
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            # An association that ended mid-data set leaves pynetdicom's partial file.
            (evt.EVT_CONN_CLOSE, lambda event: drop_partial_dataset(event.assoc)),
        ]
        # pynetdicom's start_server cannot take a server class; make_server can, and the rest
        # is done here as start_server does it (pynetdicom 3.0, ae.py), registration included.
        ae = self.make_ae()
        try:
            server = ae.make_server(
                (node.host, node.port),
                evt_handlers=handlers,
                server_class=GuardedServer,
                ssl_context=server_context(node.tls) if node.tls else None,
            )
        except OSError as e:  # `serve` checked the port; another program took it since
            raise CannotListen(
                f"[node] port = {node.port}: cannot listen on {node.host}:{node.port} "
                f"({e.strerror or e})"
            ) from None
        copy_contexts_cheaply(server)
        server.allowed = tuple(node.allowed_peers)
        server.pdu_deadline = node.network_timeout_seconds
        server.request_deadline = node.association_request_timeout_seconds
        server.max_associations = node.max_associations
        server.max_pending = node.max_pending_connections
        server.max_pdata_length = node.max_pdu_bytes
        server.max_dataset_bytes = node.max_dataset_bytes
        server.on_violation = self._network_violation
        thread = threading.Thread(target=make_target(server.serve_forever), name="xrayage-scp")
        thread.daemon = True
        thread.start()
        register_server(ae, server)
        self.server = server
        log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def problems(self) -> list[str]:
        return [] if self.server is not None else ["DICOM SCP not listening"]
