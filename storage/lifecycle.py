"""The lifecycle of an instance and of a delivery: one transition table each, and
:func:`change_state`, the one function through which every state change goes.

It checks the move against the table, writes the audit event and counts the move
(``xrayage_state_changes_total``); an illegal move raises :class:`IllegalTransition`, a bug of
the node's, never a job failure. It adds no commit of its own: the caller's transaction holds
the change and its audit event together (receiving and gating stay one commit per C-STORE).

The instance table is the state diagram of the README ("What happens to an image");
``tests/test_lifecycle.py`` holds one to the other.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.tables import Delivery, DeliveryState, Instance, InstanceState

log = logging.getLogger("xrayage.lifecycle")
I = InstanceState  # noqa: E741 - the table reads as the diagram
D = DeliveryState

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

DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    D.PENDING: frozenset({D.DELIVERED, D.FAILED}),
    D.FAILED: frozenset({D.PENDING}),  # `xrayage retry`
    D.DELIVERED: frozenset(),
}

STATE_CHANGES = Counter(
    "xrayage_state_changes",
    "State changes recorded by this process, by table and target state",
    ["table", "state"],
    registry=None,
)

# The audit event of each target state (AuditEvent.event).
_INSTANCE_EVENTS = {s: s.value for s in InstanceState}
_DELIVERY_EVENTS = {D.DELIVERED: "delivered", D.FAILED: "failed", D.PENDING: "delivery-retry"}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the node, reported loudly."""


def change_state(
    session: Session,
    row: Instance | Delivery,
    to: InstanceState | DeliveryState,
    *,
    reason: str | None = None,
    detail: str | None = None,
    actor: str = "xrayage",
    audit: bool = True,
    summary: str | None = None,
) -> None:
    """Move ``row`` to ``to``, audited (``detail``, else ``reason``) unless ``audit`` is False,
    which only a change caused by another one, audited in the same transaction, may ask for (an
    instance becoming ``delivered`` with its last delivery). An instance's ``reason`` is set
    with the state (None clears it). One line goes to the application log, UIDs only: with
    ``summary`` instead of the reason where that may quote header values (a patient's name)."""
    if isinstance(row, Instance):
        table, allowed, events = "instances", INSTANCE_TRANSITIONS, _INSTANCE_EVENTS
        instance = row
    else:
        table, allowed, events = "deliveries", DELIVERY_TRANSITIONS, _DELIVERY_EVENTS
        instance = row.instance
    frm = row.state
    if to not in allowed[frm]:  # type: ignore[index]
        raise IllegalTransition(
            f"{table} row {row.id}: {frm.value} -> {to.value} is not a transition of the lifecycle"
        )
    row.state = to  # type: ignore[assignment]
    if isinstance(row, Instance):
        row.reason = reason
    STATE_CHANGES.labels(table, to.value).inc()
    said = summary if summary is not None else detail if detail is not None else reason
    what = (
        instance.sop_instance_uid
        if isinstance(row, Instance)
        else f"{row.sop_instance_uid} to {row.destination}"
    )
    said = (said or "").removeprefix(what).strip()  # a delivery's detail starts with it
    level = logging.WARNING if to in (I.FAILED, D.FAILED) else logging.INFO
    log.log(level, "%s %s%s", what, to.value, f": {said}" if said else "")
    if audit:
        failed = to in (I.FAILED, D.FAILED)
        record_event(
            session,
            events[to],  # type: ignore[index]
            outcome="failure" if failed else "success",
            actor=actor,
            instance=instance,
            detail=detail if detail is not None else reason,
        )
