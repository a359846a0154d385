"""Model cards: what a set of weights is, what it expects and what it was validated for.

A card is a JSON file beside the weights (``model.pt`` -> ``model.json``). The SHA-256 is always
computed from the weights file; a card that states a different one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xrayage.errors import UserError


class ModelCardError(UserError, ValueError):
    pass


INTENSITIES = ("xrv-1024",)
NORMALISATIONS = ("imagenet",)
DEFAULT_AGE_RANGE = (18.0, 100.0)  # adults: what a card says when it says nothing


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str = "unknown"
    architecture: str = "unknown"
    input_size: int = 320
    # How display values become network input; "xrv-1024" is the published weights' convention:
    # 8-bit display values mapped to [-1024, 1024], then to [0, 1] (ai/preprocess.py).
    intensity: str = "xrv-1024"
    normalisation: str = "imagenet"  # mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
    output_unit: str = "a"
    age_range: tuple[float, float] = DEFAULT_AGE_RANGE
    views: tuple[str, ...] = ("PA", "AP")
    untrained: bool = False
    provenance: str = ""
    license: str = ""
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    # (slope, intercept) of the age gap's linear trend with chronological age on a reference set
    # (ai.train.fit_gap_correction); the SR then also reports the gap with that trend removed.
    gap_correction: tuple[float, float] | None = None
    # The model's stated agreement with chronological age, on ``reference_set``: what a site's
    # own figures are compared against (node.results.validation).
    reference_mae: float | None = None
    reference_r: float | None = None
    reference_set: str = ""

    def __post_init__(self) -> None:
        # A card the preprocessing cannot honour is refused rather than silently misread.
        if self.intensity not in INTENSITIES:
            raise ModelCardError(f"intensity {self.intensity!r} is not one of {INTENSITIES}")
        if self.normalisation not in NORMALISATIONS:
            raise ModelCardError(
                f"normalisation {self.normalisation!r} is not one of {NORMALISATIONS}"
            )
        if self.output_unit != "a":
            raise ModelCardError(f"output unit {self.output_unit!r}: only years ('a') are known")
        if not 32 <= self.input_size <= 2048:
            raise ModelCardError(f"input size {self.input_size} is outside 32-2048")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> ModelCard:
        try:
            raw = json.loads(text)
            raw["age_range"] = tuple(raw.get("age_range", DEFAULT_AGE_RANGE))
            raw["views"] = tuple(raw.get("views", ("PA", "AP")))
            if raw.get("gap_correction") is not None:
                slope, intercept = raw["gap_correction"]
                raw["gap_correction"] = (float(slope), float(intercept))
            return cls(**raw)
        except ModelCardError as e:
            raise ModelCardError(f"{where}: {e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelCardError(f"{where}: not a valid model card ({e})") from None


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_card(weights: Path, card: ModelCard) -> None:
    """Atomically, so a crash never leaves half a card beside good weights."""
    path = card_path(weights)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(card.to_json())
    os.replace(tmp, path)


def load_card(weights: Path, required: bool = False) -> ModelCard:
    """The card beside ``weights`` (a minimal one named after the file if there is none and
    ``required`` is false); its SHA-256 is always the one computed from the file."""
    digest = file_sha256(weights)
    path = card_path(weights)
    if not path.exists():
        if required:
            raise ModelCardError(f"{weights}: no model card {path.name} beside it")
        return ModelCard(name=weights.stem, sha256=digest)
    card = ModelCard.from_json(path.read_text(), str(path))
    if card.sha256 and card.sha256 != digest:
        raise ModelCardError(
            f"{weights}: SHA-256 {digest} does not match its model card ({card.sha256})"
        )
    return ModelCard(**{**asdict(card), "sha256": digest})
