"""Recording a received instance: its row, its gate decision and its job, in the C-STORE's one
transaction (durable before Success: the caller commits, then answers)."""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.lifecycle import change_state
from storage.queue import queue_job
from storage.tables import Instance, InstanceState

log = logging.getLogger("xrayage.receive")


@dataclass(frozen=True)
class Received:
    """What the receiver read of one stored instance (header values cut to their columns)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    patient_id: str | None
    accession_number: str | None
    modality: str | None
    patient_sex: str | None
    study_date: dt.date | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    view_position: str | None
    path: str
    sha256: str
    size: int
    calling_ae: str
    origin: str  # "push" or "retro"


class Intake(enum.Enum):
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"
    QUEUED = "queued"


def record_received(session: Session, received: Received, skip_reason: str | None) -> Intake:
    """The instance ``received``, then ``skipped`` with ``skip_reason`` or ``queued`` with a job
    for each active model (:func:`storage.queue.queue_job`); each audited. The same SOP
    Instance UID again (with the same bytes: the file store checked) is a duplicate: audited,
    no new row, no new job."""
    existing = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == received.sop_instance_uid)
    )
    if existing is not None:
        log.info(
            "%s received again from %s: a duplicate, no new job",
            received.sop_instance_uid, received.calling_ae,
        )  # fmt: skip
        record_event(
            session, "received", actor=received.calling_ae, instance=existing,
            detail="duplicate of an instance already stored",
        )  # fmt: skip
        return Intake.DUPLICATE
    inst = Instance(**asdict(received), state=InstanceState.RECEIVED)
    session.add(inst)
    session.flush()
    log.info("%s received from %s (%s)", inst.sop_instance_uid, inst.calling_ae, inst.origin)
    record_event(
        session, "received", actor=received.calling_ae, instance=inst,
        detail="retro-scan" if received.origin == "retro" else None,
    )  # fmt: skip
    if skip_reason is not None:
        change_state(session, inst, InstanceState.SKIPPED, reason=skip_reason)
        return Intake.SKIPPED
    queue_job(session, inst)
    return Intake.QUEUED
