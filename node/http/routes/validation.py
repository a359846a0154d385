"""``/api/validation``: each active model's agreement with this site's chronological ages, the
live model's first, and each shadow compared with it on the same images."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status

from node.results.validation import Validation, Validations
from storage import Database, record_event


def _figures(v: Validation) -> dict[str, Any]:
    return {
        "model": {
            "name": v.card.name,
            "version": v.card.version,
            "sha256": v.card.sha256,
            "untrained": v.card.untrained,  # the pages show a banner
        },
        "reference": v.reference(),
        "rolling": [a.as_dict() for a in v.rolling()],
        "months": [a.as_dict() for a in v.monthly()],
        "study_months": [a.as_dict() for a in v.monthly(by_study=True)],
    }


def routes(db: Database, caller: Callable[..., str], validations: Validations) -> APIRouter:
    router = APIRouter()
    Caller = Annotated[str, Depends(caller)]

    @router.get("/api/validation")
    def validation_figures(actor: Caller) -> dict[str, Any]:
        """The figures of ``xrayage validation``: the live model's at the top level (as before
        shadow models), every active model's in ``models``, and ``comparisons``."""
        models = validations.models()
        if not models:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no [model] weights configured")
        with db.session() as s:
            record_event(s, "audit-query", actor=actor, detail="validation figures")
        figures = [_figures(v) for v in models]
        return {
            **figures[0],
            "window_days": validations.cfg.window_days,
            "models": figures,
            "comparisons": [c.as_dict() for c in validations.comparisons()],
        }

    return router
