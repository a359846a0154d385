"""The read-only HTTP API, assembled from its routers (:mod:`node.http.routes`, one module per
area), and the server that runs it inside the node's process.

The probes (``/healthz``, ``/readyz``, ``/metrics``) and the pages answer without a token;
everything under ``/api`` and the dashboard's plots need a bearer token of ``[http] tokens``
(:mod:`node.http.routes.common`).
"""

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from node.config import ValidationSection
from node.http.routes import (
    audit,
    dashboard,
    deliveries,
    instances,
    pages,
    probes,
    results,
    validation,
)
from node.http.routes.common import token_caller
from node.results.validation import Validations
from storage import Database
from xrayage.errors import CannotListen

log = logging.getLogger("xrayage.http")
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
    validations: Validations | None = None,
) -> FastAPI:
    """``readiness`` lists what keeps this process from being ready (empty: ready);
    ``child_metrics``: the inference process's metric files, summed into ``/metrics``;
    ``validations``: the active models' agreement figures (none without a model)."""
    figures = validations or Validations(db, ValidationSection(), list)
    # The schema is served behind the token like the rest of /api (route below).
    app = FastAPI(title="xrayage", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def secure_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    caller = token_caller(tokens)
    app.include_router(probes.routes(db, readiness, child_metrics, figures))
    app.include_router(pages.routes())
    app.include_router(dashboard.routes(db, caller, figures))
    app.include_router(audit.routes(db, caller))
    app.include_router(results.routes(db, caller))
    app.include_router(validation.routes(db, caller, figures))
    app.include_router(instances.routes(db, caller))
    app.include_router(deliveries.routes(db, caller))

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(actor: Annotated[str, Depends(caller)]) -> dict[str, Any]:
        return app.openapi()

    return app


LOCAL_TOKEN_FILE = "http-token"


def local_token(folder: Path) -> tuple[dict[str, str], Path]:
    """The token of a node configured with none: made once (32 random bytes, URL-safe) in
    ``folder`` readable by its owner alone, so that serving the pages takes one setting, the
    port. Returns the tokens by name (``local``) and the file."""
    path = folder / LOCAL_TOKEN_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return {"local": path.read_text().strip()}, path


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
