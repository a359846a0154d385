"""Retro-scans in the database: the scan, the studies it found (its cursor), and what is already
done for a model, so that a scan resumes where it stopped and never fetches twice."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.lifecycle import change_state
from storage.queue import pid_alive
from storage.tables import (
    Instance,
    InstanceState,
    Job,
    JobState,
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
    found = []
    for scan in session.scalars(
        select(RetroScan)
        .where(RetroScan.state.in_([ScanState.PAUSED, ScanState.RUNNING]))
        .order_by(RetroScan.id)
    ):
        owner = scan.owner or ""
        if scan.state == ScanState.PAUSED or (
            owner.startswith(f"{host}:") and not alive(int(owner.rpartition(":")[2]))
        ):
            found.append(scan)
    return found


def take_over(session: Session, scan: RetroScan, owner: str, actor: str) -> None:
    scan.state, scan.owner = ScanState.RUNNING, owner
    record_event(
        session, "retro-scan", actor=actor, detail=f"scan {scan.id} resumed: {_span(scan)}"
    )


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
    scan = session.get_one(RetroScan, scan_id)
    scan.state, scan.owner, scan.detail = state, None, why
    if state != ScanState.PAUSED:
        scan.finished_at = utcnow()
    record_event(
        session,
        "retro-scan",
        outcome="success" if ok and state != ScanState.FAILED else "failure",
        actor=actor,
        detail=f"scan {scan.id} {state.value}: {why}; fetched {scan.fetched}, already done "
        f"{scan.already_done}, failed {scan.failed}",
    )
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
    for inst in session.scalars(select(Instance).where(Instance.id.in_(instance_ids))):
        session.add(Job(instance_id=inst.id, state=JobState.QUEUED))
        change_state(
            session, inst, InstanceState.QUEUED, actor=actor,
            detail="retro-scan: queued again from the stored file for the current model",
        )  # fmt: skip
