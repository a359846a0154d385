"""Model cards: what a set of weights is, what it expects and what it was validated for.

A card is a JSON file beside the weights (``model.pt`` -> ``model.json``). The SHA-256 is always
computed from the weights file; a card that states a different one is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ModelCardError(ValueError):
    pass


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str = "unknown"
    architecture: str = "unknown"
    input_size: int = 320
    # How display values become network input; "xrv-1024" is the published weights' convention:
    # 8-bit display values mapped to [-1024, 1024], then to [0, 1], then ImageNet normalisation.
    intensity: str = "xrv-1024"
    output_unit: str = "a"
    age_range: tuple[float, float] = (18.0, 100.0)
    views: tuple[str, ...] = ("PA", "AP")
    untrained: bool = False
    provenance: str = ""
    license: str = ""
    sha256: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_card(weights: Path) -> ModelCard:
    """The card beside ``weights`` (a minimal one named after the file if there is none)."""
    digest = file_sha256(weights)
    path = card_path(weights)
    if not path.exists():
        return ModelCard(name=weights.stem, sha256=digest)
    try:
        raw = json.loads(path.read_text())
        raw["age_range"] = tuple(raw.get("age_range", (18.0, 100.0)))
        raw["views"] = tuple(raw.get("views", ("PA", "AP")))
        card = ModelCard(**raw)
    except (ValueError, TypeError) as e:
        raise ModelCardError(f"{path}: not a valid model card ({e})") from None
    if card.sha256 and card.sha256 != digest:
        raise ModelCardError(
            f"{weights}: SHA-256 {digest} does not match its model card ({card.sha256})"
        )
    return ModelCard(**{**asdict(card), "sha256": digest})
