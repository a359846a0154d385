"""The inference queue: jobs claimed in batches under leases, so a dead worker's jobs come back.

On SQLite (one process) an UPDATE ... RETURNING claims atomically; PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` so several workers never take the same job.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterable

from sqlalchemy import ColumnElement, Select, func, or_, select, update
from sqlalchemy.orm import Session

from storage.lifecycle import change_state
from storage.tables import (
    Delivery,
    DeliveryState,
    InstanceState,
    Job,
    JobState,
    utcnow,
)
from xrayage.errors import UserError


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


def claim_jobs(
    session: Session, owner: str, limit: int, lease: dt.timedelta, max_attempts: int = 3
) -> list[Job]:
    """Claim up to ``limit`` jobs under a lease. A job claimed before and not finished was in a
    batch whose worker died: it is claimed alone, so that one image that kills its worker costs
    no other image an attempt, and jobs at ``max_attempts`` are left to :func:`fail_exhausted`."""
    now = utcnow()
    base = select(Job.id).where(_claimable(now), Job.attempts < max_attempts).order_by(Job.id)
    ids = _claim(session, base.where(Job.attempts > 0).limit(1), owner, now + lease)
    if not ids:
        ids = _claim(session, base.where(Job.attempts == 0).limit(limit), owner, now + lease)
    if not ids:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)))


def _claim(session: Session, pick: Select[tuple[int]], owner: str, until: dt.datetime) -> list[int]:
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    return list(
        session.scalars(
            update(Job)
            .where(Job.id.in_(pick.scalar_subquery()))
            .values(
                state=JobState.RUNNING, owner=owner, lease_until=until, attempts=Job.attempts + 1
            )
            .returning(Job.id)
        ).all()
    )


def fail_exhausted(session: Session, max_attempts: int) -> list[tuple[int, str]]:
    """End, as ``failed``, the jobs whose worker died on them ``max_attempts`` times (the poison
    ceiling: an image that crashes its worker is not claimed for ever); (job ID, reason) each."""
    exhausted = session.scalars(
        select(Job).where(_claimable(utcnow()), Job.attempts >= max_attempts).order_by(Job.id)
    ).all()
    ended = []
    for job in exhausted:
        last = f" (last: {job.error})" if job.error else ""
        reason = f"worker process died {job.attempts} times on this image{last}"
        job.state, job.error, job.lease_until = JobState.FAILED, reason, None
        change_state(session, job.instance, InstanceState.FAILED, reason=reason)
        ended.append((job.id, reason))
    return ended


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid != os.getpid()  # our own PID before we claimed anything: a previous life's


def _dead(owners: Iterable[str | None], host: str, alive: Callable[[int], bool]) -> set[str]:
    """The ``host:pid`` owners among ``owners`` that are dead processes of this host."""
    return {
        owner
        for owner in owners
        if owner is not None
        and owner.startswith(f"{host}:")
        and not alive(int(owner.rpartition(":")[2]))
    }


def requeue_orphans(
    session: Session, host: str, alive: Callable[[int], bool] = pid_alive, *, counted: bool = True
) -> int:
    """Give back at once the jobs that a dead process on this host held (owner ``host:pid``),
    so that a restart after ``kill -9`` does not wait for their leases to expire. Jobs of other
    hosts, and of PIDs reused by a live process, still come back when their lease expires.

    ``counted``: whether that death counts as an attempt on the jobs' images (the poison
    ceiling, :func:`fail_exhausted`). It does where the dead process read the images itself,
    since one of them may have killed it. It does not where the dead process was an inference
    process that ended with its node: its own deaths are counted by its supervisor at once
    (:func:`requeue_owner`), and restarting a node must not fail the images in flight. Three
    ``kill -9`` during a backlog failed one in tests/test_crash.py."""
    running = select(Job.owner).where(Job.state == JobState.RUNNING)
    owners = _dead(session.scalars(running), host, alive)
    return sum(
        requeue_owner(session, owner, f"worker process {owner} died", counted=counted)
        for owner in owners
    )


def requeue_orphan_deliveries(
    session: Session, host: str, alive: Callable[[int], bool] = pid_alive
) -> int:
    """The same for deliveries: those a dead process of this host had claimed are due now."""
    pending = select(Delivery.owner).where(Delivery.state == DeliveryState.PENDING)
    owners = _dead(session.scalars(pending), host, alive)
    if not owners:
        return 0
    return len(
        session.scalars(
            update(Delivery)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.owner.in_(owners))
            .values(next_attempt_at=utcnow(), owner=None)
            .returning(Delivery.id)
        ).all()
    )


def requeue_owner(session: Session, owner: str, cause: str, *, counted: bool = True) -> int:
    """Give back the running jobs of ``owner`` (``host:pid``), a process known to be dead, with
    ``cause`` as their error: what :func:`fail_exhausted` quotes if the image keeps killing it.
    Not ``counted``: the claim's attempt is given back too (:func:`requeue_orphans`)."""
    attempts = Job.attempts if counted else Job.attempts - 1  # a running job was claimed once
    return len(
        session.scalars(
            update(Job)
            .where(Job.state == JobState.RUNNING, Job.owner == owner)
            .values(
                state=JobState.QUEUED, owner=None, lease_until=None, error=cause, attempts=attempts
            )
            .returning(Job.id)
        ).all()
    )


def claim_deliveries(
    session: Session, limit: int, lease: dt.timedelta, owner: str
) -> list[Delivery]:
    """Pending deliveries that are due, claimed for ``owner`` (``host:pid``) by moving their
    next attempt past ``lease``: a deliverer that dies mid-send leaves them due again once the
    lease is over, or at once when its host's next deliverer starts
    (:func:`requeue_orphan_deliveries`). On PostgreSQL ``SKIP LOCKED`` keeps concurrent
    deliverers off each other's rows."""
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
        d.next_attempt_at, d.owner = now + lease, owner
    return due


class NotRetriable(UserError, ValueError):
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
        d.attempts, d.next_attempt_at = 0, utcnow()
        change_state(
            session,
            d,
            DeliveryState.PENDING,
            actor=actor,
            detail=f"delivery {d.id} ({d.sop_instance_uid} to {d.destination}) queued again; "
            f"last error: {d.last_error}",
        )
        if d.instance.state == InstanceState.FAILED:  # audited by the retry above
            change_state(session, d.instance, InstanceState.REPORTED, audit=False)
    return chosen
