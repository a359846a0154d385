"""What one report says, independent of how it is encoded (SR or Secondary Capture)."""

from __future__ import annotations

from dataclasses import dataclass

from ai.card import ModelCard


@dataclass(frozen=True)
class Findings:
    xray_age: float
    chronological_age: float | None
    card: ModelCard

    @property
    def difference(self) -> float | None:
        if self.chronological_age is None:
            return None
        return round(self.xray_age - self.chronological_age, 2)

    @property
    def series_description(self) -> str:
        # LO, at most 64 characters, and only characters every character set can carry.
        if self.card.untrained:
            return "X-ray age - AI, UNTRAINED DEMO WEIGHTS - not for diagnosis"
        return "X-ray age - AI result - not for diagnosis"
