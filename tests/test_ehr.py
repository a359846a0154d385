"""Results to the EHR: the FHIR R4 Observation and the HL7 v2.5.1 ORU^R01, to a real FHIR server
(sekmet-fhir, with SQLite) and a real MLLP listener (hl7apy's), with routing per destination.

Each bad answer gets its test: a refusal with an OperationOutcome (4xx), an AR, a server that
hangs, a closed port.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import hl7
import pydicom
import pytest
import requests
from fhir.resources.R4B.observation import Observation

from ai.card import ModelCard
from node.config import Destination
from node.delivery.fhir import FhirSender
from node.delivery.mllp import MllpSender
from node.delivery.routes import ImageFacts, route
from node.delivery.sender import Refused
from node.report.fhir import CODE_SYSTEM, build_observation, encode_observation
from node.report.findings import Findings
from node.report.hl7 import build_oru, control_id, encode_oru, parse
from node.report.uids import ReportUIDs
from storage.tables import DeliveryKind
from tests.conftest import node_config, small_chests, storescu
from tests.servers import FhirServer, MllpListener, NodeProcess, free_port, wait_until
from tests.test_cli import run
from tests.test_tls import pki  # noqa: F401 - the fixture

TRAINED = ModelCard(name="seresnet-test", version="2", sha256="ab" * 32, gap_correction=(0.1, -3))
OPS = "ehr-test-ops-token-0123"
UNTRAINED = ModelCard(name="demo", version="0", sha256="cd" * 32, untrained=True)


@pytest.fixture(scope="module")
def fhir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    server = FhirServer(tmp_path_factory.mktemp("fhir"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def header(chest_ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = chest_ds.copy()
    ds.AccessionNumber, ds.PatientAge, ds.StudyTime = "ACC-7", "061Y", "101500"
    return ds


def _stored(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def test_the_observation_is_fhir_r4_and_says_what_it_is(header: pydicom.Dataset) -> None:
    uids = ReportUIDs(header.SOPInstanceUID, TRAINED.sha256)
    obs = build_observation(
        header, Findings(55.25, 61.0, TRAINED), uids.sr_instance, "urn:oid:1.2.36.1"
    )
    data = json.loads(encode_observation(obs))
    assert Observation.model_validate(data) == obs  # what is stored reads back the same
    assert data["status"] == "preliminary"
    assert data["category"][0]["coding"][0]["code"] == "imaging"
    (code,) = data["code"]["coding"]
    assert (code["system"], code["code"]) == (CODE_SYSTEM, "XA-001")
    assert "frontal chest radiograph" in code["display"]
    assert data["valueQuantity"] == {
        "value": 55.25, "unit": "year", "system": "http://unitsofmeasure.org", "code": "a",
    }  # fmt: skip
    parts = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in data["component"]}
    assert parts == {"30525-0": 61.0, "XA-002": -5.75, "XA-003": pytest.approx(-8.85)}
    assert data["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{uids.sr_instance}"}
    ]
    assert data["subject"]["identifier"] == {"system": "urn:oid:1.2.36.1", "value": "9RG1"}
    study = data["derivedFrom"][0]
    assert study["type"] == "ImagingStudy"
    assert study["identifier"]["value"] == f"urn:oid:{header.StudyInstanceUID}"
    assert data["effectiveDateTime"].startswith("2004-08-26T10:15:00")
    (device,) = data["contained"]
    assert device["deviceName"][0]["name"] == "seresnet-test" and data["device"] == {
        "reference": "#model"
    }
    assert device["identifier"][0]["value"] == TRAINED.sha256
    assert data["meta"]["security"][0]["code"] == "AIAST"
    assert "note" not in data
    demo = build_observation(header, Findings(50.0, None, UNTRAINED), uids.sr_instance, None)
    assert "UNTRAINED" in demo.note[0].text and demo.component is None  # type: ignore[index]
    assert demo.subject.identifier.system is None  # type: ignore[union-attr]


def test_the_oru_escapes_what_a_sender_wrote_and_keeps_its_control_id(
    header: pydicom.Dataset,
) -> None:
    header.PatientName = "O'Brien|X^Ann&Marie\rOBX|9|NM|EVIL"
    header.PatientID = "ID~1&2^3"
    uids = ReportUIDs(header.SOPInstanceUID, TRAINED.sha256)
    findings = Findings(55.25, 61.0, TRAINED)
    message = build_oru(header, findings, uids.oru, "XRAYAGE", "General")
    assert message.validate()  # hl7apy, strict: every segment where ORU_R01 wants it
    er7 = encode_oru(message)
    # Another library parses it the same: five segment kinds, no injected OBX.
    parsed = hl7.parse(er7.decode())
    names = [str(seg[0]) for seg in parsed]
    assert names == ["MSH", "PID", "OBR", "OBX", "OBX", "OBX", "OBX", "OBX", "NTE"]
    assert parsed.unescape(parsed["PID.F3.R1.C1"]) == "ID~1&2^3"
    assert parsed.unescape(parsed["PID.F5.R1.C1"]) == "O'Brien|X"
    assert parsed.unescape(parsed["PID.F5.R1.C2"]) == "Ann&Marie OBX|9|NM|EVIL"
    assert parsed["OBR.F3"] == "ACC-7" and parsed["OBR.F25"] == "P"
    obx = [str(seg) for seg in parsed.segments("OBX")]
    assert obx[0].startswith("OBX|1|NM|XA-001^") and "|55.25|a^year^UCUM|" in obx[0]
    assert "|30525-0^Age^LN||61.00|" in obx[1] and "|-5.75|" in obx[2]
    assert all(o.split("|")[11] == "P" for o in obx)
    assert f"|{header.StudyInstanceUID}|" in obx[4]
    # The same result, built again (a rebuild after a crash): the same control ID.
    again = build_oru(header, findings, uids.oru, "XRAYAGE", "General")
    assert again.msh.msh_10.value == message.msh.msh_10.value == control_id(uids.oru)
    other = ReportUIDs(header.SOPInstanceUID, UNTRAINED.sha256).oru
    assert control_id(other) != control_id(uids.oru)
    assert len(control_id(other)) == 20
    assert "UNTRAINED" in encode_oru(
        build_oru(header, Findings(50.0, None, UNTRAINED), other, "XRAYAGE", None)
    ).decode()


class Silent:
    """A TCP server that accepts connections and never answers: a hung server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_fhir_delivery_creates_once_and_tells_refusals_from_outages(
    fhir: FhirServer, header: pydicom.Dataset, tmp_path: Path
) -> None:
    uids = ReportUIDs(header.SOPInstanceUID, TRAINED.sha256)
    obs = build_observation(header, Findings(55.25, 61.0, TRAINED), uids.sr_instance, None)
    path = _stored(tmp_path, "obs.json", encode_observation(obs))
    token = _stored(tmp_path, "token", f"{fhir.token}\n".encode())
    sender = FhirSender(Destination(name="ehr", fhir_url=fhir.url, token_file=token), 5)
    assert sender.send([path]) == [None]
    assert sender.send([path]) == [None]  # a resend: the conditional create finds it
    found = fhir.search("Observation", identifier=f"urn:dicom:uid|urn:oid:{uids.sr_instance}")
    assert len(found) == 1 and found[0]["valueQuantity"]["value"] == 55.25

    # Two Observations in the EHR already carry the identifier: 412 with an OperationOutcome.
    taken = ReportUIDs("1.2.3.4", TRAINED.sha256).sr_instance
    clash = json.loads(encode_observation(obs))
    clash["identifier"][0]["value"] = f"urn:oid:{taken}"
    for _ in range(2):
        assert fhir.post(clash).status_code == 201
    (error,) = sender.send([_stored(tmp_path, "clash.json", json.dumps(clash).encode())])
    assert isinstance(error, Refused), error
    assert "HTTP 412" in error and "multiple-matches" in error and "matched 2" in error

    # A token the server does not know: 401 with its OperationOutcome, no retry.
    token.write_text("rotated-but-wrong")
    (error,) = sender.send([path])
    assert isinstance(error, Refused) and "HTTP 401" in error and "login" in error

    # A missing token file fails the attempt, naming the file; retried once it is back.
    token.unlink()
    (error,) = sender.send([path])
    assert not isinstance(error, Refused) and f"token_file {token}" in error

    hung = Silent()
    try:
        url = f"http://127.0.0.1:{hung.port}/fhir"
        (error,) = FhirSender(Destination(name="h", fhir_url=url), 1).send([path])
        assert not isinstance(error, Refused) and "ReadTimeout" in error
    finally:
        hung.close()
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    errors = FhirSender(Destination(name="c", fhir_url=closed), 1).send([path, path])
    assert len(errors) == 2 and all("ConnectionError" in (e or "") for e in errors)
    assert not any(isinstance(e, Refused) for e in errors)


