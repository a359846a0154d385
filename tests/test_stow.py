"""STOW-RS destinations (dicomweb-client) against Orthanc's DICOMweb plugin: basic auth, a
bearer token checked by a gateway in front of it, and a wrong password that is retried with the
server's answer recorded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from sqlalchemy import select

from storage import AuditEvent, Delivery, DeliveryState, Result
from tests.conftest import node_in_process, require, small_chests, storescu
from tests.servers import DICOMWEB_PLUGIN, Orthanc, free_port, wait_until

USER = ("xrayage", "stow-password-1")
TOKEN = "a-bearer-token-for-the-gateway"


@pytest.fixture(scope="module")
def dicomweb_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require("Orthanc")
    assert Path(DICOMWEB_PLUGIN).exists(), "install orthanc-dicomweb: bash .ci/run"
    pacs = Orthanc(tmp_path_factory.mktemp("web-pacs"), free_port(), free_port(), auth=USER)
    pacs.start(allowed={}, dicomweb=True)
    yield pacs
    pacs.stop()


def _node(tmp_path: Path, weights: Path, **destination: str) -> Any:
    return node_in_process(
        tmp_path,
        model={"weights": str(weights), "device": "cpu"},
        report={"secondary_capture": False},
        delivery={"retry_initial_seconds": 1, "retry_max_seconds": 2, "timeout_seconds": 10},
        destinations=[destination],
    )


def _basic_auth_node(tmp_path: Path, weights: Path, pacs: Orthanc, password: str) -> Any:
    return _node(
        tmp_path, weights, name="web", stow_url=pacs.dicomweb, username=USER[0], password=password
    )


def _sent_and_delivered(service: Any, image: Path) -> tuple[Result, list[Delivery]]:
    assert storescu(service.settings.node.port, image).returncode == 0

    def settled() -> list[Delivery] | None:
        with service.db.session() as s:
            rows = list(s.scalars(select(Delivery)))
        return rows if rows and all(d.attempts for d in rows) else None

    rows = wait_until(settled, 120, "a delivery attempt")
    with service.db.session() as s:
        return s.scalars(select(Result)).one(), rows


def test_stow_rs_with_basic_auth_stores_the_sr_in_orthanc(
    tmp_path: Path, weights: Path, chest_ds: pydicom.Dataset, dicomweb_pacs: Orthanc
) -> None:
    [image] = small_chests(chest_ds, tmp_path / "images", 1)
    with _basic_auth_node(tmp_path, weights, dicomweb_pacs, USER[1]) as service:
        result, [delivery] = _sent_and_delivered(service, image)
    assert delivery.state == DeliveryState.DELIVERED and delivery.attempts == 1
    assert result.sr_sop_instance_uid in dicomweb_pacs.sr_uids()


def test_a_wrong_password_is_retried_with_the_servers_answer(
    tmp_path: Path, weights: Path, chest_ds: pydicom.Dataset, dicomweb_pacs: Orthanc
) -> None:
    [image] = small_chests(chest_ds, tmp_path / "images", 1)
    with _basic_auth_node(tmp_path, weights, dicomweb_pacs, "not-the-password") as service:
        result, [delivery] = _sent_and_delivered(service, image)
        with service.db.session() as s:
            retry = s.scalars(
                select(AuditEvent).where(AuditEvent.event == "delivery-retry")
            ).first()
    assert delivery.state == DeliveryState.PENDING and delivery.last_error == "STOW-RS HTTP 401"
    assert retry is not None and "STOW-RS HTTP 401" in (retry.detail or "")
    assert result.sr_sop_instance_uid not in dicomweb_pacs.sr_uids()


class _Gateway(BaseHTTPRequestHandler):
    """A token-checking proxy in front of Orthanc, as hospitals put one before a PACS."""

    upstream = ""
    seen: list[str | None] = []  # noqa: RUF012  (one gateway per test)

    def do_POST(self) -> None:
        auth = self.headers.get("Authorization")
        self.seen.append(auth)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if auth != f"Bearer {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        answer = requests.post(
            self.upstream + self.path.removeprefix("/dicom-web"),
            data=body,
            headers={
                "Content-Type": self.headers["Content-Type"],
                "Accept": "application/dicom+json",
            },
            auth=USER,
            timeout=30,
        )
        self.send_response(answer.status_code)
        self.send_header(
            "Content-Type", answer.headers.get("Content-Type", "application/dicom+json")
        )
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *_: object) -> None:
        pass


def test_stow_rs_with_a_bearer_token(
    tmp_path: Path, weights: Path, chest_ds: pydicom.Dataset, dicomweb_pacs: Orthanc
) -> None:
    _Gateway.upstream, _Gateway.seen = dicomweb_pacs.dicomweb, []
    gateway = ThreadingHTTPServer(("127.0.0.1", free_port()), _Gateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    [image] = small_chests(chest_ds, tmp_path / "images", 1)
    try:
        url = f"http://127.0.0.1:{gateway.server_port}/dicom-web/studies"  # /studies is optional
        with _node(tmp_path, weights, name="gw", stow_url=url, token=TOKEN) as service:
            result, [delivery] = _sent_and_delivered(service, image)
    finally:
        gateway.shutdown()
        gateway.server_close()
    assert _Gateway.seen == [f"Bearer {TOKEN}"]
    assert delivery.state == DeliveryState.DELIVERED
    assert result.sr_sop_instance_uid in dicomweb_pacs.sr_uids()
