"""Routing: which destinations take an image's results, and why the others do not.

Each destination takes the kinds of object it lists (``send``), and only for images that meet
its ``when`` conditions: the calling AE title that sent the image, its Station Name, and whether
the model's weights are trained. A destination without ``when`` takes every result, as before
routing existed. The worker routes each result as it reports it; ``xrayage routes FILE`` shows
the same decision for a file, before any image is sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from node.config import Destination
from storage.tables import DeliveryKind


@dataclass(frozen=True)
class ImageFacts:
    """What routing looks at: who sent the image (None: found by a retro-scan or imported),
    the header's Station Name, and whether the model that aged it is trained."""

    calling_ae: str | None
    station_name: str | None
    trained: bool


def refusal(dest: Destination, facts: ImageFacts) -> str | None:
    """Why ``dest`` does not take this image's results, or None when it does."""
    when = dest.when
    if when is None:
        return None
    if when.calling_ae is not None and facts.calling_ae not in when.calling_ae:
        sender = facts.calling_ae or "none: not received over DICOM"
        return f"calling AE ({sender}) is not one of {', '.join(when.calling_ae)}"
    station = (facts.station_name or "").strip()
    if when.station_name is not None and station not in when.station_name:
        return f"station name ({station or 'none'}) is not one of {', '.join(when.station_name)}"
    if when.trained_model and not facts.trained:
        return "the model's weights are untrained and it takes trained models only"
    return None


@dataclass
class Routing:
    """Each destination that takes the result, with what it takes; each other, with why not."""

    takes: dict[str, frozenset[DeliveryKind]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ehr_kinds(self) -> frozenset[DeliveryKind]:
        """The EHR forms some destination takes: only those are built."""
        wanted = frozenset().union(*self.takes.values())
        return wanted & {DeliveryKind.OBSERVATION, DeliveryKind.ORU}

    def drop(self, unbuilt: dict[DeliveryKind, str]) -> None:
        """Move each destination that takes an object that could not be built to ``skipped``,
        with the reason."""
        for name, kinds in list(self.takes.items()):
            missing = sorted(kinds & unbuilt.keys())
            if missing:
                del self.takes[name]
                self.skipped[name] = "; ".join(f"{unbuilt[k]}" for k in missing)

    def summary(self) -> str:
        """One line for the audit entry of the report."""
        parts = [f"{n} ({', '.join(sorted(k))})" for n, k in self.takes.items()]
        parts += [f"not {n}: {why}" for n, why in self.skipped.items()]
        return "; ".join(parts)


def route(destinations: Iterable[Destination], facts: ImageFacts) -> Routing:
    routing = Routing()
    for dest in destinations:
        why = refusal(dest, facts)
        if why is None:
            routing.takes[dest.name] = dest.takes
        else:
            routing.skipped[dest.name] = why
    return routing
