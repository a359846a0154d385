"""The audit log: appending, querying and the retention purge. Patient identifiers are kept here
(the log is the place staff query them), never in the application log.

Event names (``AuditEvent.event``): ``association``, ``received``, ``skipped``, ``queued``,
``inferred``, ``reported``, ``delivered``, ``failed``, ``delivery-retry``, ``retro-scan``,
``node``, ``model``, ``config``, ``audit-query``, ``audit-purge``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from sqlalchemy import delete, desc, func, select
from sqlalchemy.orm import Session

from storage.tables import AuditEvent, ExportCursor, Instance

# Every event the node records, by what happened (README "Audit log"); ``record_event`` takes
# no other, so that ``xrayage audit --event`` can list them all.
EVENTS = (
    "received", "skipped", "queued", "inferred", "reported", "delivered", "failed",
    "delivery-retry", "association", "node", "config", "model", "validation", "retro-scan",
    "export", "audit-query", "audit-purge",
)  # fmt: skip


def record_event(
    session: Session,
    event: str,
    *,
    outcome: str = "success",
    actor: str = "xrayage",
    instance: Instance | None = None,
    detail: str | None = None,
) -> AuditEvent:
    if event not in EVENTS:
        raise ValueError(f"{event!r} is not an audit event (storage.audit.EVENTS)")
    row = AuditEvent(
        event=event,
        outcome=outcome,
        actor=actor,
        sop_instance_uid=instance.sop_instance_uid if instance else None,
        study_instance_uid=instance.study_instance_uid if instance else None,
        patient_id=instance.patient_id if instance else None,
        accession_number=instance.accession_number if instance else None,
        detail=detail,
    )
    session.add(row)
    return row


@dataclass(frozen=True)
class AuditQuery:
    """A filter on the audit log; every field narrows it. ``before_id`` pages backwards: the
    next page of a newest-first listing starts below the last ID shown."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    patient_id: str | None = None
    study: str | None = None
    accession: str | None = None
    event: str | None = None
    outcome: str | None = None
    limit: int = 100
    before_id: int | None = None

    def describe(self) -> str:
        """The filter as it goes into the audit entry that records the query itself."""
        parts = [
            f"{k}={v.isoformat() if isinstance(v, dt.datetime) else v}"
            for k, v in asdict(self).items()
            if v is not None
        ]
        return "audit query: " + " ".join(parts)


def query_events(session: Session, query: AuditQuery) -> list[AuditEvent]:
    """Matching events, newest first, at most ``query.limit``."""
    stmt = select(AuditEvent)
    for column, value in (
        (AuditEvent.patient_id, query.patient_id),
        (AuditEvent.study_instance_uid, query.study),
        (AuditEvent.accession_number, query.accession),
        (AuditEvent.event, query.event),
        (AuditEvent.outcome, query.outcome),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if query.since is not None:
        stmt = stmt.where(AuditEvent.at >= query.since)
    if query.until is not None:
        stmt = stmt.where(AuditEvent.at < query.until)
    if query.before_id is not None:
        stmt = stmt.where(AuditEvent.id < query.before_id)
    return list(session.scalars(stmt.order_by(desc(AuditEvent.id)).limit(query.limit)))


def purge_events(session: Session, before: dt.datetime, actor: str) -> int:
    """Delete events older than ``before`` (the retention purge) and audit the purge itself."""
    count = session.scalar(select(func.count()).where(AuditEvent.at < before)) or 0
    session.execute(delete(AuditEvent).where(AuditEvent.at < before))
    record_event(
        session,
        "audit-purge",
        actor=actor,
        detail=f"deleted {count} audit events older than {before.isoformat()}",
    )
    return int(count)


FIELDS = (
    "id",
    "at",
    "event",
    "outcome",
    "actor",
    "patient_id",
    "study_instance_uid",
    "accession_number",
    "sop_instance_uid",
    "detail",
)


def as_dict(row: AuditEvent) -> dict[str, object]:
    """One event as the CLI and the HTTP API show it (time in UTC, ISO 8601)."""
    out: dict[str, object] = {name: getattr(row, name) for name in FIELDS}
    out["at"] = row.at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return out


def run_query(session: Session, query: AuditQuery, actor: str) -> list[AuditEvent]:
    """``query_events``, with the query itself appended to the log (after, so that it is not
    among its own results)."""
    rows = query_events(session, query)
    record_event(
        session, "audit-query", actor=actor, detail=f"{query.describe()}; {len(rows)} rows"
    )
    return rows


def unexported(session: Session, exporter: str, limit: int) -> list[tuple[AuditEvent, str | None]]:
    """The events ``exporter`` has not sent yet, oldest first, each with its instance's SOP
    class where it names one (what an ATNA message describes)."""
    cursor = session.get(ExportCursor, exporter)
    return [
        (event, sop_class)
        for event, sop_class in session.execute(
            select(AuditEvent, Instance.sop_class_uid)
            .outerjoin(Instance, Instance.sop_instance_uid == AuditEvent.sop_instance_uid)
            .where(AuditEvent.id > (cursor.last_id if cursor else 0))
            .order_by(AuditEvent.id)
            .limit(limit)
        )
    ]


def exported(session: Session, exporter: str, last_id: int) -> None:
    """``exporter`` has sent every event up to ``last_id``."""
    session.merge(ExportCursor(name=exporter, last_id=last_id))