def test_hl7_delivery_reads_the_ack(header: pydicom.Dataset, tmp_path: Path) -> None:
    oru = ReportUIDs(header.SOPInstanceUID, TRAINED.sha256).oru
    message = encode_oru(build_oru(header, Findings(55.0, 61.0, TRAINED), oru, "XRAYAGE", None))
    path = _stored(tmp_path, "oru.hl7", message)
    cases = {
        "AA": lambda e: e is None,
        "AE": lambda e: isinstance(e, Refused) and "ACK AE: unknown patient" in e,
        "AR": lambda e: isinstance(e, Refused) and "ACK AR: unknown patient" in e,
        None: lambda e: not isinstance(e, Refused) and "no ACK within 1 s" in e,
    }
    for ack, expected in cases.items():
        listener = MllpListener(ack, "unknown patient").start()
        try:
            sender = MllpSender(Destination(name="ehr", hl7_host="127.0.0.1",
                                            hl7_port=listener.port), 1)  # fmt: skip
            (error,) = sender.send([path])
            assert expected(error), (ack, error)
            assert listener.received and control_id(oru) in listener.received[0]
        finally:
            listener.stop()
    closed = MllpSender(Destination(name="c", hl7_host="127.0.0.1", hl7_port=free_port()), 1)
    errors = closed.send([path, path])
    assert all("cannot connect" in (e or "") for e in errors) and len(errors) == 2


