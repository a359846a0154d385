"""``/api/instances``: instance states for the status page, with the counts by state."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from node.http.routes.common import BeforeId, Limit, next_url
from storage import Database, InstanceState, record_event
from storage.results import instance_page, state_counts


def routes(db: Database, caller: Callable[..., str]) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/api/instances")
    def instances(
        request: Request,
        actor: Caller,
        state: InstanceState | None = None,
        limit: Limit = 100,
        before_id: BeforeId = None,
    ) -> dict[str, Any]:
        with db.session() as s:
            rows = instance_page(s, state, limit, before_id)
            counts = state_counts(s)
            which = state.value if state else "any"
            record_event(
                s, "audit-query", actor=actor,
                detail=f"instance states: state={which}; {len(rows)} rows",
            )  # fmt: skip
            return {
                "counts": {k.value: v for k, v in counts.items()},
                "instances": [r.values for r in rows],
                "next": next_url(request, rows, limit),
            }

    return router
