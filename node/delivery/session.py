"""The HTTP session of an HTTP destination (STOW-RS, FHIR): its credentials and TLS trust."""

from __future__ import annotations

from pathlib import Path

import requests
from requests.auth import AuthBase

from node.config import Destination


class BearerFile(AuthBase):
    """A bearer token read from a file at each request, so that a token rotated on disk is
    used from the next request on; an unreadable file fails that request, naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        try:
            token = self.path.read_text().strip()
        except OSError as e:
            raise requests.RequestException(
                f"token_file {self.path} cannot be read: {e.strerror}"
            ) from None
        request.headers["Authorization"] = f"Bearer {token}"
        return request


class _Session(requests.Session):
    """A session whose own CA file wins: plain requests lets ``REQUESTS_CA_BUNDLE`` (set on
    many hosts, often to the system bundle) override ``Session.verify`` (psf/requests issue
    3829), so a destination's ``tls.ca_certificates`` would be ignored there."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str) and verify in (None, True):
            settings["verify"] = self.verify
        return settings


def http_session(dest: Destination) -> requests.Session:
    session = _Session()
    if dest.token:
        session.headers["Authorization"] = f"Bearer {dest.token}"
    elif dest.token_file is not None:
        session.auth = BearerFile(dest.token_file)
    elif dest.username is not None:
        session.auth = (dest.username, dest.password or "")
    if dest.tls is not None and dest.tls.ca_certificates is not None:
        session.verify = str(dest.tls.ca_certificates)
    return session
