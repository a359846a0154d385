"""``/api/validation``: the model's agreement with this site's chronological ages."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status

from node.results.validation import Validation
from storage import Database, record_event


def routes(db: Database, caller: Callable[..., str], validation: Validation | None) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/api/validation")
    def validation_figures(actor: Caller) -> dict[str, Any]:
        """The figures of ``xrayage validation``."""
        if validation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no [model] weights configured")
        with db.session() as s:
            record_event(s, "audit-query", actor=actor, detail="validation figures")
        return {
            "model": {
                "name": validation.card.name,
                "sha256": validation.card.sha256,
                "untrained": validation.card.untrained,  # the pages show a banner
            },
            "reference": validation.reference(),
            "window_days": validation.cfg.window_days,
            "rolling": [a.as_dict() for a in validation.rolling()],
            "months": [a.as_dict() for a in validation.monthly()],
            "study_months": [a.as_dict() for a in validation.monthly(by_study=True)],
        }

    return router
