"""Without a token: ``/healthz`` (the process answers and its database is reachable),
``/readyz`` (this role can do its work: schema current, SCP listening, model loaded), and the
Prometheus ``/metrics`` (:mod:`node.metrics`; no patient data in it)."""

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from node.metrics import registry_for
from node.results.validation import ValidationCollector, Validations
from storage import Database


def routes(
    db: Database,
    readiness: Callable[[], list[str]],
    child_metrics: Path | None,
    validations: Validations,
) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        try:
            with db.session() as s:
                s.execute(text("SELECT 1"))
        except Exception as e:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"database: {e}") from None
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> dict[str, str]:
        problems = readiness()
        if problems:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "; ".join(problems))
        return {"status": "ready"}

    metrics = registry_for(db, child_metrics, [ValidationCollector(validations)])

    @router.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return router
