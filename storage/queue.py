"""The inference queue: jobs, each naming its model, claimed in batches under leases so that a
dead worker's jobs come back.

An image gets one job per active model: the live model's, which makes its reports and moves the
instance through its states, and one for each shadow model, whose result is stored and never
sent and whose failure fails only that job. A worker claims images, with all their jobs for the
models it holds, so that each image is decoded once for all of them; a shadow model's backfill
of past images (priority 1) waits for received images (priority 0).

On SQLite (one process) an UPDATE ... RETURNING claims atomically; PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` so several workers never take the same job. Every state change goes
through :mod:`storage.lifecycle`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection

from sqlalchemy import ColumnElement, Select, exists, func, or_, select, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.lifecycle import change_state, move_rows
from storage.owners import dead_here, pid_alive
from storage.tables import (
    Instance,
    InstanceState,
    Job,
    JobState,
    Model,
    ModelRole,
    Result,
    utcnow,
)

BACKFILL_PRIORITY = 1
WAITING = (InstanceState.QUEUED, InstanceState.INFERRED)  # for the live model's reports


def _claimable(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        Job.state == JobState.QUEUED,
        (Job.state == JobState.RUNNING) & (Job.lease_until < now),
    )


def _of(models: Collection[str], live: str | None) -> ColumnElement[bool]:
    mine = Job.model_sha256.in_(models)
    return or_(mine, Job.model_sha256.is_(None)) if live in models else mine


def roles(session: Session) -> tuple[str | None, list[str]]:
    """The live model's SHA-256 (None: no model yet) and the shadow models'."""
    rows = session.execute(
        select(Model.sha256, Model.role)
        .where(Model.role.in_((ModelRole.LIVE, ModelRole.SHADOW)))
        .order_by(Model.id)
    ).all()
    live = next((sha for sha, role in rows if role == ModelRole.LIVE), None)
    return live, [sha for sha, role in rows if role == ModelRole.SHADOW]


def is_live(session: Session, model_sha256: str | None) -> bool:
    """Whether a job of this model makes its image's reports now (a job with no model is the
    live model's; with no model registered, every job is)."""
    live, _ = roles(session)
    return live is None or model_sha256 is None or model_sha256 == live


def queue_job(
    session: Session,
    instance: Instance,
    *,
    actor: str = "xrayage",
    detail: str | None = None,
) -> Job:
    """A job for the live model (none yet: whichever model is live when it is claimed) and one
    for each shadow model on ``instance``, which becomes ``queued`` (audited, with
    ``detail``); returns the live model's job."""
    live, shadows = roles(session)
    job = Job(instance_id=instance.id, state=JobState.QUEUED, model_sha256=live)
    session.add(job)
    for sha in shadows:
        session.add(Job(instance_id=instance.id, state=JobState.QUEUED, model_sha256=sha))
    change_state(session, instance, InstanceState.QUEUED, actor=actor, detail=detail)
    return job


def _pending_job(model_sha256: str) -> ColumnElement[bool]:
    """The instance has a job of this model that is queued or running."""
    return exists().where(
        Job.instance_id == Instance.id,
        Job.model_sha256 == model_sha256,
        Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
    )


def queue_backfill(session: Session, model_sha256: str, since: dt.datetime) -> int:
    """Jobs for ``model_sha256`` on the images received since ``since`` that the node analysed
    and that this model has neither a result nor a job for, at the backfill's priority; the
    instances' states are left alone (their reports are the live model's). Returns how many."""
    has_result = exists().where(
        Result.instance_id == Instance.id, Result.model_sha256 == model_sha256
    )
    ids = session.scalars(
        select(Instance.id)
        .where(
            Instance.received_at >= since,
            Instance.state.in_((InstanceState.REPORTED, InstanceState.DELIVERED)),
            ~has_result,
            ~_pending_job(model_sha256),
        )
        .order_by(Instance.id)
    ).all()
    session.add_all(
        Job(instance_id=i, state=JobState.QUEUED, model_sha256=model_sha256,
            priority=BACKFILL_PRIORITY)
        for i in ids
    )  # fmt: skip
    return len(ids)


