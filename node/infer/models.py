"""The active models loaded on one device in the inference process, read again from the models
table (:mod:`storage.models`) every ``REFRESH_SECONDS``, so that ``xrayage model
add|promote|retire`` takes effect in a running node without a restart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from ai.card import ModelCard
from ai.engine import shared_input
from ai.errors import ModelLoadError
from ai.model import AgeModel
from node.infer.registry import card_of
from storage import Database, record_event
from storage.models import REFRESH_SECONDS, active_models
from storage.results import ModelIdentity
from storage.tables import ModelRole

log = logging.getLogger("xrayage.models")


def identity(model: AgeModel) -> ModelIdentity:
    card = model.card
    return ModelIdentity(card.name, card.version, card.sha256, card.untrained)


class ModelSet:
    """The active models, loaded on ``device``; the live one first. A shadow model that cannot
    be loaded is logged and audited once and left out: it never stops the live model."""

    def __init__(self, db: Database, device: str) -> None:
        self.db = db
        self.device = device
        self.loaded: dict[str, AgeModel] = {}  # by weights SHA-256, the live model first
        self.live: str | None = None
        self._refused: set[str] = set()
        self._read_at = 0.0
        self._started = False  # the first read raises for a live model that cannot load

    def refresh(self, force: bool = False) -> bool:
        """Read the table (every ``REFRESH_SECONDS`` unless ``force``) and load or drop models;
        True when the set changed. The live model that cannot be loaded raises
        :class:`ModelLoadError` at the first read (the node does not start), later it is
        logged, and its jobs wait."""
        now = time.monotonic()
        if not force and now - self._read_at < REFRESH_SECONDS:
            return False
        self._read_at = now
        try:
            with self.db.session() as s:
                rows = [(m.sha256, m.role, m.path, card_of(m)) for m in active_models(s)]
        except SQLAlchemyError as e:
            log.error("models table unavailable (%s): the models stay as they are", e)
            return False
        wanted = {sha for sha, *_ in rows}
        live = next((sha for sha, role, *_ in rows if role == ModelRole.LIVE), None)
        changed = live != self.live or wanted != set(self.loaded)
        loaded = {}
        for sha, role, path, card in rows:
            model = self.loaded.get(sha) or self._load(sha, role, Path(path), card)
            if model is not None:
                loaded[sha] = model
        self.loaded, self.live = loaded, live
        self._started = True
        if changed:  # the jobs were handed over with the role change (storage.models.set_role)
            names = [f"{m.card.name} ({'live' if s == live else 'shadow'})"
                     for s, m in loaded.items()]  # fmt: skip
            log.info("models: %s", ", ".join(names) or "none")
        return changed

    def _load(self, sha: str, role: ModelRole, path: Path, card: ModelCard) -> AgeModel | None:
        if sha in self._refused:
            return None
        try:
            model = AgeModel.load(path, self.device, warm_up=True)
            if model.card.sha256 != sha:
                raise ModelLoadError(f"{path}: the file's SHA-256 is now {model.card.sha256}")
            model = replace(model, card=card)
            shared_input([*self.loaded.values(), model])
        except (ModelLoadError, ValueError, OSError) as e:
            if role == ModelRole.LIVE and not self._started:
                raise ModelLoadError(str(e)) from None
            self._refused.add(sha)
            log.error("%s model %s cannot be loaded: %s", role.value, card.name, e)
            with self.db.session() as s:
                record_event(s, "model", outcome="failure",
                             detail=f"{role.value} model {card.name} not loaded: {e}")  # fmt: skip
            return None
        log.info(
            "model %s %s (sha256 %s) %s on %s%s", card.name, card.version, sha, role.value,
            model.device, " - UNTRAINED weights" if card.untrained else "",
        )  # fmt: skip
        return model

    def live_model(self) -> AgeModel | None:
        return self.loaded.get(self.live) if self.live else None

    def first(self) -> AgeModel:
        """The model the engine is built around (device, input size): the live one, else any."""
        model = self.live_model() or next(iter(self.loaded.values()), None)
        if model is None:
            raise ModelLoadError("no model to run: [model] weights names none and none is live")
        return model
