"""DICOM TLS with certificates made here by openssl: DCMTK's storescu sends to the node over TLS,
with and without a client certificate, and the node delivers its SR over mutual TLS to DCMTK's
storescp."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from node.service import NodeService
from storage import AuditEvent, Delivery, DeliveryState, Instance
from tests.conftest import STORESCU, node_in_process, require
from tests.servers import _stop, free_port, wait_until

STORESCP = "/usr/bin/storescp"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(folder: Path, name: str, ca: str | None, san: str = "") -> tuple[Path, Path]:
    """A key and certificate; signed by the CA named ``ca`` (self-signed when None)."""
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    subject = ["-subj", f"/CN={name}"]
    if ca is None:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", *subject,
                 "-keyout", str(key), "-out", str(crt),
                 "-addext", "basicConstraints=critical,CA:TRUE")  # fmt: skip
        return key, crt
    csr = folder / f"{name}.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", *subject, "-keyout", str(key),
             "-out", str(csr))  # fmt: skip
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(folder / f"{ca}.crt"),
             "-CAkey", str(folder / f"{ca}.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return key, crt


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openssl")
    folder = tmp_path_factory.mktemp("pki")
    _issue(folder, "ca", None)
    _issue(folder, "node", "ca", san="IP:127.0.0.1,DNS:localhost")
    _issue(folder, "pacs", "ca", san="IP:127.0.0.1,DNS:localhost")
    _issue(folder, "modality", "ca")
    _issue(folder, "rogue", None)  # self-signed: no CA of ours vouches for it
    return folder


@contextmanager
def tls_node(tmp_path: Path, pki: Path, **overrides: object) -> Iterator[NodeService]:
    tls = {"certificate": pki / "node.crt", "private_key": pki / "node.key",
           "ca_certificates": pki / "ca.crt", **overrides.pop("tls", {})}  # type: ignore[dict-item]  # fmt: skip
    with node_in_process(tmp_path, node={"tls": tls}, **overrides) as service:
        yield service


def storescu_tls(
    port: int, file: Path, pki: Path, *identity: str
) -> subprocess.CompletedProcess[str]:
    """``identity``: ``+tls KEY CERT`` for a client certificate, or ``+tla`` for none."""
    require(STORESCU)
    return subprocess.run(
        [STORESCU, *identity, "+cf", str(pki / "ca.crt"), "-aet", "MODALITY", "-aec", "XRAYAGE",
         "127.0.0.1", str(port), str(file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _stored(service: NodeService) -> int:
    with service.db.session() as s:
        return len(s.scalars(select(Instance)).all())


def test_storescu_over_tls_is_stored_and_plain_tcp_is_not(
    tmp_path: Path, pki: Path, chest_pa: Path
) -> None:
    with tls_node(tmp_path, pki) as node:
        port = node.settings.node.port
        out = storescu_tls(port, chest_pa, pki, "+tla")
        assert out.returncode == 0, out.stderr
        assert _stored(node) == 1
        plain = subprocess.run(
            [STORESCU, "-aec", "XRAYAGE", "127.0.0.1", str(port), str(chest_pa)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert plain.returncode != 0


def test_mutual_tls_accepts_our_cas_clients_only(tmp_path: Path, pki: Path, chest_pa: Path) -> None:
    with tls_node(tmp_path, pki, tls={"require_client_certificate": True}) as node:
        port = node.settings.node.port
        assert storescu_tls(port, chest_pa, pki, "+tla").returncode != 0
        rogue = ("+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"))
        assert storescu_tls(port, chest_pa, pki, *rogue).returncode != 0
        assert _stored(node) == 0
        modality = ("+tls", str(pki / "modality.key"), str(pki / "modality.crt"))
        out = storescu_tls(port, chest_pa, pki, *modality)
        assert out.returncode == 0, out.stderr
        assert _stored(node) == 1
        with node.db.session() as s:
            refused = s.scalars(
                select(AuditEvent.detail).where(AuditEvent.outcome == "failure")
            ).all()
        assert len(refused) == 2 and all("TLS handshake failed" in (d or "") for d in refused)


def test_reports_are_delivered_over_mutual_tls(
    tmp_path: Path, pki: Path, chest_pa: Path, weights: Path
) -> None:
    require(STORESCP)
    received = tmp_path / "received"
    received.mkdir()
    pacs_port = free_port()
    # storescp verifies the node's client certificate (+rv is its default with +tls).
    pacs = subprocess.Popen(
        [STORESCP, "+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"), "+cf", str(pki / "ca.crt"),
         "-aet", "PACS", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = {"ca_certificates": pki / "ca.crt", "certificate": pki / "node.crt",
              "private_key": pki / "node.key"}  # fmt: skip
    try:
        with tls_node(
            tmp_path,
            pki,
            model={"weights": str(weights), "device": "cpu"},
            report={"secondary_capture": False},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                           "port": pacs_port, "tls": client}],
        ) as node:  # fmt: skip
            assert storescu_tls(node.settings.node.port, chest_pa, pki, "+tla").returncode == 0

            def delivered() -> bool:
                with node.db.session() as s:
                    d = s.scalars(select(Delivery)).first()
                    return d is not None and d.state == DeliveryState.DELIVERED

            wait_until(delivered, 120, "the SR delivered over TLS")
        assert [p.name[:2] for p in received.iterdir()] == ["SR"]
    finally:
        _stop(pacs)


def test_unreadable_tls_files_are_a_one_line_config_error(tmp_path: Path, pki: Path) -> None:
    from tests.test_cli import run

    config = tmp_path / "xrayage.toml"
    config.write_text(
        f'[storage]\npath = "{tmp_path / "data"}"\n[node]\nport = {free_port()}\n'
        f'[node.tls]\ncertificate = "{pki / "node.crt"}"\nprivate_key = "{tmp_path / "none.key"}"\n'
    )
    out = run("serve", "--config", str(config))
    assert out.returncode == 2
    assert out.stderr.startswith("xrayage: error: TLS: cannot load") and out.stderr.count("\n") == 1
