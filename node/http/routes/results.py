"""``/api/results``: the rows of ``xrayage results``, each page audited as a disclosure."""

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from node.http.routes.common import BeforeId, Limit, next_url, utc
from node.results.export import COLUMNS, export, plain
from storage import Database, InstanceState
from storage.results import ResultsQuery


def routes(db: Database, caller: Callable[..., str]) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/api/results")
    def results(
        request: Request,
        actor: Caller,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        state: InstanceState | None = None,
        patient_id: str | None = None,
        model: str | None = None,
        limit: Limit = 100,
        before_id: BeforeId = None,
    ) -> dict[str, Any]:
        """The rows of ``xrayage results`` (the same columns, with the patient's X-ray aging
        rate up to each image), newest first; each page is audited as a disclosure of patient
        data."""
        query = ResultsQuery(
            since=utc(since), until=utc(until), state=state, patient_id=patient_id,
            model=model, limit=limit, before_id=before_id,
        )  # fmt: skip
        with db.session() as s:
            rows = export(s, query, actor, None)
            return {
                "columns": list(COLUMNS),
                "results": [{k: plain(v) for k, v in r.values.items()} for r in rows],
                "next": next_url(request, rows, limit),
            }

    return router
