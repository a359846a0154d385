"""Delivery of report objects to the configured destinations, by C-STORE or STOW-RS, with
retries.

A failed attempt is recorded and retried after a random wait between half the initial delay and
an exponential ceiling (``retry_initial_seconds * 2**(attempts - 1)``, capped at
``retry_max_seconds``), so that many deliveries failing together do not retry together; after
``max_attempts`` the delivery is ``failed`` with its last error and the instance too.

Deliveries are claimed under a lease (:func:`storage.queue.claim_deliveries`), so several
deliverer processes can share one PostgreSQL database without sending an object twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import time
from itertools import groupby
from pathlib import Path

from sqlalchemy import select

from node.components import Signal, WorkerThread
from node.config import DeliverySection, Destination
from node.delivery.sender import Sender, sender_for
from node.metrics import DELIVERED, DELIVERY_FAILURES, STAGE_SECONDS
from storage import Database, Delivery, DeliveryState, Instance, InstanceState, record_event
from storage.lifecycle import change_state
from storage.queue import claim_deliveries, requeue_orphan_deliveries
from storage.tables import utcnow

log = logging.getLogger("xrayage.deliver")


def backoff_seconds(attempts: int, policy: DeliverySection, rng: random.Random) -> float:
    ceiling = min(policy.retry_max_seconds, policy.retry_initial_seconds * 2 ** (attempts - 1))
    return rng.uniform(
        policy.retry_initial_seconds / 2, max(ceiling, policy.retry_initial_seconds / 2)
    )


class Deliverer(WorkerThread):
    """Sends what is due to each destination (one :class:`Sender` per destination, from
    ``ae_title`` for C-STORE) and records the outcome under ``policy``."""

    def __init__(
        self,
        destinations: list[Destination],
        policy: DeliverySection,
        ae_title: str,
        db: Database,
        wake: Signal | None = None,
    ) -> None:
        super().__init__("xrayage-deliver", wake)
        self.policy = policy
        self.db = db
        self.rng = random.Random()
        self.senders: dict[str, Sender] = {
            d.name: sender_for(d, ae_title, policy.timeout_seconds) for d in destinations
        }
        # A claim holds a delivery this long: past it, another deliverer may send it again.
        self.lease = dt.timedelta(seconds=4 * policy.timeout_seconds + 60)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}"

    def start(self) -> None:
        with self.db.session() as s:
            orphans = requeue_orphan_deliveries(s, self.host)
        if orphans:
            log.info("%d deliveries held by a stopped process on this host are due now", orphans)
        super().start()

    def run_once(self) -> int:
        with self.db.session() as s:
            due = [
                (d.id, d.destination, d.path)
                for d in claim_deliveries(s, 64, self.lease, self.owner)
            ]
        for name, batch in groupby(sorted(due, key=lambda d: d[1]), key=lambda d: d[1]):
            items = list(batch)
            started = time.perf_counter()
            errors = self._send(name, [Path(p) for _, _, p in items])
            seconds = time.perf_counter() - started
            for _ in items:  # each object waited for the whole attempt
                STAGE_SECONDS.labels("send").observe(seconds)
            self._record([i for i, _, _ in items], errors)
        return len(due)

    def _send(self, name: str, paths: list[Path]) -> list[str | None]:
        sender = self.senders.get(name)
        if sender is None:
            return [f"destination {name!r} is no longer configured"] * len(paths)
        return sender.send(paths)

    def _record(self, ids: list[int], errors: list[str | None]) -> None:
        policy = self.policy
        with self.db.session() as s:
            for delivery_id, error in zip(ids, errors, strict=True):
                d = s.get_one(Delivery, delivery_id)
                inst = s.get_one(Instance, d.instance_id)
                d.attempts += 1
                d.owner = None
                if error is None:
                    DELIVERED.labels(d.destination).inc()
                    d.delivered_at, d.last_error = utcnow(), None
                    change_state(
                        s, d, DeliveryState.DELIVERED,
                        detail=f"{d.sop_instance_uid} to {d.destination}",
                    )  # fmt: skip
                    pending = s.scalar(
                        select(Delivery.id)
                        .where(
                            Delivery.instance_id == inst.id,
                            Delivery.state != DeliveryState.DELIVERED,
                        )
                        .limit(1)
                    )
                    if pending is None and inst.state == InstanceState.REPORTED:
                        # audited by the last delivery's event above
                        change_state(s, inst, InstanceState.DELIVERED, audit=False)
                    continue
                DELIVERY_FAILURES.labels(d.destination).inc()
                d.last_error = error
                if d.attempts >= policy.max_attempts:
                    detail = (
                        f"{d.sop_instance_uid} to {d.destination} after "
                        f"{d.attempts} attempts: {error}"
                    )
                    change_state(s, d, DeliveryState.FAILED, detail=detail)
                    log.warning(
                        "delivery %d gave up: %s (`xrayage retry %d` queues it again)",
                        d.id,
                        detail,
                        d.id,
                    )
                    if inst.state != InstanceState.FAILED:  # audited by the delivery's event
                        change_state(
                            s, inst, InstanceState.FAILED, audit=False,
                            reason=f"delivery to {d.destination} failed: {error}",
                        )  # fmt: skip
                else:
                    wait = backoff_seconds(d.attempts, policy, self.rng)
                    d.next_attempt_at = utcnow() + dt.timedelta(seconds=wait)
                    record_event(
                        s,
                        "delivery-retry",
                        outcome="failure",
                        instance=inst,
                        detail=f"{d.sop_instance_uid} to {d.destination}: {error}; "
                        f"attempt {d.attempts}, next in {wait:.0f} s",
                    )
                    log.warning(
                        "delivery %d to %s failed (%s); retry in %.0f s",
                        d.id,
                        d.destination,
                        error,
                        wait,
                    )
