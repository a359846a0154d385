"""The application log: one line per record, as text or as JSON (``[logging] format``) for a
collector such as Loki or Elasticsearch. It never carries patient names (see the privacy test)."""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

from node.config import LoggingSection

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(cfg: LoggingSection) -> None:
    handler = logging.StreamHandler()
    if cfg.format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d %(threadName)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    # per-association, per-attribute and per-migration-context chatter
    for noisy in ("pynetdicom", "highdicom", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