def backlog(
    session: Session, models: Collection[str] | None = None, live: str | None = None
) -> tuple[int, dt.datetime | None]:
    """How many images a worker holding ``models`` (any: None; ``live`` as in
    :func:`claim_jobs`) could claim now (jobs queued, or running under an expired lease), and
    when the oldest of those jobs was queued."""
    stmt = select(func.count(Job.instance_id.distinct()), func.min(Job.created_at)).where(
        _claimable(utcnow())
    )
    if models is not None:
        stmt = stmt.where(_of(models, live))
    count, oldest = session.execute(stmt).one()
    return int(count), oldest


def adopt_jobs(session: Session) -> int:
    """Hand the queued jobs over to the models' roles as the table has them now (a model this
    process could not load keeps its jobs); returns how many jobs
    changed. Jobs queued while no model was configured are the live model's. A job of a model
    that is no longer active (retired, or weights the config no longer names) is re-pointed at
    the live model where it was to make its image's reports (the image is waiting and has no
    job of the live model), else cancelled. An image still waiting for its reports whose live
    job was done by a model that is live no more (promoted away while it ran) gets a job of
    the live model, which reuses a result that model stored as a shadow."""
    live, shadows = roles(session)
    if live is None:
        return 0
    active = [live, *shadows]
    changed = len(
        session.scalars(
            update(Job)
            .where(Job.state == JobState.QUEUED, Job.model_sha256.is_(None))
            .values(model_sha256=live)
            .returning(Job.id)
        ).all()
    )
    live_job = _pending_job(live)
    stale = session.scalars(
        select(Job)
        .where(Job.state == JobState.QUEUED, Job.model_sha256.not_in(active))
        .order_by(Job.id)
    ).all()
    for job in stale:
        changed += 1
        if job.instance.state in WAITING and not session.scalar(
            select(live_job).where(Instance.id == job.instance_id)
        ):
            job.model_sha256, job.priority = live, 0
            session.flush()
        else:
            change_state(session, job, JobState.CANCELLED, reason="its model was retired")
    waiting = session.scalars(
        select(Instance.id).where(Instance.state.in_(WAITING), ~live_job).order_by(Instance.id)
    ).all()
    session.add_all(Job(instance_id=i, state=JobState.QUEUED, model_sha256=live) for i in waiting)
    return changed + len(waiting)


def claim_jobs(
    session: Session,
    owner: str,
    limit: int,
    lease: dt.timedelta,
    max_attempts: int = 3,
    *,
    models: Collection[str],
    live: str | None = None,
) -> list[Job]:
    """Claim, under a lease, ``limit`` images' worth of the jobs of ``models`` (an image with
    all its jobs of those models, to be decoded once), received images before a backfill's;
    with the ``live`` model among them, the jobs queued while no model was live too. A
    job claimed before and not finished was in a batch whose worker died: it is claimed alone,
    so that one image that kills its worker costs no other image an attempt, and jobs at
    ``max_attempts`` are left to :func:`fail_exhausted`."""
    now = utcnow()
    # An image's jobs are adjacent in this order, so a claim of ``limit`` images' worth of
    # jobs splits at most the last image (its other jobs come with the next claim).
    base = (
        select(Job.id)
        .where(_claimable(now), _of(models, live), Job.attempts < max_attempts)
        .order_by(Job.priority, Job.instance_id, Job.id)
    )
    values = dict(
        owner=owner, lease_until=now + lease, attempts=Job.attempts + 1,
        model_sha256=func.coalesce(Job.model_sha256, live),
    )  # fmt: skip
    ids = _claim(session, base.where(Job.attempts > 0).limit(1), values)
    if not ids:
        ids = _claim(session, base.where(Job.attempts == 0).limit(limit * len(models)), values)
    if not ids:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)))


def _claim(session: Session, pick: Select[tuple[int]], values: dict[str, object]) -> list[int]:
    """One UPDATE: on PostgreSQL its subquery skips the rows another worker is claiming."""
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
    """The job ends ``failed`` with ``reason``, and so does its instance where the job was
    the live model's (audited once, on the instance); a shadow model's failure is its job's
    alone, audited as the model's. ``summary`` is what the application log says instead,
    where the reason may quote header values."""
    job.lease_until = None
    change_state(session, job, JobState.FAILED, reason=reason, summary=summary)
    if is_live(session, job.model_sha256):
        change_state(session, job.instance, InstanceState.FAILED, reason=reason, summary=summary)
    else:
        record_event(
            session, "model", outcome="failure", instance=job.instance,
            detail=f"shadow model {job.model_sha256} failed on this image: {reason}",
        )  # fmt: skip


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