def test_results_reach_the_ehr_as_each_destination_is_routed(
    tmp_path: Path, weights: Path, chest_ds: pydicom.Dataset, fhir: FhirServer
) -> None:
    """A node with four EHR destinations: FHIR (token from a file) and HL7 take everything;
    a cardiology FHIR server wants trained models only, and a ward's HL7 feed one station
    only, so both are skipped with the reason in the audit log. The HL7 receiver refuses at
    first (AR: failed at once, no retries); ``xrayage retry`` sends the same message (same
    control ID) once it accepts."""
    listener = MllpListener("AR", "patient not registered").start()
    token = _stored(tmp_path, "fhir.token", fhir.token.encode())
    port, http = free_port(), free_port()
    config = node_config(
        tmp_path, port, weights, None,
        report='secondary_capture = false\npatient_identifier_system = "urn:oid:1.2.36.9"',
        delivery="retry_initial_seconds = 1\nretry_max_seconds = 2",
        http=f'host = "127.0.0.1"\nport = {http}\ntokens = {{ ops = "{OPS}" }}',
    )  # fmt: skip
    config.write_text(
        config.read_text()
        + f'[[destinations]]\nname = "ehr"\nfhir_url = "{fhir.url}"\ntoken_file = "{token}"\n'
        + f'[[destinations]]\nname = "cardiology"\nfhir_url = "{fhir.url}"\n'
        + f'token_file = "{token}"\nwhen = {{ trained_model = true }}\n'
        + f'[[destinations]]\nname = "hl7"\nhl7_host = "127.0.0.1"\nhl7_port = {listener.port}\n'
        + 'when = { calling_ae = ["STORESCU"] }\n'
        + f'[[destinations]]\nname = "ward"\nhl7_host = "127.0.0.1"\nhl7_port = {listener.port}\n'
        + 'when = { station_name = ["WARD-3"] }\n'
    )
    images = small_chests(chest_ds, tmp_path / "in", 2, AccessionNumber="ACC-9")
    table = run("routes", str(images[0]), "--calling-ae", "STORESCU", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert "analysed by the gate" in table.stdout.splitlines()[0]
    assert "4 destinations" in table.stdout
    routes = run("routes", str(images[0]), "--calling-ae", "STORESCU", "--config", str(config),
                 "-f", "json")  # fmt: skip
    decided = {r["destination"]: (r["takes"], r["decision"]) for r in json.loads(routes.stdout)}
    assert decided["ehr"] == ("observation", "sent") and decided["hl7"] == ("oru", "sent")
    assert decided["cardiology"][1] == (
        "not sent: the model's weights are untrained and it takes trained models only"
    )
    assert decided["ward"][1] == "not sent: station name (THORAVISION) is not one of WARD-3"
    other = run("routes", str(images[0]), "--config", str(config), "-f", "json")
    decided = {r["destination"]: (r["takes"], r["decision"]) for r in json.loads(other.stdout)}
    assert decided["hl7"][1].startswith("not sent: calling AE (none")

    node = NodeProcess(config, port, tmp_path / "node.log", http_port=http)
    node.start()
    try:
        assert storescu(port, *images).returncode == 0

        def results() -> list[dict[str, str]]:
            out = run("results", "-f", "json", "--config", str(config))
            return list(json.loads(out.stdout)) if out.returncode == 0 else []

        done = wait_until(
            lambda: (rows := results()) and all("pending" not in r["deliveries"] for r in rows)
            and len(rows) == 2 and rows,
            120, "both results delivered or failed",
        )  # fmt: skip
        for row in done:
            assert row["state"] == "failed"  # the HL7 receiver refused: AR
            assert "ehr observation delivered" in row["deliveries"]
            assert "hl7 oru failed" in row["deliveries"]
            assert "cardiology" not in row["deliveries"] and "ward" not in row["deliveries"]
        assert len(listener.received) == 2  # no retries of a refusal

        sr_uids = {
            ReportUIDs(r["sop_instance_uid"], r["weights_sha256"]).sr_instance for r in done
        }
        for row in done:
            sr = ReportUIDs(row["sop_instance_uid"], row["weights_sha256"]).sr_instance
            (obs,) = fhir.search("Observation", identifier=f"urn:dicom:uid|urn:oid:{sr}")
            assert obs["valueQuantity"]["value"] == round(float(row["xray_age"]), 2)
            assert obs["subject"]["identifier"]["system"] == "urn:oid:1.2.36.9"
        assert len(sr_uids) == 2

        audit = run("audit", "--event", "reported", "-f", "json", "--config", str(config))
        details = [e["detail"] for e in json.loads(audit.stdout)]
        assert len(details) == 2 and all(
            "not cardiology: the model's weights are untrained" in d
            and "not ward: station name" in d and "ehr (observation)" in d
            for d in details
        )

        failed = run("retry", "--config", str(config))
        assert "oru" in failed.stdout and "patient not registered" in failed.stdout
        listener.ack = "AA"
        again = run("retry", "--all-failed", "--config", str(config))
        assert again.returncode == 0, again.stderr
        wait_until(
            lambda: all(r["state"] == "delivered" for r in results()), 60, "the resend",
        )  # fmt: skip
        ids = [parse(m.encode()).msh.msh_10.value for m in listener.received]
        assert len(ids) == 4 and sorted(ids[:2]) == sorted(ids[2:])  # the same messages again
        obr3 = {parse(m.encode()).oru_r01_patient_result.oru_r01_order_observation.obr.obr_3
                .to_er7() for m in listener.received}  # fmt: skip
        assert obr3 == {"ACC-9"}

        metrics = node.metrics()
        assert metrics['xrayage_deliveries_total{destination="ehr",kind="observation"}'] == 2
        assert metrics['xrayage_deliveries_total{destination="hl7",kind="oru"}'] == 2
        assert metrics['xrayage_delivery_failures_total{destination="hl7",kind="oru"}'] == 2
        listed = requests.get(
            f"http://127.0.0.1:{http}/api/destinations",
            headers={"Authorization": f"Bearer {OPS}"}, timeout=5,
        ).json()  # fmt: skip
        kinds = {d["name"]: d["kinds"] for d in listed["destinations"]}
        assert kinds == {"ehr": ["observation"], "hl7": ["oru"]}
    finally:
        node.stop()
        listener.stop()


def test_routing_without_conditions_keeps_todays_behaviour_and_names_what_it_drops() -> None:
    pacs = Destination(name="pacs", ae_title="PACS", host="pacs", port=104)
    ehr = Destination(name="ehr", fhir_url="https://ehr/fhir")
    retro = ImageFacts(calling_ae=None, station_name=None, trained=False)
    routing = route([pacs, ehr], retro)
    assert routing.takes == {
        "pacs": {DeliveryKind.SR, DeliveryKind.SC}, "ehr": {DeliveryKind.OBSERVATION},
    }  # fmt: skip
    assert routing.skipped == {} and routing.ehr_kinds == {DeliveryKind.OBSERVATION}
    routing.drop({DeliveryKind.OBSERVATION: "FHIR Observation: no Patient ID"})
    assert list(routing.takes) == ["pacs"] and routing.ehr_kinds == frozenset()
    assert routing.summary() == "pacs (sc, sr); not ehr: FHIR Observation: no Patient ID"


def test_fhir_over_https_trusts_the_configured_ca_only(
    tmp_path: Path,
    pki: Path,  # noqa: F811 - the fixture imported above
    header: pydicom.Dataset,
) -> None:
    """sekmet serves https with a certificate of a private CA: the node delivers when
    ``tls.ca_certificates`` names that CA, and retries (a certificate error is no refusal)
    when it does not."""
    server = FhirServer(
        tmp_path / "fhir", free_port(), tls=(pki / "node.crt", pki / "node.key", pki / "ca.crt")
    )
    server.start()
    try:
        uids = ReportUIDs(header.SOPInstanceUID, TRAINED.sha256)
        obs = build_observation(header, Findings(55.0, 61.0, TRAINED), uids.sr_instance, None)
        path = _stored(tmp_path, "obs.json", encode_observation(obs))
        trusted = Destination(
            name="ehr", fhir_url=server.url, token=server.token,
            tls={"ca_certificates": pki / "ca.crt"},
        )  # fmt: skip
        assert FhirSender(trusted, 10).send([path]) == [None]
        assert server.search("Observation", identifier=f"urn:oid:{uids.sr_instance}")
        untrusted = Destination(name="ehr", fhir_url=server.url, token=server.token)
        (error,) = FhirSender(untrusted, 10).send([path])
        assert "SSLError" in error and not isinstance(error, Refused)
    finally:
        server.stop()
