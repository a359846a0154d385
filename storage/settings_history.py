"""The settings and model each start of the node ran with, kept when they change, so that what
changed is audited with a diff (node/audit/changes.py)."""

from __future__ import annotations

from sqlalchemy import desc, select
from sqlalchemy.orm import Session

from storage.tables import ConfigVersion


def keep_settings(session: Session, sha256: str, settings_json: str) -> tuple[bool, str | None]:
    """Keep ``settings_json`` unless it is the last kept: whether it was kept (they changed),
    and the previous settings' JSON (None on the first start)."""
    last = session.scalar(select(ConfigVersion).order_by(desc(ConfigVersion.id)).limit(1))
    if last is not None and last.sha256 == sha256:
        return False, last.settings_json
    session.add(ConfigVersion(sha256=sha256, settings_json=settings_json))
    return True, None if last is None else last.settings_json
