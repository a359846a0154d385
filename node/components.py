"""What the service runs: components with one interface, and the loop of its background workers
(inference, delivery, audit export)."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

STOP_SECONDS = 60.0


class Component(Protocol):
    """A part of the running node (node/service.py starts them in order and stops them in
    reverse): ``stop`` returns once the part has stopped; ``problems`` says what keeps it from
    working now (``/readyz``; empty: fine)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def problems(self) -> list[str]: ...


class Signal(Protocol):
    """What a worker waits on: a ``threading.Event``, or a ``multiprocessing`` one where the
    waking side lives in another process (the inference process's reports wake the deliverer)."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class WorkerThread(threading.Thread):
    """Calls ``run_once`` until stopped; sleeps ``idle_seconds`` (or until woken) when idle.

    State lives in the database, so a worker can stop between rounds without losing work, and
    one bad round is logged rather than ending the thread.
    """

    idle_seconds = 1.0

    def __init__(self, name: str, wake: Signal | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.wake: Signal = wake if wake is not None else threading.Event()
        self.stopping = threading.Event()
        self.log = logging.getLogger(f"xrayage.{name.removeprefix('xrayage-')}")

    def stop(self) -> None:
        """Stop after the current round, and wait for it."""
        self.stopping.set()
        self.wake.set()
        if self.is_alive():
            self.join(STOP_SECONDS)

    def problems(self) -> list[str]:
        return [] if self.is_alive() else [f"{self.name} not running"]

    def run_once(self) -> int:
        """One round; returns how many items it handled (0 means idle)."""
        raise NotImplementedError

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                handled = self.run_once()
            except Exception:
                self.log.exception("%s round failed", self.name)
                handled = 0
            if not handled:
                self.wake.wait(timeout=self.idle_seconds)
                self.wake.clear()
