"""What every router of the HTTP API shares: the bearer-token caller, paging, query times.

Every ``/api`` route needs ``Authorization: Bearer <token>`` with one of ``[http] tokens``;
the token's name is the actor recorded in the audit log for the query. Lists are newest first
and paged by keyset (``before_id``), which stays fast at millions of rows: each page's
``next`` is the URL of the following one, or null.
"""

import datetime as dt
import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

MAX_PAGE = 1000
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
BeforeId = Annotated[int | None, Query(ge=1, le=2**63 - 1)]  # a database integer
_bearer = HTTPBearer(auto_error=False)


def token_caller(tokens: dict[str, str]) -> Callable[..., str]:
    """The dependency that names the caller (``api:<name>``) by its token, or answers 401."""

    def caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
        given = creds.credentials.encode() if creds else b""
        for name, token in tokens.items():
            if creds and secrets.compare_digest(given, token.encode()):
                return f"api:{name}"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )

    return caller


def next_url(request: Request, rows: list[Any], limit: int) -> str | None:
    """The URL of the page after ``rows`` (which have an ``id``), or None on the last page."""
    if len(rows) < limit:
        return None
    return str(request.url.include_query_params(before_id=rows[-1].id))


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Query times without a zone are UTC, like the log; one whose offset takes it past the
    calendar's edge is the caller's error (422), not the server's."""
    if value is None or value.tzinfo is None:
        return None if value is None else value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise HTTPException(422, f"{value.isoformat()} is outside the calendar") from None
