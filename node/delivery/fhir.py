"""FHIR R4 delivery: each result's Observation by a conditional create (FHIR R4 3.1.0.8.1,
``If-None-Exist``) on its identifier, the SR's UID, so a resend after a lost answer makes no
second Observation.

- 201 (created) or 200 (it was there already): delivered.
- 4xx: the server refused the resource; the delivery fails at once with the
  OperationOutcome's diagnostics (no resend can change the answer), except 408 and 429.
- 5xx, 408, 429, a timeout or no connection: retried under ``[delivery]``.
"""

from __future__ import annotations

from pathlib import Path

import requests
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydantic import ValidationError

from node.config import Destination
from node.delivery.sender import Refused, one_by_one
from node.delivery.session import http_session
from node.report.fhir import read_observation

FHIR_JSON = "application/fhir+json"
_RETRIED = (408, 429)
BODY_LIMIT = 1024 * 1024  # bytes of an answer read: an OperationOutcome is a few hundred


class FhirSender:
    def __init__(self, dest: Destination, timeout: float) -> None:
        assert dest.fhir_url is not None
        self.url = dest.fhir_url.rstrip("/") + "/Observation"
        self.session = http_session(dest)
        self.timeout = timeout

    def send(self, paths: list[Path]) -> list[str | None]:
        return one_by_one(paths, self._create)

    def _create(self, path: Path) -> str | None:
        observation = read_observation(path)
        identifier = observation.identifier[0]  # type: ignore[index]
        try:
            response = self.session.post(
                self.url,
                data=path.read_bytes(),
                headers={
                    "Content-Type": FHIR_JSON,
                    "Accept": FHIR_JSON,
                    "If-None-Exist": f"identifier={identifier.system}|{identifier.value}",
                    "Prefer": "return=minimal",
                },
                timeout=self.timeout,
                stream=True,  # read no more of the answer than BODY_LIMIT
            )
            with response:
                body = response.raw.read(BODY_LIMIT, decode_content=True)
        except (requests.RequestException, OSError) as e:
            return f"FHIR {self.url}: {type(e).__name__}: {e}"
        if response.status_code in (200, 201):
            return None
        why = f"FHIR {self.url}: HTTP {response.status_code}"
        outcome = _diagnostics(body)
        if outcome:
            why += f": {outcome}"
        if 400 <= response.status_code < 500 and response.status_code not in _RETRIED:
            return Refused(why)
        return why


def _diagnostics(body: bytes) -> str:
    """The OperationOutcome's issues, one clause each, or '' when the body is none."""
    try:
        outcome = OperationOutcome.model_validate_json(body)
    except (ValidationError, ValueError):
        return ""
    return "; ".join(
        f"{issue.severity} {issue.code}: {issue.diagnostics or getattr(issue.details, 'text', '')}"
        for issue in outcome.issue
    )[:500]
