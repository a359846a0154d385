"""The inference queue: jobs, each naming its model, claimed in batches under leases so that a
dead worker's jobs come back.

On SQLite (one process) an UPDATE ... RETURNING claims atomically; PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` so several workers never take the same job. Every state change goes
through :mod:`storage.lifecycle`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import ColumnElement, Select, func, or_, select, update
from sqlalchemy.orm import Session

from storage.lifecycle import change_state, move_rows
from storage.owners import dead_here, pid_alive
from storage.tables import Instance, InstanceState, Job, JobState, utcnow


def _claimable(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_until < now),
    )


def _for_model(model_sha256: str) -> ColumnElement[bool]:
    return or_(Job.model_sha256 == model_sha256, Job.model_sha256.is_(None))


def queue_job(
    session: Session,
    instance: Instance,
    model_sha256: str | None,
    *,
    actor: str = "xrayage",
    detail: str | None = None,
) -> Job:
    """A job for ``model_sha256`` (None: whichever model claims it first) on ``instance``,
    which becomes ``queued`` (audited, with ``detail``)."""
    job = Job(instance_id=instance.id, state=JobState.QUEUED, model_sha256=model_sha256)
    session.add(job)
    change_state(session, instance, InstanceState.QUEUED, actor=actor, detail=detail)
    return job


def backlog(session: Session, model_sha256: str | None = None) -> tuple[int, dt.datetime | None]:
    """How many jobs this model's worker (any model's: None) could claim now (queued, or
    running under an expired lease), and when the oldest of them was queued."""
    stmt = select(func.count(Job.id), func.min(Job.created_at)).where(_claimable(utcnow()))
    if model_sha256 is not None:
        stmt = stmt.where(_for_model(model_sha256))
    count, oldest = session.execute(stmt).one()
    return int(count), oldest


def adopt_jobs(session: Session, model_sha256: str) -> int:
    """Point the queued jobs of other models at this one: the node runs one model, and jobs
    queued before its weights changed are analysed by the new weights, as they always were."""
    return len(
        session.scalars(
            update(Job)
            .where(Job.state == JobState.QUEUED, Job.model_sha256 != model_sha256)
            .values(model_sha256=model_sha256)
            .returning(Job.id)
        ).all()
    )


def claim_jobs(
    session: Session,
    owner: str,
    limit: int,
    lease: dt.timedelta,
    max_attempts: int = 3,
    *,
    model_sha256: str,
) -> list[Job]:
    """Claim up to ``limit`` of this model's jobs under a lease. A job claimed before and not
    finished was in a batch whose worker died: it is claimed alone, so that one image that
    kills its worker costs no other image an attempt, and jobs at ``max_attempts`` are left to
    :func:`fail_exhausted`."""
    now = utcnow()
    base = (
        select(Job.id)
        .where(_claimable(now), _for_model(model_sha256), Job.attempts < max_attempts)
        .order_by(Job.id)
    )
    values = dict(
        owner=owner, lease_until=now + lease, attempts=Job.attempts + 1, model_sha256=model_sha256
    )
    ids = _claim(session, base.where(Job.attempts > 0).limit(1), values)
    if not ids:
        ids = _claim(session, base.where(Job.attempts == 0).limit(limit), values)
    if not ids:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)))


def _claim(session: Session, pick: Select[tuple[int]], values: dict[str, object]) -> list[int]:
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    return move_rows(session, Job, Job.id.in_(pick.scalar_subquery()), JobState.RUNNING, **values)


def held_job(session: Session, job_id: int, owner: str) -> Job | None:
    """The job, locked, if ``owner`` still holds it: a worker that overran its lease has lost
    the job to another and must not record a second outcome."""
    job = session.get_one(Job, job_id, with_for_update=True)
    return job if job.state == JobState.RUNNING and job.owner == owner else None


def finish_job(session: Session, job: Job) -> None:
    """The job's reports are made: it is ``done``."""
    job.lease_until = None
    change_state(session, job, JobState.DONE)


def fail_job(session: Session, job: Job, reason: str, summary: str | None = None) -> None:
    """The job and its instance end ``failed`` with ``reason`` (audited once, on the
    instance); ``summary`` is what the application log says instead, where the reason may
    quote header values."""
    job.lease_until = None
    change_state(session, job, JobState.FAILED, reason=reason, summary=summary)
    change_state(session, job.instance, InstanceState.FAILED, reason=reason, summary=summary)


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
        fail_job(session, job, reason)
        ended.append((job.id, reason))
    return ended


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
    owners = dead_here(session.scalars(running), host, alive)
    return sum(
        requeue_owner(session, owner, f"worker process {owner} died", counted=counted)
        for owner in owners
    )


def requeue_owner(session: Session, owner: str, cause: str, *, counted: bool = True) -> int:
    """Give back the running jobs of ``owner`` (``host:pid``), a process known to be dead, with
    ``cause`` as their error: what :func:`fail_exhausted` quotes if the image keeps killing it.
    Not ``counted``: the claim's attempt is given back too (:func:`requeue_orphans`)."""
    attempts = Job.attempts if counted else Job.attempts - 1  # a running job was claimed once
    held = (Job.state == JobState.RUNNING) & (Job.owner == owner)
    given = dict(owner=None, lease_until=None, error=cause, attempts=attempts)
    return len(move_rows(session, Job, held, JobState.QUEUED, **given))
