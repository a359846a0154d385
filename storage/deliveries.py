"""Deliveries: what each report object owes each destination, claimed under leases, and the
outcome of each attempt (delivered, retried after a wait, or given up), with the instance's
state following its deliveries.

Deliveries are unique per (object, destination): a report built again after a crash adds no
second one. Every state change goes through :mod:`storage.lifecycle`.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.lifecycle import change_state
from storage.owners import dead_here, pid_alive
from storage.tables import (
    Delivery,
    DeliveryKind,
    DeliveryState,
    Instance,
    InstanceState,
    utcnow,
)
from xrayage.errors import UserError


@dataclass(frozen=True)
class StoredObject:
    """A report object in the file store: what it is, its SOP Instance UID and its path."""

    kind: DeliveryKind
    sop_instance_uid: str
    path: str


def add_deliveries(
    session: Session,
    instance: Instance,
    objects: Iterable[StoredObject],
    destinations: Mapping[str, frozenset[DeliveryKind]],
) -> None:
    """A pending delivery of each object to each destination that takes its kind and has none
    yet."""
    for name, takes in destinations.items():
        for obj in objects:
            if obj.kind not in takes:
                continue
            known = session.scalar(
                select(Delivery.id).where(
                    Delivery.sop_instance_uid == obj.sop_instance_uid,
                    Delivery.destination == name,
                )
            )
            if known is None:
                session.add(
                    Delivery(
                        instance_id=instance.id,
                        destination=name,
                        kind=obj.kind,
                        sop_instance_uid=obj.sop_instance_uid,
                        path=obj.path,
                        state=DeliveryState.PENDING,
                    )
                )


def delivery_counts(session: Session) -> dict[DeliveryState, int]:
    """How many deliveries are in each state."""
    rows = session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
    return dict(rows)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DestinationStatus:
    """One destination as the status page and ``/readyz`` show it: the kinds of object it has
    carried, its deliveries by state, and, while its latest attempts fail, the newest error
    (None: not failing)."""

    name: str
    kinds: list[str]
    counts: dict[str, int]
    failing: str | None


def failing_destinations(session: Session) -> dict[str, str]:
    """The destinations failing now, with their newest error: those with a pending delivery
    whose last attempt failed (retried, not given up). Reads pending deliveries only (the
    state's index), so that ``/readyz`` costs nothing like a scan of every delivery."""
    failing: dict[str, str] = {}
    for name, error in session.execute(
        select(Delivery.destination, Delivery.last_error)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.last_error.is_not(None))
        .order_by(Delivery.id)
    ):
        failing[name] = error  # the newest wins
    return failing


def destination_status(session: Session) -> list[DestinationStatus]:
    """Every destination that has deliveries, by name, with :func:`failing_destinations`."""
    counts: dict[str, dict[str, int]] = {}
    kinds: dict[str, set[str]] = {}
    for name, kind, state, n in session.execute(
        select(Delivery.destination, Delivery.kind, Delivery.state, func.count())
        .group_by(Delivery.destination, Delivery.kind, Delivery.state)
    ):
        by_state = counts.setdefault(name, {})
        by_state[state.value] = by_state.get(state.value, 0) + n
        kinds.setdefault(name, set()).add(kind.value)
    failing = failing_destinations(session)
    return [
        DestinationStatus(n, sorted(kinds[n]), counts[n], failing.get(n)) for n in sorted(counts)
    ]


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


def requeue_orphan_deliveries(
    session: Session, host: str, alive: Callable[[int], bool] = pid_alive
) -> int:
    """Deliveries a dead process of this host had claimed are due now."""
    pending = select(Delivery.owner).where(Delivery.state == DeliveryState.PENDING)
    owners = dead_here(session.scalars(pending), host, alive)
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


class Attempt(enum.Enum):
    """What became of one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    GAVE_UP = "gave up"


@dataclass(frozen=True)
class AttemptOutcome:
    attempt: Attempt
    delivery_id: int
    destination: str
    kind: DeliveryKind
    detail: str  # what was sent where, and the error if any
    wait_seconds: float | None = None  # before the next attempt (RETRY)


def record_attempt(
    session: Session,
    delivery_id: int,
    error: str | None,
    *,
    max_attempts: int,
    backoff: Callable[[int], float],
    final: bool = False,
) -> AttemptOutcome:
    """Record one attempt: ``error`` None is delivered (and the instance ``delivered`` with its
    last delivery); else retried after ``backoff(attempts)`` seconds (audited as
    ``delivery-retry``), or ``failed`` with the instance at ``max_attempts``, or at once where
    the error is ``final`` (no attempt can succeed: the stored file cannot be read)."""
    d = session.get_one(Delivery, delivery_id)
    inst = d.instance
    d.attempts += 1
    d.owner = None
    what = f"{d.kind.value} {d.sop_instance_uid} to {d.destination}"
    if error is None:
        d.delivered_at, d.last_error = utcnow(), None
        change_state(session, d, DeliveryState.DELIVERED, detail=what)
        pending = session.scalar(
            select(Delivery.id)
            .where(Delivery.instance_id == inst.id, Delivery.state != DeliveryState.DELIVERED)
            .limit(1)
        )
        if pending is None and inst.state == InstanceState.REPORTED:
            # audited by the last delivery's event above
            change_state(session, inst, InstanceState.DELIVERED, audit=False)
        return AttemptOutcome(Attempt.DELIVERED, d.id, d.destination, d.kind, what)
    d.last_error = error
    if final or d.attempts >= max_attempts:
        detail = f"{what} after {d.attempts} attempts: {error}"
        change_state(session, d, DeliveryState.FAILED, detail=detail)
        if inst.state != InstanceState.FAILED:  # audited by the delivery's event
            change_state(
                session, inst, InstanceState.FAILED, audit=False,
                reason=f"delivery to {d.destination} failed: {error}",
            )  # fmt: skip
        return AttemptOutcome(Attempt.GAVE_UP, d.id, d.destination, d.kind, detail)
    wait = backoff(d.attempts)
    d.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
    record_event(
        session, "delivery-retry", outcome="failure", instance=inst,
        detail=f"{what}: {error}; attempt {d.attempts}, next in {wait:.0f} s",
    )  # fmt: skip
    return AttemptOutcome(
        Attempt.RETRY, d.id, d.destination, d.kind, f"{what}: {error}", wait
    )


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
