"""The inference queue: jobs claimed in batches under leases, so a dead worker's jobs come back.

On SQLite (one process) an UPDATE ... RETURNING claims atomically; PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` so several workers never take the same job.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.tables import Delivery, DeliveryState, InstanceState, Job, JobState, utcnow


def _claimable(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_until < now),
    )


def backlog(session: Session) -> tuple[int, dt.datetime | None]:
    """How many jobs a worker could claim now (queued, or running under an expired lease), and
    when the oldest of them was queued."""
    count, oldest = session.execute(
        select(func.count(Job.id), func.min(Job.created_at)).where(_claimable(utcnow()))
    ).one()
    return int(count), oldest


def claim_jobs(session: Session, owner: str, limit: int, lease: dt.timedelta) -> list[Job]:
    now = utcnow()
    pick = select(Job.id).where(_claimable(now)).order_by(Job.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    ids = session.scalars(
        update(Job)
        .where(Job.id.in_(pick.scalar_subquery()))
        .values(
            state=JobState.RUNNING,
            owner=owner,
            lease_until=now + lease,
            attempts=Job.attempts + 1,
        )
        .returning(Job.id)
    ).all()
    if not ids:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid != os.getpid()  # our own PID before we claimed anything: a previous life's


def requeue_orphans(session: Session, host: str, alive: Callable[[int], bool] = pid_alive) -> int:
    """Give back at once the jobs that a dead process on this host held (owner ``host:pid``),
    so that a restart after ``kill -9`` does not wait for their leases to expire. Jobs of other
    hosts, and of PIDs reused by a live process, still come back when their lease expires."""
    orphans = [
        job.id
        for job in session.scalars(
            select(Job).where(Job.state == JobState.RUNNING, Job.owner.startswith(f"{host}:"))
        )
        if not alive(int(job.owner.rpartition(":")[2]))  # type: ignore[union-attr]
    ]
    if orphans:
        session.execute(
            update(Job)
            .where(Job.id.in_(orphans))
            .values(state=JobState.QUEUED, owner=None, lease_until=None)
        )
    return len(orphans)


def claim_deliveries(session: Session, limit: int, lease: dt.timedelta) -> list[Delivery]:
    """Pending deliveries that are due, claimed by moving their next attempt past ``lease``: a
    deliverer that dies mid-send leaves them due again once the lease is over. On PostgreSQL
    ``SKIP LOCKED`` keeps concurrent deliverers off each other's rows."""
    now = utcnow()
    pick = (
        select(Delivery)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    due = list(session.scalars(pick))
    for d in due:
        d.next_attempt_at = now + lease
    return due


class NotRetriable(ValueError):
    """A delivery ID that does not exist or has not failed."""


def failed_deliveries(session: Session) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.FAILED).order_by(Delivery.id)
        )
    )


def retry_deliveries(session: Session, ids: list[int] | None, actor: str) -> list[Delivery]:
    """Queue failed deliveries again (``ids``, or all failed ones for None) with a fresh attempt
    budget, and audit it. The deliverer of a running node picks them up within a second."""
    if ids is None:
        chosen = failed_deliveries(session)
    else:
        chosen = []
        for delivery_id in ids:
            d = session.get(Delivery, delivery_id)
            if d is None:
                raise NotRetriable(f"no delivery with ID {delivery_id}")
            if d.state != DeliveryState.FAILED:
                raise NotRetriable(f"delivery {delivery_id} is {d.state.value}, not failed")
            chosen.append(d)
    for d in chosen:
        d.state, d.attempts, d.next_attempt_at = DeliveryState.PENDING, 0, utcnow()
        if d.instance.state == InstanceState.FAILED:
            d.instance.state, d.instance.reason = InstanceState.REPORTED, None
        record_event(
            session,
            "delivery-retry",
            actor=actor,
            instance=d.instance,
            detail=f"delivery {d.id} ({d.sop_instance_uid} to {d.destination}) queued again; "
            f"last error: {d.last_error}",
        )
    return chosen
