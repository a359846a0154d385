"""The node's models as the parts without torch see them: what weights are registered as, each
registered model's card, and ``[model] weights`` registered at a start (the live model of a fresh
node). The models table itself is :mod:`storage.models`; the loaded models,
:mod:`node.infer.models`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from ai.card import ModelCard
from ai.presets import model_card, resolve_weights
from node.config import ModelSection
from storage import Database
from storage.models import Weights, active_models, configure, live_model
from storage.tables import Model

log = logging.getLogger("xrayage.models")


def weights_of(path: Path, card: ModelCard, name: str | None = None) -> Weights:
    """``path`` with its card as the node registers them, named ``name`` or the card's name
    (the ``model_name`` of its results)."""
    card = replace(card, name=name or card.name)
    return Weights(card.name, card.version, card.sha256, str(path.resolve()), card.to_json())


def card_of(model: Model) -> ModelCard:
    """The registered model's card, under the name it is registered by."""
    card = ModelCard.from_json(model.card_json, f"model {model.name}")
    return replace(card, name=model.name, sha256=model.sha256)


def live_card(db: Database, cfg: ModelSection) -> ModelCard | None:
    """Register what ``[model] weights`` names (:func:`storage.models.configure`), then the
    live model's card; None: no weights configured and none live."""
    if cfg.weights:
        path = resolve_weights(cfg.weights, cfg.cache_dir)
        weights = weights_of(path, model_card(path))
        for attempt in (1, 2):  # another process of the node may register them at once
            try:
                with db.session() as s:
                    said = configure(s, weights)
                break
            except IntegrityError:
                if attempt == 2:
                    raise
        if said:
            log.info("model %s", said)
    with db.session() as s:
        live = live_model(s)
        return card_of(live) if live is not None else None


def active_cards(db: Database) -> list[ModelCard]:
    """The cards of the live model and the shadows, live first."""
    with db.session() as s:
        return [card_of(m) for m in active_models(s)]
