"""The dashboard's plots (SVG drawn on the server; no patient identifiers in any of them)."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response

from node.results.validation import Validations
from storage import Database


def routes(db: Database, caller: Callable[..., str], validations: Validations) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/dashboard/{name}.svg")
    def plot(name: str, actor: Caller) -> Response:
        """One of the dashboard's plots."""
        from node.http.plots import PLOTS, per_day  # matplotlib, only once a plot is asked for

        if name == "per-day":
            return Response(per_day(db), media_type="image/svg+xml")
        if name not in PLOTS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no plot {name!r}")
        models = validations.models()
        if not models:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no [model] weights configured")
        return Response(PLOTS[name](models), media_type="image/svg+xml")

    return router
