"""Continuous local validation: how well the model agrees with the chronological ages of this
site's own patients, which every report carries for free.

For the reported images of the current model whose chronological age is known and within the
model card's validated range: MAE, mean bias (X-ray age minus chronological age), Pearson r and
the 95 % limits of agreement (bias +/- 1.96 SD of the differences, Bland and Altman 1986), over
a rolling window (``[validation] window_days``) and per calendar month (of the analysis, or of
the study: a retro-scan ages old images today), overall and by device (manufacturer and model
name) or by view. The figures are over images; each row counts its images and its distinct
patients. r and the limits of agreement need ``MIN_PAIRS`` images (null below, with the reason):
from fewer, an SD is too uncertain to draw limits with. When the rolling MAE exceeds the card's
stated MAE by more than ``alert_margin_years`` over at least ``min_count`` patients, the node
warns once a day and audits it: an alert, not an outage (``/readyz`` stays ready).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select

from ai.card import ModelCard
from node.config import ValidationSection
from node.results.compare import Comparison, compare
from storage import AuditEvent, Database, record_event, utcnow
from storage.results import AgePair, age_pairs

log = logging.getLogger("xrayage.validation")

By = Literal["all", "month", "study-month", "device", "view"]
ALERT_EVENT = "validation"
MIN_PAIRS = 10


@dataclass(frozen=True)
class Agreement:
    period: str  # "last 30 days" or a calendar month "2026-11"
    group: str  # "all", "device=ACME CR-1", "view=PA"
    images: int
    patients: int
    mae: float
    bias: float
    r: float | None  # None below MIN_PAIRS images or with no spread (see ``note``)
    loa_low: float | None  # None below MIN_PAIRS images
    loa_high: float | None
    note: str | None = None  # why r or the limits are null

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement(period: str, group: str, pairs: list[AgePair]) -> Agreement:
    predicted = np.array([p.xray_age for p in pairs], dtype=float)
    actual = np.array([p.chronological_age for p in pairs], dtype=float)
    diff = predicted - actual
    bias = float(diff.mean())
    r = loa_low = loa_high = None
    note = None
    if len(pairs) < MIN_PAIRS:
        note = f"r and limits of agreement need at least {MIN_PAIRS} images"
    else:
        spread = 1.96 * float(diff.std(ddof=1))
        loa_low, loa_high = bias - spread, bias + spread
        if predicted.std() > 0 and actual.std() > 0:
            r = float(np.corrcoef(predicted, actual)[0, 1])
        else:
            note = "no r: the ages do not vary"
    patients = len({p.patient_id or f"unknown {i}" for i, p in enumerate(pairs)})
    return Agreement(
        period, group, len(pairs), patients, float(np.abs(diff).mean()), bias, r, loa_low,
        loa_high, note,
    )  # fmt: skip


def _device(p: AgePair) -> str:
    return f"device={p.manufacturer or '?'} {p.manufacturer_model_name or '?'}"


Group = Literal["all", "device", "view"]
GROUPS: dict[Group, Callable[[AgePair], str]] = {
    "all": lambda p: "all",
    "device": _device,
    "view": lambda p: f"view={p.view_position or '?'}",
}


def summarise(
    pairs: Iterable[AgePair], group: Group, period: Callable[[AgePair], str]
) -> list[Agreement]:
    """Figures per (period, group), in that order."""
    found: dict[tuple[str, str], list[AgePair]] = defaultdict(list)
    for p in pairs:
        found[(period(p), GROUPS[group](p))].append(p)
    return [agreement(when, name, ps) for (when, name), ps in sorted(found.items())]


def month(p: AgePair) -> str:
    """The calendar month of the analysis."""
    return f"{p.at:%Y-%m}"


def study_month(p: AgePair) -> str:
    """The calendar month of the study (``unknown`` without a study date)."""
    return f"{p.study_date:%Y-%m}" if p.study_date is not None else "unknown"


class ValidationCollector(Collector):
    """The rolling window's figures of each active model as Prometheus gauges, read at each
    scrape, labelled by model (its name) and group."""

    def __init__(self, validations: Validations) -> None:
        self.validations = validations

    def collect(self) -> Iterator[Metric]:
        figures = [(v.card.name, a) for v in self.validations.models() for a in v.rolling()]
        gauges = [
            ("mae_years", "Mean absolute difference of X-ray and chronological age", "mae"),
            ("bias_years", "Mean X-ray age minus chronological age", "bias"),
            ("images", "Images with a known age in the rolling window", "images"),
            ("patients", "Distinct patients among those images", "patients"),
        ]
        for name, doc, field in gauges:
            family = GaugeMetricFamily(
                f"xrayage_validation_{name}", f"{doc}, rolling window, by model and group",
                labels=["model", "group"],
            )  # fmt: skip
            for model, a in figures:
                family.add_metric([model, a.group], getattr(a, field))
            yield family


class Validation:
    """The figures of one model on one database, under ``[validation]``."""

    def __init__(self, db: Database, card: ModelCard, cfg: ValidationSection) -> None:
        self.db = db
        self.card = card
        self.cfg = cfg

    def pairs(self, rolling: bool) -> list[AgePair]:
        since = utcnow() - dt.timedelta(days=self.cfg.window_days) if rolling else None
        with self.db.session() as s:
            return age_pairs(s, self.card.sha256, self.card.age_range, since)

    def figures(self, by: By) -> list[Agreement]:
        """``month``, ``study-month``: per calendar month of the analysis or of the study,
        overall; else the rolling window's, by ``by``."""
        if by in ("month", "study-month"):
            return summarise(
                self.pairs(rolling=False), "all", month if by == "month" else study_month
            )
        return summarise(self.pairs(rolling=True), by, self._window)

    def _window(self, p: AgePair) -> str:
        return f"last {self.cfg.window_days} days"

    def rolling(self) -> list[Agreement]:
        """The rolling window's figures: overall, by device and by view (the gauges)."""
        pairs = self.pairs(rolling=True)
        return [a for g in GROUPS for a in summarise(pairs, g, self._window)]

    def monthly(self, by_study: bool = False) -> list[Agreement]:
        """Per calendar month of the analysis (or of the study): overall, by device and by
        view."""
        pairs = self.pairs(rolling=False)
        return [a for g in GROUPS for a in summarise(pairs, g, study_month if by_study else month)]

    def reference(self) -> dict[str, Any]:
        card = self.card
        return {"mae": card.reference_mae, "r": card.reference_r, "set": card.reference_set}

    def drift(self) -> str | None:
        """Why the rolling MAE is too far above the card's, or None."""
        stated = self.card.reference_mae
        overall = next(iter(self.figures("all")), None)
        if stated is None or overall is None or overall.patients < self.cfg.min_count:
            return None
        if overall.mae <= stated + self.cfg.alert_margin_years:
            return None
        return (
            f"model {self.card.name} {self.card.version}: MAE {overall.mae:.2f} years over the "
            f"last {self.cfg.window_days} days ({overall.patients} patients) exceeds its stated "
            f"{stated:.2f} by more than {self.cfg.alert_margin_years:g}: check the images the "
            "node receives (devices, views, processing) before trusting its ages"
        )

    def check(self) -> str | None:
        """The scheduled check: warn and audit a drift, at most once per UTC day."""
        why = self.drift()
        if why is None:
            return None
        today = dt.datetime.combine(utcnow().date(), dt.time(), dt.UTC)
        with self.db.session() as s:
            said = s.scalar(
                select(AuditEvent.id)
                .where(AuditEvent.event == ALERT_EVENT, AuditEvent.at >= today)
                .limit(1)
            )
            if said is not None:
                return None
            record_event(s, ALERT_EVENT, outcome="failure", detail=why)
        log.warning("validation: %s", why)
        return why


