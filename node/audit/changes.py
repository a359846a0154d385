"""What changed since the node last started: settings and model, audited with the keys changed.

The audit log records "model or config changes" (ARCHITECTURE.md); a node compares what it
starts with against the last version stored, and stores and audits a new one when they differ.
Secrets (API tokens, DICOMweb tokens and passwords) are replaced by their SHA-256 before
anything is stored.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ai import ModelCard
from node.config import Settings
from storage import Database, record_event
from storage.settings_history import keep_settings


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _hashed(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def snapshot(settings: Settings, card: ModelCard | None) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    data["http"]["tokens"] = {name: _hashed(t) for name, t in settings.http.tokens.items()}
    for dest in data["destinations"]:
        for key in ("token", "password"):
            if dest[key] is not None:
                dest[key] = _hashed(dest[key])
    data["loaded_model"] = (
        {"name": card.name, "version": card.version, "sha256": card.sha256} if card else None
    )
    return data


def record_changes(db: Database, settings: Settings, card: ModelCard | None) -> list[str]:
    """Audit what differs from the last start (nothing on the first); returns the keys."""
    current = snapshot(settings, card)
    text = json.dumps(current, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    with db.session() as s:
        changed_at_all, previous = keep_settings(s, digest, text)
        if not changed_at_all:
            return []
        if previous is None:
            record_event(s, "config", detail=f"first start; settings sha256 {digest}")
            return []
        before, after = _flat(json.loads(previous)), _flat(current)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        model_keys = [k for k in changed if k.startswith("loaded_model")]
        if model_keys:
            old, new = before.get("loaded_model.sha256"), after.get("loaded_model.sha256")
            record_event(
                s, "model",
                detail=f"model changed: {before.get('loaded_model.name')} (sha256 {old}) -> "
                f"{after.get('loaded_model.name')} {after.get('loaded_model.version')} "
                f"(sha256 {new})",
            )  # fmt: skip
        others = [k for k in changed if k not in model_keys]
        if others:
            record_event(s, "config", detail=f"settings changed: {', '.join(others)}")
        return changed
