"""Delivery of report objects to the configured destinations, by C-STORE, STOW-RS, FHIR or
HL7 MLLP (one :class:`Sender` per kind of destination), with retries.

A failed attempt is recorded and retried after a random wait between half the initial delay and
an exponential ceiling (``retry_initial_seconds * 2**(attempts - 1)``, capped at
``retry_max_seconds``), so that many deliveries failing together do not retry together; after
``max_attempts`` the delivery is ``failed`` with its last error and the instance too.

Each object answers for itself: a report file that cannot be read fails its own delivery at
once (no retry can help), as does one the destination refused (:class:`Refused`: a FHIR 4xx,
an HL7 AE or AR), and anything a destination's sender raises (a host name that does not
resolve, a TLS error, a library's bug) is that destination's failed attempt, recorded with the
reason; the other destinations and objects go on in the same round.

Deliveries are claimed under a lease (:func:`storage.deliveries.claim_deliveries`), so several
deliverer processes can share one PostgreSQL database without sending an object twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import socket
import time
from itertools import groupby
from pathlib import Path

from node.components import Signal, WorkerThread
from node.config import DeliverySection, Destination
from node.delivery.sender import Refused, Sender, sender_for, unreadable
from node.metrics import DELIVERED, DELIVERY_FAILURES, STAGE_SECONDS
from storage import Database
from storage.deliveries import (
    Attempt,
    claim_deliveries,
    failing_destinations,
    record_attempt,
    requeue_orphan_deliveries,
)
from storage.owners import this_process

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
        self.where = {d.name: d.where for d in destinations}
        # A claim holds a delivery this long: past it, another deliverer may send it again.
        self.lease = dt.timedelta(seconds=4 * policy.timeout_seconds + 60)
        me = this_process()
        self.host, self.owner = me.host, str(me)

    def start(self) -> None:
        with self.db.session() as s:
            orphans = requeue_orphan_deliveries(s, self.host)
        if orphans:
            log.info("%d deliveries held by a stopped process on this host are due now", orphans)
        super().start()

    def problems(self) -> list[str]:
        """``/readyz``: the destinations whose deliveries are failing now, with the error."""
        found = super().problems()
        with self.db.session() as s:
            failing = failing_destinations(s)
        return found + [f"destination {name} failing: {error}" for name, error in failing.items()]

    def run_once(self) -> int:
        with self.db.session() as s:
            due = [
                (d.id, d.destination, Path(d.path), d.kind)
                for d in claim_deliveries(s, 64, self.lease, self.owner)
            ]
        for name, batch in groupby(sorted(due, key=lambda d: d[1]), key=lambda d: d[1]):
            # Files that cannot be read fail alone and at once; the rest go in one attempt.
            failures: dict[int, tuple[str | None, bool]] = {}
            sendable = []
            for delivery_id, _, path, kind in batch:
                problem = unreadable(path, kind)
                if problem is None:
                    sendable.append((delivery_id, path))
                else:
                    failures[delivery_id] = (problem, True)
            started = time.perf_counter()
            errors = self._send(name, [path for _, path in sendable]) if sendable else []
            seconds = time.perf_counter() - started
            for (delivery_id, _), error in zip(sendable, errors, strict=True):
                STAGE_SECONDS.labels("send").observe(seconds)  # each waited for the attempt
                failures[delivery_id] = (error, isinstance(error, Refused))
            self._record(failures)
        return len(due)

    def _send(self, name: str, paths: list[Path]) -> list[str | None]:
        sender = self.senders.get(name)
        if sender is None:
            return [f"destination {name!r} is no longer configured"] * len(paths)
        try:
            return sender.send(paths)
        except Exception as e:  # however a destination fails, it fails alone, with a reason
            log.debug("sender %s raised", name, exc_info=True)
            what = "host name does not resolve" if isinstance(e, socket.gaierror) else "failed"
            return [f"{self.where[name]}: {what} ({type(e).__name__}: {e})"] * len(paths)

    def _record(self, results: dict[int, tuple[str | None, bool]]) -> None:
        policy = self.policy
        with self.db.session() as s:
            for delivery_id, (error, final) in results.items():
                outcome = record_attempt(
                    s, delivery_id, error, max_attempts=policy.max_attempts,
                    backoff=lambda n: backoff_seconds(n, policy, self.rng), final=final,
                )  # fmt: skip
                if outcome.attempt == Attempt.DELIVERED:
                    DELIVERED.labels(outcome.destination, outcome.kind.value).inc()
                    continue
                DELIVERY_FAILURES.labels(outcome.destination, outcome.kind.value).inc()
                if outcome.attempt == Attempt.GAVE_UP:
                    log.warning(
                        "delivery %d gave up: %s (`xrayage retry %d` queues it again)",
                        delivery_id, outcome.detail, delivery_id,
                    )  # fmt: skip
                else:
                    log.warning(
                        "delivery %d failed (%s); retry in %.0f s",
                        delivery_id, outcome.detail, outcome.wait_seconds,
                    )  # fmt: skip
