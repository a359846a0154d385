"""Export of the audit log as IHE ATNA / DICOM audit messages over syslog.

Each event becomes an Audit Trail Message (DICOM PS3.15 A.5, the RFC 3881 schema as DICOM
extends it) in the MSG of an RFC 5424 syslog message: PRI <85> (facility 10 security/
authorization, severity 5 notice), MSGID ``DICOM+RFC3881``, no structured data. Transports:
TLS (RFC 5425, PS3.15 A.6) and TCP with octet counting (RFC 6587), or UDP (RFC 5426, A.7).

The exporter reads the audit table after the last event it sent (its cursor is in the
database), so a collector that is away gets everything once it is back, and a restart neither
loses nor resends more than the message in flight (at least once, as syslog allows).
"""

from __future__ import annotations

import os
import select as io_select
import socket
import ssl
import xml.etree.ElementTree as ET

from node.components import WorkerThread
from node.config import SyslogSection
from node.dicom.tls import client_context
from storage import AuditEvent, Database
from storage.audit import exported, unexported

PRI = 10 * 8 + 5
MSGID = "DICOM+RFC3881"
BATCH = 500

# event -> (EventID code and meaning, EventActionCode), PS3.15 A.5.3 / PS3.16 CID 400.
EVENT_IDS: dict[str, tuple[str, str, str]] = {
    "association": ("110114", "User Authentication", "E"),
    "received": ("110104", "DICOM Instances Transferred", "C"),
    "delivered": ("110104", "DICOM Instances Transferred", "R"),
    "skipped": ("110103", "DICOM Instances Accessed", "U"),
    "queued": ("110103", "DICOM Instances Accessed", "U"),
    "inferred": ("110103", "DICOM Instances Accessed", "R"),
    "reported": ("110103", "DICOM Instances Accessed", "C"),
    "failed": ("110103", "DICOM Instances Accessed", "U"),
    "delivery-retry": ("110103", "DICOM Instances Accessed", "U"),
    "retro-scan": ("110112", "Query", "E"),
    "audit-query": ("110101", "Audit Log Used", "R"),
    "audit-purge": ("110101", "Audit Log Used", "D"),
    "export": ("110106", "Export", "R"),
    "node": ("110100", "Application Activity", "E"),
    "config": ("110113", "Security Alert", "E"),
    "model": ("110113", "Security Alert", "E"),
}
EVENT_TYPES = {  # EventTypeCode where the EventID needs one (CID 401, 402, 403)
    "association": ("110122", "Login"),
    "config": ("110131", "Software Configuration"),
    "model": ("110131", "Software Configuration"),
}


def _code(parent: ET.Element, tag: str, code: str, scheme: str, meaning: str) -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": scheme, "originalText": meaning}
    )


def _participant(
    root: ET.Element, object_id: str, type_code: str, role: str, id_type: tuple[str, str, str]
) -> ET.Element:
    """A ParticipantObjectIdentification (PS3.15 A.5.2): type, role and ID type codes."""
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code,
         "ParticipantObjectTypeCodeRole": role},
    )  # fmt: skip
    _code(element, "ParticipantObjectIDTypeCode", *id_type)
    return element


