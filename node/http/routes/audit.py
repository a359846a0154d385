"""``/api/audit``: the audit log, queried as ``xrayage audit`` does (the query is audited)."""

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from node.http.routes.common import BeforeId, Limit, next_url, utc
from storage import Database
from storage.audit import AuditQuery, as_dict, run_query


def routes(db: Database, caller: Callable[..., str]) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/api/audit")
    def audit(
        request: Request,
        actor: Caller,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        patient_id: str | None = None,
        study: str | None = None,
        accession: str | None = None,
        event: str | None = None,
        outcome: str | None = None,
        limit: Limit = 100,
        before_id: BeforeId = None,
    ) -> dict[str, Any]:
        query = AuditQuery(
            since=utc(since), until=utc(until), patient_id=patient_id, study=study,
            accession=accession, event=event, outcome=outcome, limit=limit, before_id=before_id,
        )  # fmt: skip
        with db.session() as s:
            rows = run_query(s, query, actor)
            return {"events": [as_dict(r) for r in rows], "next": next_url(request, rows, limit)}

    return router