class Validations:
    """The figures of each active model, the live one first, with each shadow compared with
    the live model on the same images (:mod:`node.results.compare`). ``cards`` reads the models
    table at each call: a promotion shows at once."""

    def __init__(
        self, db: Database, cfg: ValidationSection, cards: Callable[[], list[ModelCard]]
    ) -> None:
        self.db = db
        self.cfg = cfg
        self.cards = cards

    def models(self) -> list[Validation]:
        return [Validation(self.db, card, self.cfg) for card in self.cards()]

    def live(self) -> Validation | None:
        return next(iter(self.models()), None)

    def comparisons(self) -> list[Comparison]:
        """Each shadow against the live model, on all their images with a known age."""
        live, *shadows = self.models() or [None]
        if live is None:
            return []
        reference = live.pairs(rolling=False)
        return [paired(live, v, reference) for v in shadows]

    def check(self) -> str | None:
        """The live model's drift check (:meth:`Validation.check`): its reports are sent."""
        live = self.live()
        return live.check() if live is not None else None


def paired(
    reference: Validation, candidate: Validation, pairs: list[AgePair] | None = None
) -> Comparison:
    """``candidate`` against ``reference`` on the images both analysed (``pairs``: the
    reference's, when already read)."""
    ref = pairs if pairs is not None else reference.pairs(rolling=False)
    return compare(reference.card.name, candidate.card.name, ref, candidate.pairs(rolling=False))
