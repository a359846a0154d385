"""The shape of the node: each role composes only its parts from the one table, the parts get
their own config sections, the folders import only what the architecture allows, and report
building is pure (built objects, nothing stored or recorded)."""

from __future__ import annotations

import ast
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from ai.presets import model_card
from node.audit.atna import SyslogExporter
from node.config import ReportSection, load_settings
from node.delivery.cstore import CStoreSender
from node.delivery.deliverer import Deliverer
from node.delivery.stow import StowSender
from node.dicom.scp import Receiver
from node.http.app import HttpServer
from node.infer.process import InferenceProcess
from node.report.build import build_reports
from node.report.findings import Findings
from node.report.uids import ReportUIDs
from node.schedule import Scheduler
from node.service import NodeService, Role
from storage.tables import DeliveryKind

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    ("role", "parts"),
    [
        ("receive", {Receiver}),
        ("infer", {InferenceProcess}),
        ("deliver", {Deliverer}),
        ("schedule", {SyslogExporter, Scheduler}),
        ("all", {InferenceProcess, Deliverer, SyslogExporter, Receiver, Scheduler, HttpServer}),
    ],
)
def test_each_role_composes_only_its_parts(
    role: Role, parts: set[type], tmp_path: Path, weights: Path
) -> None:
    settings = load_settings(
        None,
        storage={"path": tmp_path},
        model={"weights": str(weights)},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "web", "stow_url": "http://127.0.0.1:1/dicom-web"},
        ],
        audit={"syslog": {"host": "127.0.0.1", "port": 514, "transport": "udp"}},
        http={"port": 1} if role == "all" else {},
    )
    service = NodeService(settings, role)
    try:
        assert {type(part) for part in service.components} == parts
        if role == "all":  # queued images wake the inference process, reports the deliverer
            (receiver,) = [p for p in service.components if isinstance(p, Receiver)]
            (inference,) = [p for p in service.components if isinstance(p, InferenceProcess)]
            (deliverer,) = [p for p in service.components if isinstance(p, Deliverer)]
            receiver.on_queued()
            assert inference.wake.is_set()
            assert deliverer.wake is inference.reported
        for part in service.components:
            if isinstance(part, Deliverer):  # one sender per destination, of its kind
                assert {n: type(s) for n, s in part.senders.items()} == {
                    "pacs": CStoreSender,
                    "web": StowSender,
                }
    finally:
        service.stop()  # never started: each part stops as it is


def _imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
    return found


def test_folders_import_only_what_the_architecture_allows() -> None:
    assert not _imports("ai") & {"node", "storage"}
    assert not _imports("storage") & {"node", "ai"}
    assert not _imports("xrayage") & {"node", "ai", "storage"}  # the leaf every layer imports


def test_every_user_error_is_one_type() -> None:
    """The CLI catches UserError alone: each layer's errors of a user's making derive from it."""
    from ai.card import ModelCardError
    from ai.errors import DownloadError, LabelsError, ModelLoadError, PreprocessError
    from ai.presets import WeightsNotFound
    from node.cli.support import UsageError
    from node.cohort.inputs import CohortError
    from node.config import ConfigError
    from storage.db import DatabaseUnavailable
    from storage.deliveries import NotRetriable
    from storage.locks import FolderInUse
    from storage.schema import SchemaError
    from xrayage.errors import CannotListen, UserError

    for kind in (ModelCardError, DownloadError, LabelsError, ModelLoadError, PreprocessError,
                 WeightsNotFound, UsageError, CohortError, ConfigError, DatabaseUnavailable,
                 FolderInUse, NotRetriable, SchemaError, CannotListen):  # fmt: skip
        assert issubclass(kind, UserError), kind
    assert not issubclass(CohortError, ConfigError)  # a cohort's file is not the node's config


def test_reports_are_built_as_objects_and_nothing_else(
    chest_ds: pydicom.Dataset, weights: Path
) -> None:
    card = model_card(weights)
    header = chest_ds
    uids = ReportUIDs(header.SOPInstanceUID, card.sha256)
    findings = Findings(61.5, 58.0, card)
    both = build_reports(header, findings, ReportSection(), "XRAYAGE").objects
    assert [o.sop_instance_uid for o in both] == [uids.sr_instance, uids.sc_instance]
    sr = pydicom.dcmread(BytesIO(both[0].data))
    assert sr.SOPInstanceUID == uids.sr_instance and sr.StudyInstanceUID == header.StudyInstanceUID
    sr_only = build_reports(
        header, findings, ReportSection(secondary_capture=False), "XRAYAGE"
    ).objects
    assert [(o.kind, o.sop_instance_uid) for o in sr_only] == [(DeliveryKind.SR, uids.sr_instance)]
    ehr = frozenset({DeliveryKind.OBSERVATION, DeliveryKind.ORU})
    every = build_reports(header, findings, ReportSection(secondary_capture=False), "X", ehr)
    assert [(o.kind, o.sop_instance_uid, o.suffix) for o in every.objects[1:]] == [
        (DeliveryKind.OBSERVATION, uids.observation, ".json"),
        (DeliveryKind.ORU, uids.oru, ".hl7"),
    ]
    # No Patient ID: the EHR forms are not made, with the reason; the SR still is.
    anonymous = header.copy()
    del anonymous.PatientID
    nobody = build_reports(anonymous, findings, ReportSection(secondary_capture=False), "X", ehr)
    assert [o.kind for o in nobody.objects] == [DeliveryKind.SR]
    assert all("no Patient ID" in why for why in nobody.unbuilt.values())
    assert set(nobody.unbuilt) == ehr
