"""``/api/destinations``: each destination's deliveries by state, the kinds of object it
carried (sr, sc, observation, oru), and whether it is failing."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from storage import Database
from storage.deliveries import destination_status


def routes(db: Database, caller: Callable[..., str]) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/api/destinations")
    def destinations(actor: Caller) -> dict[str, Any]:
        """No patient data: names, counts and the newest error of a failing destination."""
        with db.session() as s:
            status = destination_status(s)
        return {
            "destinations": [
                {"name": d.name, "kinds": d.kinds, "counts": d.counts, "failing": d.failing}
                for d in status
            ]
        }

    return router
