"""Delivery when the PACS is away: retries with back-off until it is back, a visible ``failed``
state when the attempts run out, and ``xrayage retry`` to send again once the cause is fixed."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from selenium.webdriver.common.by import By
from sqlalchemy import func, select

from node.config import load_settings
from node.service import NodeService
from storage import AuditEvent, Delivery, DeliveryState, Instance, InstanceState
from tests.conftest import node_config, require, small_chests, storescu
from tests.servers import Orthanc, free_port, wait_until
from tests.test_cli import run
from tests.test_http_api import status_page

OUTAGE_SECONDS = 60


@contextmanager
def node_for(config: Path) -> Iterator[NodeService]:
    service = NodeService(load_settings(config))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _pacs_and_node_config(
    tmp_path: Path, weights: Path, delivery: str
) -> tuple[Orthanc, int, Path]:
    """An Orthanc (not started), and the config of a node that delivers SRs only to it."""
    require("Orthanc")
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    port = free_port()
    config = node_config(
        tmp_path, port, weights, pacs, delivery=delivery, report="secondary_capture = false"
    )
    return pacs, port, config


def deliveries(service: NodeService) -> list[Delivery]:
    with service.db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def send_while_pacs_is_away(service: NodeService, port: int, images: list[Path]) -> None:
    """Send ``images`` and wait until each report's first delivery attempt has failed."""
    assert storescu(port, *images).returncode == 0
    wait_until(
        lambda: len(rows := deliveries(service)) == len(images) and all(d.attempts for d in rows),
        120,
        f"a failed first attempt for each of the {len(images)} reports",
    )


