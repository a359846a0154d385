"""The loop shared by the node's background workers (inference, delivery)."""

from __future__ import annotations

import logging
import threading


class WorkerThread(threading.Thread):
    """Calls ``run_once`` until stopped; sleeps ``idle_seconds`` (or until woken) when idle.

    State lives in the database, so a worker can stop between rounds without losing work, and
    one bad round is logged rather than ending the thread.
    """

    idle_seconds = 1.0

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.log = logging.getLogger(f"xrayage.{name.removeprefix('xrayage-')}")

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

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
