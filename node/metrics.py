"""Prometheus metrics (prometheus-client), served at ``/metrics`` on ``[http] port``.

Counters and histograms count what this process did since it started; Prometheus sums them over
the processes of a deployment and survives their restarts. The shared state (queue depth,
instances by state, deliveries waiting, retro-scan progress) is read from the database at scrape
time, so every role reports the same numbers and nothing is kept in memory only.
No metric carries a patient identifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from storage import Database, utcnow
from storage.deliveries import delivery_counts
from storage.lifecycle import STATE_CHANGES
from storage.queue import backlog
from storage.results import state_counts
from storage.scans import latest_scan

RECEIVED = Counter(
    "xrayage_instances_received",
    "Instances stored and committed (answered with C-STORE Success), by origin (push or retro)",
    ["origin"],
    registry=None,
)
SKIPPED = Counter(
    "xrayage_instances_skipped", "Instances the gate did not analyse, by reason", ["reason"],
    registry=None,
)  # fmt: skip
INFERENCE_SECONDS = Histogram(
    "xrayage_inference_batch_seconds",
    "Wall time of one inference batch: decoding, preprocessing and the model",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
BATCH_SIZE = Histogram(
    "xrayage_inference_batch_size", "Images per inference batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=None,
)  # fmt: skip
INFERRED = Counter(
    "xrayage_instances_inferred",
    "Instances through a model, by outcome (reported, failed, or shadow: stored, not sent)",
    ["outcome"], registry=None,
)  # fmt: skip
DELIVERED = Counter(
    "xrayage_deliveries", "Report objects delivered, by destination and kind",
    ["destination", "kind"],
    registry=None,
)  # fmt: skip
DELIVERY_FAILURES = Counter(
    "xrayage_delivery_failures", "Failed delivery attempts, by destination and kind",
    ["destination", "kind"],
    registry=None,
)  # fmt: skip
STAGE_SECONDS = Histogram(
    "xrayage_stage_seconds",
    "Seconds one instance spent in each step of the data path: store (C-STORE handler: file "
    "fsynced, row committed), queue (committed to claimed by a worker), decode (file read, "
    "pixels to display values), preprocess (to the model's tensor), model (its whole batch), "
    "report (SR and SC built, stored, committed), send (the delivery attempt to a destination)",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
PROCESS_METRICS = (RECEIVED, SKIPPED, INFERENCE_SECONDS, BATCH_SIZE, INFERRED, DELIVERED,
                   DELIVERY_FAILURES, STAGE_SECONDS, STATE_CHANGES)  # fmt: skip


class DatabaseCollector(Collector):
    """Gauges of the shared state, read from the database at each scrape."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        with self.db.session() as s:
            depth, oldest = backlog(s)
            states = state_counts(s)
            deliveries = delivery_counts(s)
            latest = latest_scan(s)
        yield GaugeMetricFamily(
            "xrayage_queue_depth", "Jobs an inference worker could claim now", value=depth
        )
        wait = (utcnow() - oldest).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily(
            "xrayage_queue_oldest_seconds", "Age of the oldest claimable job", value=wait
        )
        yield _by("xrayage_instances", "Instances by state", "state", states.items())
        yield _by("xrayage_deliveries_by_state", "Deliveries by state", "state", deliveries.items())
        progress = GaugeMetricFamily(
            "xrayage_retro_scan", "The latest retro-scan: studies and images", labels=["count"]
        )
        if latest is not None:
            scan, studies = latest.scan, (latest.studies, latest.studies_done)
            for name, value in (
                ("studies_total", studies[0]), ("studies_done", studies[1]),
                ("images_fetched", scan.fetched), ("images_already_done", scan.already_done),
                ("images_failed", scan.failed), ("running", int(scan.state == "running")),
            ):  # fmt: skip
                progress.add_metric([name], value)
        yield progress


def _by(name: str, doc: str, label: str, rows: Iterable[tuple[object, int]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, count in rows:
        family.add_metric([str(getattr(key, "value", key))], count)
    return family


class ProcessCollector(Collector):
    """This process's counters and histograms, with those of its inference process summed in.

    The inference process (node/infer/process.py) counts into prometheus-client's multiprocess
    files in ``child_dir``; they outlive it, so what a restarted one counted before stays. A
    scrape gets one family per name, as the exposition format requires.
    """

    def __init__(self, child_dir: Path | None) -> None:
        self.child_dir = child_dir

    def collect(self) -> Iterator[Metric]:
        families = {
            family.name: family for metric in PROCESS_METRICS for family in metric.collect()
        }
        files = sorted(str(f) for f in self.child_dir.glob("*.db")) if self.child_dir else []
        for theirs in MultiProcessCollector.merge(files, accumulate=True) if files else []:
            ours = families.setdefault(theirs.name, theirs)
            if ours is theirs:
                continue
            values = {(x.name, tuple(sorted(x.labels.items()))): x for x in ours.samples}
            for sample in theirs.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                mine = values.get(key)
                values[key] = (
                    sample if mine is None else mine._replace(value=mine.value + sample.value)
                )
            ours.samples = list(values.values())
        yield from families.values()


def registry_for(
    db: Database, child_dir: Path | None = None, more: Iterable[Collector] = ()
) -> CollectorRegistry:
    """This process's counters (and its inference process's, in ``child_dir``) with the
    database's gauges and ``more`` collectors, for one HTTP app."""
    registry = CollectorRegistry()
    registry.register(ProcessCollector(child_dir))
    registry.register(DatabaseCollector(db))
    for collector in more:
        registry.register(collector)
    return registry
