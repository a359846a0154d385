"""Appending to the audit log. Patient identifiers are kept here (the log is the place staff query
them), never in the application log."""

from __future__ import annotations

from sqlalchemy.orm import Session

from storage.tables import AuditEvent, Instance


def record_event(
    session: Session,
    event: str,
    *,
    outcome: str = "success",
    actor: str = "xrayage",
    instance: Instance | None = None,
    detail: str | None = None,
) -> None:
    session.add(
        AuditEvent(
            event=event,
            outcome=outcome,
            actor=actor,
            sop_instance_uid=instance.sop_instance_uid if instance else None,
            study_instance_uid=instance.study_instance_uid if instance else None,
            patient_id=instance.patient_id if instance else None,
            detail=detail,
        )
    )