def audit_message(
    event: AuditEvent, source_id: str, node_ae: str, sop_class_uid: str | None = None
) -> str:
    """The DICOM audit message (PS3.15 A.5.1) for one audit-log event; ``sop_class_uid``: the
    class of its instance, which the instance's description requires (A.5.3 SOPClass UID)."""
    code, meaning, action = EVENT_IDS.get(event.event, ("110100", "Application Activity", "E"))
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": event.at.isoformat().replace("+00:00", "Z"),
            # 0 success, 4 minor failure (the node answered with an error and went on)
            "EventOutcomeIndicator": "0" if event.outcome == "success" else "4",
        },
    )
    _code(ident, "EventID", code, "DCM", meaning)
    if event.event in EVENT_TYPES:
        _code(
            ident,
            "EventTypeCode",
            *EVENT_TYPES[event.event][:1],
            "DCM",
            EVENT_TYPES[event.event][1],
        )
    if event.detail:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.detail
    if event.actor != "xrayage":  # a peer AE title, cli:<user>, api:<token name>, schedule
        ET.SubElement(root, "ActiveParticipant", {"UserID": event.actor, "UserIsRequestor": "true"})
    node = ET.SubElement(
        root,
        "ActiveParticipant",
        {
            "UserID": node_ae,
            "AlternativeUserID": str(os.getpid()),
            "UserIsRequestor": "false" if event.actor != "xrayage" else "true",
            "NetworkAccessPointID": socket.gethostname(),
            "NetworkAccessPointTypeCode": "1",
        },
    )
    _code(node, "RoleIDCode", "110153" if event.event == "delivered" else "110152", "DCM",
          "Source Role ID" if event.event == "delivered" else "Destination Role ID")  # fmt: skip
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server
    if event.patient_id:
        _participant(root, event.patient_id, "1", "1", ("2", "RFC-3881", "Patient Number"))
    if event.study_instance_uid:
        study = _participant(
            root, event.study_instance_uid, "2", "3", ("110180", "DCM", "Study Instance UID")
        )
        if event.sop_instance_uid and sop_class_uid:
            described = ET.SubElement(study, "ParticipantObjectDescription")
            sop = ET.SubElement(
                described, "SOPClass", {"UID": sop_class_uid, "NumberOfInstances": "1"}
            )
            ET.SubElement(sop, "Instance", {"UID": event.sop_instance_uid})
    return ET.tostring(root, encoding="unicode")


def syslog_frame(message: str, at: str, app: str = "xrayage") -> bytes:
    """An RFC 5424 SYSLOG-MSG: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG``."""
    host = socket.gethostname()[:255] or "-"
    return f"<{PRI}>1 {at} {host} {app} {os.getpid()} {MSGID} - {message}".encode()


class SyslogExporter(WorkerThread):
    idle_seconds = 2.0

    def __init__(self, config: SyslogSection, db: Database, node_ae: str) -> None:
        super().__init__("xrayage-atna")
        self.config = config
        self.db = db
        self.node_ae = node_ae
        self.source_id = f"xrayage@{socket.gethostname()}"
        self.tls = (
            client_context(config.tls, config.host) if config.transport == "tls" and config.tls
            else None
        )  # fmt: skip
        if config.transport == "tls" and self.tls is None:
            self.tls = (ssl.create_default_context(), config.host)
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.config.transport == "udp":
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock = socket.create_connection((self.config.host, self.config.port), timeout=10)
        if self.tls is not None:
            ctx, name = self.tls
            sock = ctx.wrap_socket(sock, server_hostname=name)
        return sock

    def _peer_closed(self) -> bool:
        """A collector that closed the connection makes the next send vanish into the kernel's
        buffer; look first. A syslog collector sends nothing, so a readable socket is closed,
        unless all it had was TLS housekeeping (session tickets)."""
        sock = self._sock
        if sock is None or self.config.transport == "udp":
            return False
        if not io_select.select([sock], [], [], 0)[0]:
            return False
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return sock.recv(1) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)

    def _send(self, frame: bytes) -> None:
        if self._sock is None or self._peer_closed():
            self.close()
            self._sock = self._connect()
        if self.config.transport == "udp":
            self._sock.sendto(frame, (self.config.host, self.config.port))
        else:  # octet counting, RFC 5425 4.3 / RFC 6587 3.4.1
            self._sock.sendall(str(len(frame)).encode() + b" " + frame)

    def run_once(self) -> int:
        with self.db.session() as s:
            events = unexported(s, "syslog", BATCH)
        sent = 0
        try:
            for event, sop_class in events:
                at = event.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                message = audit_message(event, self.source_id, self.node_ae, sop_class)
                self._send(syslog_frame(message, at))
                sent = event.id
        except OSError as e:
            self.log.warning("audit collector %s:%d: %s", self.config.host, self.config.port, e)
            self.close()
        if sent:
            with self.db.session() as s:
                exported(s, "syslog", sent)
        return len(events) if events and sent == events[-1][0].id else 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stop(self) -> None:
        self.stopping.set()
        self.close()  # a send blocked on a collector that stopped reading ends now
        super().stop()
        self.close()
