"""What the radiologist sees: the node's reports in a real web viewer.

Orthanc with its DICOMweb plugin is the PACS; the OHIF Viewer (``@ohif/app`` from the npm
registry, installed by ``.ci/setup``) is served on 127.0.0.1 with ``/dicom-web`` proxied to
Orthanc; headless Chromium opens the study. OHIF 3.13 lists the SR series but draws nothing of a
numeric-only TID 1500 (it skips measurements without SCOORD, logging so); the Secondary Capture
shows the numbers. README "What the radiologist sees" says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from ai.presets import model_card
from node.config import ReportSection
from node.report.build import build_reports
from node.report.findings import Findings
from tests.conftest import require
from tests.servers import OhifServer, Orthanc, free_port

PANE = "[data-cy='viewport-pane']"


@pytest.fixture
def chromium() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1600,1000", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(require("chromedriver")))
    try:
        yield browser
    finally:
        browser.quit()


def _thumbnails(browser: webdriver.Chrome) -> dict[str, WebElement]:
    """The study browser's series, by series number."""
    shown = browser.find_elements(By.CSS_SELECTOR, "[data-cy^='study-browser-thumbnail']")
    return {
        line.removeprefix("S:"): t
        for t in shown
        for line in t.text.splitlines()
        if line.startswith("S:")
    }


def _bright_share(browser: webdriver.Chrome) -> float:
    """The share of near-white pixels in the viewport: text drawn on the image."""
    viewport = browser.find_element(By.CSS_SELECTOR, PANE)
    grey = Image.open(BytesIO(viewport.screenshot_as_png)).convert("L")
    histogram = grey.histogram()
    return sum(histogram[200:]) / max(1, sum(histogram))


def test_ohif_shows_the_summary_image_and_lists_the_sr(
    tmp_path: Path, chest_pa: Path, weights: Path, chromium: webdriver.Chrome
) -> None:
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    pacs.start({}, dicomweb=True)
    viewer = None
    try:
        header = pydicom.dcmread(chest_pa)
        header.PatientAge = "061Y"
        findings = Findings(55.3, 61.0, model_card(weights))
        pacs.upload(chest_pa)
        for obj in build_reports(header, findings, ReportSection(), "XRAYAGE").objects:
            path = tmp_path / f"{obj.kind}.dcm"
            path.write_bytes(obj.data)
            pacs.upload(path)
        viewer = OhifServer(pacs.dicomweb).start()
        chromium.get(f"{viewer.url}/viewer?StudyInstanceUIDs={header.StudyInstanceUID}")
        series = WebDriverWait(chromium, 60).until(
            lambda b: found if len(found := _thumbnails(b)) == 3 else None
        )
        assert series["1"].text.startswith("CR")
        assert series["9902"].text.startswith("OT")  # the Secondary Capture
        assert series["9901"].text.startswith("SR")
        for number in ("9901", "9902"):
            assert "X-ray age - AI, UNTRAINED DEMO WEIGHTS" in series[number].text
        for label in ("Skip all", "Confirm and hide"):  # the first-visit tour and banner
            for button in chromium.find_elements(By.XPATH, f"//*[text()='{label}']"):
                button.click()

        ActionChains(chromium).double_click(series["9902"]).perform()
        viewport = WebDriverWait(chromium, 30).until(
            lambda b: v
            if "UNTRAINED DEMO WEIGHTS" in (v := b.find_element(By.CSS_SELECTOR, PANE)).text
            else None
        )  # fmt: skip
        WebDriverWait(chromium, 30).until(lambda b: _bright_share(b) > 0.02)
        assert "X-ray age - AI" in viewport.text  # the overlay names the SC's series
        chromium.save_screenshot(str(tmp_path / "ohif-sc.png"))

        ActionChains(chromium).double_click(series["9901"]).perform()
        time.sleep(3)  # OHIF loads the SR and decides what to draw of it
        chromium.save_screenshot(str(tmp_path / "ohif-sr.png"))
        logs = chromium.get_log("browser")
        assert [e for e in logs if e["level"] == "SEVERE"] == []  # no script errors
        skipped = [e for e in logs if "no SCOORD or SCOORD3D entry" in e["message"]]
        assert skipped, "OHIF drew the SR: README 'What the radiologist sees' is out of date"
    finally:
        if viewer is not None:
            viewer.stop()
        pacs.stop()
