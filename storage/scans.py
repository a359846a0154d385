"""Retro-scans in the database: the scan, the studies it found (its cursor), and what is already
done for a model, so that a scan resumes where it stopped and never fetches twice."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import desc, func, select, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.lifecycle import change_state
from storage.owners import dead_here, pid_alive
from storage.queue import queue_job
from storage.tables import (
    Instance,
    InstanceState,
    Result,
    RetroScan,
    RetroStudy,
    ScanState,
    utcnow,
)


def open_scan(
    session: Session,
    trigger: str,
    date_from: dt.date,
    date_to: dt.date,
    model_sha256: str,
    owner: str,
) -> RetroScan:
    scan = RetroScan(
        trigger=trigger,
        date_from=date_from,
        date_to=date_to,
        model_sha256=model_sha256,
        state=ScanState.RUNNING,
        owner=owner,
    )
    session.add(scan)
    session.flush()
    record_event(
        session, "retro-scan", actor=trigger, detail=f"scan {scan.id} started: {_span(scan)}"
    )
    return scan


def _span(scan: RetroScan) -> str:
    return f"studies {scan.date_from.isoformat()}..{scan.date_to.isoformat()}"


def resumable_scans(
    session: Session, host: str, alive: Callable[[int], bool] = pid_alive
) -> list[RetroScan]:
    """Paused scans, and scans left running by a dead process on this host, oldest first."""
    scans = list(
        session.scalars(
            select(RetroScan)
            .where(RetroScan.state.in_([ScanState.PAUSED, ScanState.RUNNING]))
            .order_by(RetroScan.id)
        )
    )
    dead = dead_here((scan.owner for scan in scans), host, alive)
    return [scan for scan in scans if scan.state == ScanState.PAUSED or scan.owner in dead]


def take_over(session: Session, scan: RetroScan, owner: str, actor: str) -> None:
    scan.owner = owner
    detail = f"scan {scan.id} resumed: {_span(scan)}"
    change_state(session, scan, ScanState.RUNNING, actor=actor, detail=detail)


def list_studies(session: Session, scan_id: int, studies: list[tuple[str, str | None]]) -> None:
    """Record the studies the archive returned: from now on the scan works down this list."""
    scan = session.get_one(RetroScan, scan_id)
    for uid, date in studies:
        session.add(RetroStudy(scan_id=scan_id, study_instance_uid=uid, study_date=date))
    scan.planned = True


def pending_studies(session: Session, scan_id: int) -> list[RetroStudy]:
    return list(
        session.scalars(
            select(RetroStudy)
            .where(RetroStudy.scan_id == scan_id, RetroStudy.done.is_(False))
            .order_by(RetroStudy.study_date, RetroStudy.id)
        )
    )


def count_retrieved(session: Session, study_id: int, fetched: int, failed: int) -> None:
    """Count one retrieve at once, so a scan paused mid-study still shows what it fetched."""
    study = session.get_one(RetroStudy, study_id)
    study.fetched += fetched
    study.failed += failed
    _add_to_scan(session, study.scan_id, fetched=fetched, failed=failed)


def _add_to_scan(session: Session, scan_id: int, **counts: int) -> None:
    """Add to a scan's totals in SQL: its studies are fetched by several threads (or hosts) at
    once, and a read-add-write in Python would lose the counts of a concurrent one."""
    columns = {name: getattr(RetroScan, name) + n for name, n in counts.items()}
    session.execute(update(RetroScan).where(RetroScan.id == scan_id).values(**columns))


def study_done(session: Session, study_id: int, already_done: int, detail: str | None) -> None:
    """``already_done``: what the archive's study holds that needed no fetch; instances this
    scan fetched before a pause are found done on resuming, and are not counted again."""
    study = session.get_one(RetroStudy, study_id)
    study.done, study.detail = True, detail
    study.already_done = max(0, already_done - study.fetched)
    _add_to_scan(session, study.scan_id, already_done=study.already_done)


def close_scan(
    session: Session, scan_id: int, state: ScanState, why: str, actor: str, ok: bool = True
) -> RetroScan:
    """End a run of the scan: ``paused`` (resumable), ``finished`` or ``failed``; audited with
    its counts, as a failure where ``ok`` is False (an archive that stopped answering)."""
    scan = session.get_one(RetroScan, scan_id)
    scan.owner, scan.detail = None, why
    if state != ScanState.PAUSED:
        scan.finished_at = utcnow()
    detail = (
        f"scan {scan.id} {state.value}: {why}; fetched {scan.fetched}, already done "
        f"{scan.already_done}, failed {scan.failed}"
    )
    change_state(session, scan, state, actor=actor, detail=detail, audit=ok)
    if not ok:  # the pause is the archive's failure
        record_event(session, "retro-scan", outcome="failure", actor=actor, detail=detail)
    return scan


def study_known(session: Session, study_uid: str) -> bool:
    """Whether any instance of the study is in the node (an indexed look-up)."""
    found = session.scalars(
        select(Instance.id).where(Instance.study_instance_uid == study_uid).limit(1)
    ).first()
    return found is not None


def triage(
    session: Session, sop_uids: list[str], model_sha256: str
) -> tuple[list[str], int, list[Instance]]:
    """Split an archive's instances into those to fetch, those needing nothing, and those to run
    again from the store.

    Returns (to fetch, already done, to queue again): an instance reported by this model, in
    progress, skipped by the gate or failed is done; one reported by another model is still in
    the store, so it is queued again from its file (:func:`requeue`) rather than fetched.
    """
    known = {
        inst.sop_instance_uid: inst
        for inst in session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids)))
    }
    reported = set(
        session.scalars(
            select(Instance.sop_instance_uid)
            .join(Result)
            .where(Instance.sop_instance_uid.in_(sop_uids), Result.model_sha256 == model_sha256)
        )
    )
    fetch, done, again = [], 0, []
    for uid in sop_uids:
        inst = known.get(uid)
        if inst is None:
            fetch.append(uid)
        elif uid in reported or inst.state not in (InstanceState.REPORTED, InstanceState.DELIVERED):
            done += 1
        else:
            again.append(inst)
    return fetch, done, again


def requeue(session: Session, instance_ids: list[int], actor: str) -> None:
    """Queue again, for the live model (and the shadows), instances another model reported
    (from their files)."""
    for inst in session.scalars(select(Instance).where(Instance.id.in_(instance_ids))):
        queue_job(
            session, inst, actor=actor,
            detail="retro-scan: queued again from the stored file for the current model",
        )  # fmt: skip


@dataclass(frozen=True)
class ScanProgress:
    scan: RetroScan
    studies: int
    studies_done: int


def latest_scan(session: Session) -> ScanProgress | None:
    """The newest scan with how many of its studies are done (the metrics)."""
    scan = session.scalar(select(RetroScan).order_by(desc(RetroScan.id)).limit(1))
    if scan is None:
        return None
    total, done = session.execute(
        select(func.count(), func.count().filter(RetroStudy.done)).where(
            RetroStudy.scan_id == scan.id
        )
    ).one()
    return ScanProgress(scan, total, done)
