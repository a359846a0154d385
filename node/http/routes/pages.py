"""The status page and the dashboard's page, and their scripts (no inline script: the
Content-Security-Policy allows scripts from the node only)."""

from importlib.resources import files

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import HTMLResponse, Response

WEB = files("node.http") / "web"
PAGE = (WEB / "index.html").read_text()
DASHBOARD = (WEB / "dashboard.html").read_text()
SCRIPTS = {name: (WEB / f"{name}.js").read_text() for name in ("common", "index", "dashboard")}


def routes() -> APIRouter:
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @router.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> str:
        return DASHBOARD

    @router.get("/web/{name}.js")
    def script(name: str) -> Response:
        if name not in SCRIPTS:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no script {name!r}")
        return Response(SCRIPTS[name], media_type="text/javascript")

    return router
