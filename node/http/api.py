"""The read-only HTTP API: audit-log queries, instance states, results, a status page; and, with no
token, the probes ``/healthz`` (the process answers and its database is reachable) and
``/readyz`` (this role can do its work: schema current, SCP listening, model loaded), and the
Prometheus ``/metrics`` (:mod:`node.metrics`; no patient data in it).

Every ``/api`` route needs ``Authorization: Bearer <token>`` with one of ``[http] tokens``;
the token's name is the actor recorded in the audit log for the query. Lists are newest first
and paged by keyset (``before_id``), which stays fast at millions of rows: each page's
``next`` is the URL of the following one, or null.
"""

import datetime as dt
import logging
import secrets
import threading
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from node.metrics import registry_for
from node.results.export import export, plain
from node.results.validation import Validation, ValidationCollector
from storage import Database, InstanceState, record_event
from storage.audit import AuditQuery, as_dict, run_query
from storage.results import RESULT_COLUMNS, ResultsQuery, instance_page, state_counts
from xrayage.errors import CannotListen

MAX_PAGE = 1000
log = logging.getLogger("xrayage.http")
WEB = files("node.http") / "web"
PAGE = (WEB / "index.html").read_text()
DASHBOARD = (WEB / "dashboard.html").read_text()
SCRIPTS = {name: (WEB / f"{name}.js").read_text() for name in ("common", "index", "dashboard")}
# Scripts come from the node only (no inline script, nothing from elsewhere); plots are blobs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    db: Database,
    tokens: dict[str, str],
    readiness: Callable[[], list[str]] = list,
    child_metrics: Path | None = None,
    validation: Validation | None = None,
) -> FastAPI:
    """``readiness`` lists what keeps this process from being ready (empty: ready);
    ``child_metrics``: the inference process's metric files, summed into ``/metrics``;
    ``validation``: the current model's agreement figures (none without a model)."""
    # The schema is served behind the token like the rest of /api (route below).
    app = FastAPI(title="xrayage", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def secure_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    bearer = HTTPBearer(auto_error=False)

    def caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        given = creds.credentials.encode() if creds else b""
        for name, token in tokens.items():
            if creds and secrets.compare_digest(given, token.encode()):
                return f"api:{name}"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )

    Caller = Annotated[str, Depends(caller)]
    Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
    BeforeId = Annotated[int | None, Query(ge=1, le=2**63 - 1)]  # a database integer

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(actor: Caller) -> dict[str, Any]:
        return app.openapi()

    def next_url(request: Request, rows: list[Any], limit: int) -> str | None:
        if len(rows) < limit:
            return None
        return str(request.url.include_query_params(before_id=rows[-1].id))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        try:
            with db.session() as s:
                s.execute(text("SELECT 1"))
        except Exception as e:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"database: {e}") from None
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        problems = readiness()
        if problems:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "; ".join(problems))
        return {"status": "ready"}

    more = [ValidationCollector(validation)] if validation is not None else []
    metrics = registry_for(db, child_metrics, more)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> str:
        return DASHBOARD

    @app.get("/web/{name}.js")
    def script(name: str) -> Response:
        if name not in SCRIPTS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no script {name!r}")
        return Response(SCRIPTS[name], media_type="text/javascript")

    @app.get("/dashboard/{name}.svg")
    def plot(name: str, actor: Caller) -> Response:
        """One of the dashboard's plots (no patient identifiers in any of them)."""
        from node.http.plots import PLOTS, per_day  # matplotlib, only once a plot is asked for

        if name == "per-day":
            return Response(per_day(db), media_type="image/svg+xml")
        if name not in PLOTS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no plot {name!r}")
        if validation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no [model] weights configured")
        return Response(PLOTS[name](validation), media_type="image/svg+xml")

    @app.get("/api/audit")
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
            since=_utc(since), until=_utc(until), patient_id=patient_id, study=study,
            accession=accession, event=event, outcome=outcome, limit=limit, before_id=before_id,
        )  # fmt: skip
        with db.session() as s:
            rows = run_query(s, query, actor)
            return {"events": [as_dict(r) for r in rows], "next": next_url(request, rows, limit)}

    @app.get("/api/results")
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
        """The rows of ``xrayage results`` (the same columns), newest first; each page is
        audited as a disclosure of patient data."""
        query = ResultsQuery(
            since=_utc(since), until=_utc(until), state=state, patient_id=patient_id,
            model=model, limit=limit, before_id=before_id,
        )  # fmt: skip
        with db.session() as s:
            rows = export(s, query, actor, None)
            return {
                "columns": list(RESULT_COLUMNS),
                "results": [{k: plain(v) for k, v in r.values.items()} for r in rows],
                "next": next_url(request, rows, limit),
            }

    @app.get("/api/validation")
    def validation_figures(actor: Caller) -> dict[str, Any]:
        """The model's agreement with this site's chronological ages (``xrayage validation``)."""
        if validation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no [model] weights configured")
        with db.session() as s:
            record_event(s, "audit-query", actor=actor, detail="validation figures")
        return {
            "model": {"name": validation.card.name, "sha256": validation.card.sha256},
            "reference": validation.reference(),
            "window_days": validation.cfg.window_days,
            "rolling": [a.as_dict() for a in validation.rolling()],
            "months": [a.as_dict() for a in validation.monthly()],
        }

    @app.get("/api/instances")
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
                s,
                "audit-query",
                actor=actor,
                detail=f"instance states: state={which}; {len(rows)} rows",
            )
            return {
                "counts": {k.value: v for k, v in counts.items()},
                "instances": [r.values for r in rows],
                "next": next_url(request, rows, limit),
            }

    return app


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Query times without a zone are UTC, like the log; one whose offset takes it past the
    calendar's edge is the caller's error (422), not the server's."""
    if value is None or value.tzinfo is None:
        return None if value is None else value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise HTTPException(
            422, f"{value.isoformat()} is outside the calendar"
        ) from None


class HttpServer:
    """uvicorn on its own thread, inside the node's process."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, name="xrayage-http", daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:  # a port already in use ends the thread at once
            if not self.thread.is_alive():
                config = self.server.config
                raise CannotListen(
                    f"[http] port = {config.port}: cannot listen on {config.host}:{config.port}"
                )
            time.sleep(0.05)
        log.info("HTTP on %s:%d", self.server.config.host, self.server.config.port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def problems(self) -> list[str]:
        return []