def test_a_pacs_down_for_a_minute_gets_every_report_once_when_back(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    pacs, port, config = _pacs_and_node_config(
        tmp_path,
        weights,
        "retry_initial_seconds = 2\nretry_max_seconds = 8\nmax_attempts = 100\ntimeout_seconds = 2",
    )
    pacs.start(allowed={"XRAYAGE": "xrayage"})
    pacs.stop()
    stopped = time.monotonic()
    images = small_chests(chest_ds, tmp_path / "images", 20)
    try:
        with node_for(config) as service:
            send_while_pacs_is_away(service, port, images)
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
            pacs.start(allowed={"XRAYAGE": "xrayage"})
            wait_until(
                lambda: all(d.state == DeliveryState.DELIVERED for d in deliveries(service)),
                60,
                "all 20 deliveries",
            )
            rows = deliveries(service)
            assert sorted(pacs.sr_uids()) == sorted(d.sop_instance_uid for d in rows)
            assert all(d.attempts >= 2 for d in rows)  # retried, not lucky
            with service.db.session() as s:
                delivered = s.scalar(
                    select(func.count()).where(AuditEvent.event == "delivered")
                )  # fmt: skip
                retried = s.scalar(
                    select(func.count()).where(AuditEvent.event == "delivery-retry")
                )  # fmt: skip
            assert delivered == 20  # each report sent successfully exactly once
            assert retried and retried >= 20
    finally:
        pacs.stop()


def test_a_failed_delivery_is_listed_and_sent_again_by_xrayage_retry(
    tmp_path: Path, chest_pa: Path, weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pacs, port, config = _pacs_and_node_config(
        tmp_path, weights, "max_attempts = 1\ntimeout_seconds = 2"
    )  # the PACS is not started yet
    try:
        with node_for(config) as service:
            assert storescu(port, chest_pa).returncode == 0
            wait_until(
                lambda: [d for d in deliveries(service) if d.state == DeliveryState.FAILED],
                120,
                "the delivery to fail",
            )
            with service.db.session() as s:
                inst = s.scalars(select(Instance)).one()
                assert inst.state == InstanceState.FAILED
                assert (inst.reason or "").startswith("delivery to pacs failed")
            [failed] = deliveries(service)
            gave_up = [r for r in caplog.records if "gave up" in r.getMessage()]
            assert [r.levelno for r in gave_up] == [logging.WARNING]  # not in the audit alone
            assert f"xrayage retry {failed.id}" in gave_up[0].getMessage()

            listing = run("retry", "--config", str(config))
            assert listing.returncode == 0
            assert str(failed.sop_instance_uid) in listing.stdout
            assert "xrayage retry ID" in listing.stdout

            wrong = run("retry", "999", "--config", str(config))
            assert (wrong.returncode, wrong.stderr) == (
                2,
                "xrayage: error: no delivery with ID 999\n",
            )

            pacs.start(allowed={"XRAYAGE": "xrayage"})
            again = run("retry", "--all-failed", "--config", str(config))
            assert again.returncode == 0 and again.stdout.startswith("queued 1 deliveries")
            wait_until(
                lambda: deliveries(service)[0].state == DeliveryState.DELIVERED,
                60,
                "the delivery queued again",
            )
            assert pacs.sr_uids() == [failed.sop_instance_uid]
            with service.db.session() as s:
                assert s.scalars(select(Instance)).one().state == InstanceState.DELIVERED
                audit = s.scalars(
                    select(AuditEvent).where(AuditEvent.actor.startswith("cli:"))
                ).one()
            assert audit.event == "delivery-retry" and "queued again" in (audit.detail or "")
            assert run("retry", str(failed.id), "--config", str(config)).stderr == (
                f"xrayage: error: delivery {failed.id} is delivered, not failed\n"
            )
    finally:
        pacs.stop()


def test_a_damaged_report_file_fails_its_own_delivery_and_the_others_arrive(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    """Two SR files are damaged on the node's disk (one cut short, one gone) while their
    deliveries wait for the PACS: those two end `failed` at once with the reason, their attempt
    counted and audited; the other reports arrive within seconds of the PACS's return."""
    pacs, port, config = _pacs_and_node_config(
        tmp_path, weights,
        "retry_initial_seconds = 1\nretry_max_seconds = 2\nmax_attempts = 100\ntimeout_seconds = 2",
    )  # fmt: skip
    images = small_chests(chest_ds, tmp_path / "images", 6)
    try:
        with node_for(config) as service:
            send_while_pacs_is_away(service, port, images)
            cut, gone, *others = deliveries(service)
            Path(cut.path).write_bytes(Path(cut.path).read_bytes()[:200])
            Path(gone.path).unlink()
            pacs.start(allowed={"XRAYAGE": "xrayage"})
            back = time.monotonic()
            wait_until(
                lambda: all(
                    d.state == DeliveryState.DELIVERED for d in deliveries(service)[2:]
                ),
                30,
                "the 4 undamaged reports",
            )
            assert time.monotonic() - back < 15  # no round waited out a lease
            assert sorted(pacs.sr_uids()) == sorted(d.sop_instance_uid for d in others)
            rows = {d.id: d for d in deliveries(service)}
            for damaged in (cut, gone):
                row = rows[damaged.id]
                assert row.state == DeliveryState.FAILED
                assert row.attempts == damaged.attempts + 1  # counted once, not retried
                assert f"report file {damaged.path} cannot be read" in (row.last_error or "")
            with service.db.session() as s:
                failed = s.scalars(
                    select(AuditEvent).where(
                        AuditEvent.event == "failed", AuditEvent.outcome == "failure"
                    )
                ).all()
                states = {i.sop_instance_uid: i.state for i in s.scalars(select(Instance))}
            assert len(failed) == 2 and all("cannot be read" in (e.detail or "") for e in failed)
            assert list(states.values()).count(InstanceState.FAILED) == 2
    finally:
        pacs.stop()


def test_each_destination_gets_the_kinds_it_takes(tmp_path: Path) -> None:
    """`send` on a destination: the SR and SC by default, or what it lists; each delivery
    names its kind."""
    from storage import Database, DeliveryKind, Result
    from storage.deliveries import StoredObject
    from storage.results import record_reports

    settings = load_settings(
        None,
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "viewer", "ae_title": "VIEW", "host": "127.0.0.1", "port": 105,
             "send": ["sc"]},
        ],
    )  # fmt: skip
    takes = {d.name: d.takes for d in settings.destinations}
    assert takes == {"pacs": {DeliveryKind.SR, DeliveryKind.SC}, "viewer": {DeliveryKind.SC}}
    with pytest.raises(Exception, match="send"):
        load_settings(None, destinations=[{"name": "x", "stow_url": "http://h", "send": ["pdf"]}])
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    with db.session() as s:
        inst = Instance(sop_instance_uid="1.2", sop_class_uid="1.2", path="x", sha256="0",
                        size=0, state=InstanceState.INFERRED)  # fmt: skip
        s.add(inst)
        s.flush()
        s.add(Result(instance_id=inst.id, model_name="m", model_version="1", model_sha256="m",
                     xray_age=60.0))  # fmt: skip
        objects = [StoredObject(DeliveryKind.SR, "9.1", "sr.dcm"),
                   StoredObject(DeliveryKind.SC, "9.2", "sc.dcm")]  # fmt: skip
        record_reports(s, inst, "m", objects, takes)
    with db.session() as s:
        sent = {(d.destination, d.kind, d.sop_instance_uid) for d in s.scalars(select(Delivery))}
    assert sent == {("pacs", "sr", "9.1"), ("pacs", "sc", "9.2"), ("viewer", "sc", "9.2")}
    db.dispose()


def test_a_destination_whose_name_does_not_resolve_fails_alone_with_its_reason(
    tmp_path: Path, chest_pa: Path, weights: Path
) -> None:
    """Beside a working PACS, a destination named by a host that does not resolve: its
    deliveries fail attempt by attempt with the resolver's reason, then give up (listed by
    `xrayage retry`); `/readyz` and `/api/destinations` name it; the PACS gets its SR at once."""
    require("Orthanc")
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    port, http = free_port(), free_port()
    token = "destinations-token-for-tests"
    config = node_config(
        tmp_path, port, weights, pacs,
        delivery="retry_initial_seconds = 2\nretry_max_seconds = 2\nmax_attempts = 5\n"
        "timeout_seconds = 2",
        report="secondary_capture = false",
    )  # fmt: skip
    with config.open("a") as f:
        f.write(
            '\n[[destinations]]\nname = "nowhere"\nae_title = "NOWHERE"\n'
            'host = "no-such-host.invalid"\nport = 104\n'
            f'\n[http]\nport = {http}\ntokens = {{ ops = "{token}" }}\n'
        )
    pacs.start(allowed={"XRAYAGE": "xrayage"})
    try:
        with node_for(config) as service:
            assert storescu(port, chest_pa).returncode == 0
            wait_until(
                lambda: [d.state for d in deliveries(service) if d.destination == "pacs"]
                == [DeliveryState.DELIVERED],
                60, "the SR in the working PACS",
            )  # fmt: skip
            assert pacs.sr_uids() != []
            wait_until(
                lambda: any(d.attempts for d in deliveries(service) if d.destination == "nowhere"),
                60, "a failed attempt to nowhere",
            )  # fmt: skip
            ready = requests.get(f"http://127.0.0.1:{http}/readyz", timeout=5)
            assert ready.status_code == 503 and "destination nowhere failing" in ready.text
            listed = requests.get(
                f"http://127.0.0.1:{http}/api/destinations",
                headers={"Authorization": f"Bearer {token}"}, timeout=5,
            ).json()["destinations"]  # fmt: skip
            named = {d["name"]: d for d in listed}
            assert named["pacs"]["failing"] is None and named["pacs"]["counts"] == {"delivered": 1}
            assert named["pacs"]["kinds"] == ["sr"]
            assert "no-such-host.invalid" in named["nowhere"]["failing"]
            with status_page(f"http://127.0.0.1:{http}", token) as browser:
                rows = browser.find_elements(By.CSS_SELECTOR, "#destinations tbody tr")
                shown = {r.find_elements(By.TAG_NAME, "td")[0].text: r.text for r in rows}
            assert "does not resolve" in shown["nowhere"] and "resolve" not in shown["pacs"]
            wait_until(
                lambda: [d.state for d in deliveries(service) if d.destination == "nowhere"]
                == [DeliveryState.FAILED],
                60, "nowhere to give up",  # 4 waits of 1 to 2 s
            )  # fmt: skip
            (gone,) = [d for d in deliveries(service) if d.destination == "nowhere"]
            assert gone.attempts == 5 and "no-such-host.invalid" in (gone.last_error or "")
            listing = run("retry", "--config", str(config))
            assert listing.returncode == 0 and "nowhere" in listing.stdout
    finally:
        pacs.stop()
