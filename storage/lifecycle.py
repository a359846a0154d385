"""The lifecycles of instances, jobs, deliveries and retro-scans: one transition table each, and
the two functions through which every state change goes, :func:`change_state` (one row) and
:func:`move_rows` (a set of rows in one UPDATE: claims, and what a dead process held).

Each checks the move against the table, counts it (``xrayage_state_changes_total``) and, where
a person would ask about it, writes the audit event; an illegal move raises
:class:`IllegalTransition`, a bug of the node's, never a job failure. Neither commits: the
caller's transaction holds the change and its audit event together (receiving and gating stay
one commit per C-STORE).

The instance table is the state diagram of the README ("What happens to an image");
``tests/test_lifecycle.py`` holds one to the other.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.tables import (
    Base,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Job,
    JobState,
    Model,
    ModelRole,
    RetroScan,
    ScanState,
)

log = logging.getLogger("xrayage.lifecycle")
I = InstanceState  # noqa: E741 - the tables read as the diagrams
J = JobState
M = ModelRole
D = DeliveryState
S = ScanState

INSTANCE_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    # the gate, in the C-STORE's transaction
    I.RECEIVED: frozenset({I.SKIPPED, I.QUEUED, I.FAILED}),
    # the model's output committed (results row) before any report is built
    I.QUEUED: frozenset({I.INFERRED, I.FAILED}),
    I.INFERRED: frozenset({I.REPORTED, I.FAILED}),
    # every delivery done; or one gave up; or a retro-scan queues it again for a new model
    I.REPORTED: frozenset({I.DELIVERED, I.FAILED, I.QUEUED}),
    I.DELIVERED: frozenset({I.QUEUED}),
    # `xrayage retry` of a failed delivery; a retro-scan for a new model
    I.FAILED: frozenset({I.REPORTED, I.QUEUED}),
    I.SKIPPED: frozenset(),
}

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # claimed under a lease; or ended at the poison ceiling, given back by a dead worker
    J.QUEUED: frozenset({J.RUNNING, J.FAILED, J.CANCELLED}),
    # running -> running: claimed again by another worker once the lease expired; -> queued:
    # given back when its worker died (a supervisor, or a restart on the same host)
    J.RUNNING: frozenset({J.RUNNING, J.QUEUED, J.DONE, J.FAILED}),
    J.DONE: frozenset(),  # a retro-scan for another model makes a new job
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),  # a model retired before it ran: its queued jobs end here
}

MODEL_TRANSITIONS: dict[ModelRole, frozenset[ModelRole]] = {
    # `xrayage model promote` (or [model] weights naming other weights) makes another model
    # live: the live one is retired; `model retire`; `model add --shadow` of a retired model
    M.LIVE: frozenset({M.RETIRED}),
    M.SHADOW: frozenset({M.LIVE, M.RETIRED}),
    M.RETIRED: frozenset({M.LIVE, M.SHADOW}),
}

DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    D.PENDING: frozenset({D.DELIVERED, D.FAILED}),
    D.FAILED: frozenset({D.PENDING}),  # `xrayage retry`
    D.DELIVERED: frozenset(),
}

SCAN_TRANSITIONS: dict[ScanState, frozenset[ScanState]] = {
    # running -> running: taken over from a dead process of this host
    S.RUNNING: frozenset({S.RUNNING, S.PAUSED, S.FINISHED, S.FAILED}),
    S.PAUSED: frozenset({S.RUNNING}),  # resumed (next night, or `xrayage rescan --resume`)
    S.FINISHED: frozenset(),
    S.FAILED: frozenset(),
}


@dataclass(frozen=True)
class Lifecycle:
    """A kind of row's states: the table's name (a metric label), its transitions, and the
    audit event of each target state (None: not audited, the instance's own event says it)."""

    table: str
    transitions: dict[Any, frozenset[Any]]
    events: dict[Any, str | None]
    failed: enum.Enum | None
    column: str = "state"  # a model's state is its role


LIFECYCLES: dict[type[Base], Lifecycle] = {
    Instance: Lifecycle("instances", INSTANCE_TRANSITIONS, {s: s.value for s in I}, I.FAILED),
    Delivery: Lifecycle(
        "deliveries",
        DELIVERY_TRANSITIONS,
        {D.DELIVERED: "delivered", D.FAILED: "failed", D.PENDING: "delivery-retry"},
        D.FAILED,
    ),
    # A job's outcome is its instance's (inferred, reported, failed: audited there); a worker's
    # death is audited by its supervisor.
    Job: Lifecycle("jobs", JOB_TRANSITIONS, dict.fromkeys(J), J.FAILED),
    RetroScan: Lifecycle("retro_scans", SCAN_TRANSITIONS, dict.fromkeys(S, "retro-scan"), S.FAILED),
    Model: Lifecycle("models", MODEL_TRANSITIONS, dict.fromkeys(M, "model"), None, "role"),
}

STATE_CHANGES = Counter(
    "xrayage_state_changes",
    "State changes recorded by this process, by table and target state",
    ["table", "state"],
    registry=None,
)


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the node, reported loudly."""


def _check(cycle: Lifecycle, row_id: object, frm: enum.Enum, to: enum.Enum) -> None:
    if to not in cycle.transitions[frm]:
        raise IllegalTransition(
            f"{cycle.table} row {row_id}: {frm.value} -> {to.value} is not a transition of the "
            "lifecycle"
        )


def change_state(
    session: Session,
    row: Instance | Job | Delivery | RetroScan | Model,
    to: enum.Enum,
    *,
    reason: str | None = None,
    detail: str | None = None,
    actor: str = "xrayage",
    audit: bool = True,
    summary: str | None = None,
) -> None:
    """Move ``row`` to ``to``, audited (``detail``, else ``reason``) where its table audits that
    state, unless ``audit`` is False, which only a change caused by another one, audited in the
    same transaction, may ask for (an instance becoming ``delivered`` with its last delivery).
    An instance's ``reason`` and a job's ``error`` are set with the state (None clears an
    instance's). One line goes to the application log, UIDs only: with ``summary`` instead of
    the reason where that may quote header values (a patient's name)."""
    cycle = LIFECYCLES[type(row)]
    _check(cycle, row.id, getattr(row, cycle.column), to)
    setattr(row, cycle.column, to)
    if isinstance(row, Instance):
        row.reason = reason
    elif isinstance(row, Job) and reason is not None:
        row.error = reason
    STATE_CHANGES.labels(cycle.table, to.value).inc()
    instance = (
        row
        if isinstance(row, Instance)
        else None
        if isinstance(row, RetroScan | Model)
        else row.instance
    )
    what = _name(row)
    said = summary if summary is not None else detail if detail is not None else reason
    said = (said or "").removeprefix(what).strip()  # a delivery's detail starts with it
    event = cycle.events[to]
    # A change that is not audited is told by another one's line (a job's by its instance's).
    level = logging.WARNING if to == cycle.failed else logging.INFO
    if event is None:
        level = logging.DEBUG
    log.log(level, "%s %s%s", what, to.value, f": {said}" if said else "")
    if audit and event is not None:
        record_event(
            session,
            event,
            outcome="failure" if to == cycle.failed else "success",
            actor=actor,
            instance=instance,
            detail=detail if detail is not None else reason,
        )


def _name(row: Instance | Job | Delivery | RetroScan | Model) -> str:
    if isinstance(row, Instance):
        return row.sop_instance_uid
    if isinstance(row, Delivery):
        return f"{row.sop_instance_uid} to {row.destination}"
    if isinstance(row, Job):
        return f"job {row.id} ({row.instance.sop_instance_uid})"
    if isinstance(row, Model):
        return f"model {row.name} {row.version}"
    return f"retro-scan {row.id}"


def move_rows(
    session: Session,
    kind: type[Job] | type[Delivery],
    where: ColumnElement[bool],
    to: enum.Enum,
    **values: object,
) -> list[int]:
    """Move every row of ``kind`` that ``where`` selects, and whose state may move to ``to``, in
    one UPDATE (atomic: two workers never claim the same job), setting ``values`` too; returns
    their IDs. Rows in a state the table does not allow to move to ``to`` are left as they are.
    Not audited: claims are not events a person asks about, and what a dead process held is
    audited with its death."""
    cycle = LIFECYCLES[kind]
    sources = [s for s, targets in cycle.transitions.items() if to in targets]
    ids = list(
        session.scalars(
            update(kind)
            .where(where, kind.state.in_(sources))
            .values(state=to, **values)
            .returning(kind.id)
        ).all()
    )
    if ids:
        STATE_CHANGES.labels(cycle.table, to.value).inc(len(ids))
    return ids
