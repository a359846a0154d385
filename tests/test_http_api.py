"""The read-only HTTP API and the status page, on a running node: bearer tokens, paging, the
queries audited, and the page rendered by headless Chromium (Debian chromium, chromium-driver)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import node_in_process, require, small_chests, storescu
from tests.servers import free_port, wait_until

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def node_with_api(tmp_path: Path, chest_ds: pydicom.Dataset, extremity: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    with node_in_process(
        tmp_path, http={"port": port, "tokens": {"radiology": TOKEN}}
    ) as node:  # no model: images are received and queued
        chests = small_chests(chest_ds, tmp_path / "in", 3)
        assert storescu(node.settings.node.port, *chests, extremity).returncode == 0
        yield node, f"http://127.0.0.1:{port}", chests


def _get(url: str, token: str | None = TOKEN, **params: object) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url, headers=headers, params=params, timeout=10)


def test_the_api_needs_a_token_pages_and_audits_its_queries(node_with_api) -> None:  # type: ignore[no-untyped-def]
    _, base, chests = node_with_api
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    assert _get(f"{base}/api/audit", token=None).status_code == 401
    assert _get(f"{base}/api/audit", token="wrong-token-of-some-length").status_code == 401

    patient = str(pydicom.dcmread(chests[0], stop_before_pixels=True).PatientID)
    first = _get(f"{base}/api/audit", patient_id=patient, event="received", limit=2).json()
    assert [e["event"] for e in first["events"]] == ["received", "received"]
    second = requests.get(first["next"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    rest = second.json()
    assert len(rest["events"]) == 1 and rest["next"] is None
    seen = {e["sop_instance_uid"] for e in first["events"] + rest["events"]}
    assert len(seen) == 3

    inst = _get(f"{base}/api/instances").json()
    assert inst["counts"] == {"queued": 3, "skipped": 1}
    assert _get(f"{base}/api/instances", state="nonsense").status_code == 422

    queries = _get(f"{base}/api/audit", event="audit-query").json()["events"]
    assert {q["actor"] for q in queries} == {"api:radiology"}
    assert any("patient_id=" in q["detail"] and "limit=2" in q["detail"] for q in queries)


@contextmanager
def status_page(base: str, token: str, wrong_first: bool = False) -> Iterator[webdriver.Chrome]:
    """The status page in headless Chromium, shown with ``token`` (after a wrong one that it
    must refuse, with ``wrong_first``)."""
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(require("chromedriver")))
    try:
        browser.get(base + "/")
        field = browser.find_element(By.ID, "token")
        if wrong_first:
            field.send_keys("wrong-token-of-some-length")
            browser.find_element(By.CSS_SELECTOR, "#login button").click()
            WebDriverWait(browser, 10).until(
                lambda b: b.find_element(By.ID, "error").text == "token not accepted"
            )
            field.clear()
        field.send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "content").is_displayed())
        yield browser
    finally:
        browser.quit()


def test_the_status_page_lists_events_and_states_in_chromium(node_with_api) -> None:  # type: ignore[no-untyped-def]
    _, base, chests = node_with_api
    with status_page(base, TOKEN, wrong_first=True) as browser:
        rows = browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")
        states = sorted(r.find_elements(By.TAG_NAME, "td")[1].text for r in rows)
        assert states == ["queued", "queued", "queued", "skipped"]
        events = browser.find_element(By.ID, "events").text
        uid = str(pydicom.dcmread(chests[0], stop_before_pixels=True).SOPInstanceUID)
        assert uid in events and "association accepted" in events
        assert "queued: 3" in browser.find_element(By.ID, "counts").text
    wait_until(
        lambda: any(
            e["actor"] == "api:radiology"
            for e in _get(f"{base}/api/audit", event="audit-query").json()["events"]
        ),
        5,
        "the page's queries in the audit log",
    )


def test_abuse_gets_422_and_pages_carry_security_headers(node_with_api) -> None:  # type: ignore[no-untyped-def]
    _, base, _ = node_with_api
    for route in ("/api/audit", "/api/instances", "/api/results"):
        assert _get(f"{base}{route}", before_id=2**70).status_code == 422, route
    for edge in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"):
        answer = _get(f"{base}/api/audit", since=edge)
        assert answer.status_code == 422 and "outside the calendar" in answer.text, edge
    assert _get(f"{base}/api/openapi.json", token=None).status_code == 401
    assert "/api/results" in _get(f"{base}/api/openapi.json").json()["paths"]
    for page in ("/", "/dashboard", "/web/index.js"):
        headers = requests.get(base + page, timeout=10).headers
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'self'
        assert "'unsafe-inline'" not in headers["Content-Security-Policy"].split("style-src")[0]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
    html = requests.get(base + "/", timeout=10).text
    assert "<script>" not in html  # no inline script for the policy to allow
