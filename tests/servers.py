"""Real servers for the tests: Orthanc as the PACS and ``xrayage serve`` as a process.

Everything listens on free loopback ports and is stopped by the fixture that started it.
Orthanc 1.10 has no bind-address option, so it is confined in its configuration instead:
HTTP refuses non-local clients (RemoteAccessAllowed false) and DICOM accepts only the modalities
listed with their 127.0.0.1 address (DicomCheckModalityHost).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

XRAYAGE = Path(sys.executable).parent / "xrayage"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie has died, though whoever inherited it may not have reaped
    it yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(check, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def echo(port: int, called: str = "XRAYAGE") -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Orthanc:
    folder: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    proc: subprocess.Popen[bytes] | None = None
    auth: tuple[str, str] | None = None  # a user for the REST API and DICOMweb, when set

    @property
    def dicomweb(self) -> str:
        """The DICOMweb plugin's root (Debian package orthanc-dicomweb), when started with it."""
        return f"{self.url}/dicom-web"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(
        self,
        allowed: dict[str, str],
        ports: dict[str, int] | None = None,
        dicomweb: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        """``allowed``: AE title -> name of the peers that may store (all from 127.0.0.1);
        ``ports``: AE title -> DICOM port, for the peers that C-MOVE sends to; ``dicomweb``:
        load the DICOMweb plugin; ``options``: more of Orthanc's configuration."""
        ports = ports or {}
        db = self.folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "xrayage-test-pacs",
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.auth is not None,
            "RegisteredUsers": dict([self.auth]) if self.auth else {},
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name: [aet, "127.0.0.1", ports.get(aet, 104)] for aet, name in allowed.items()
            },
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,
        } | (options or {})
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = (self.folder / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._up, 30, "Orthanc's REST API")

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()}")
        try:
            return requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def find(self, query: dict[str, str]) -> list[dict[str, Any]]:
        r = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": query, "Expand": True},
            auth=self.auth,
            timeout=10,
        )
        r.raise_for_status()
        return list(r.json())

    def sr_uids(self) -> list[str]:
        """SOP Instance UIDs of the SRs stored, one per stored instance."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.find({"Modality": "SR"})]

    def upload(self, *paths: Path) -> None:
        for path in paths:
            requests.post(
                f"{self.url}/instances", data=path.read_bytes(), auth=self.auth, timeout=30
            ).raise_for_status()

    def file(self, orthanc_id: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{orthanc_id}/file", auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.content


@dataclass
class NodeProcess:
    """``xrayage serve --config`` in a subprocess, the way an administrator runs it."""

    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    file_size_limit: int | None = None  # RLIMIT_FSIZE: writes beyond it fail with EFBIG
    role: str = "all"
    # A role that does not listen for DICOM is up when its [http] port answers /readyz.
    http_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # XRAYAGE_* overrides for this process

    def _limits(self) -> None:
        if self.file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit,) * 2)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XRAYAGE_")} | self.env
        if self.http_port is not None:
            env["XRAYAGE_HTTP__PORT"] = str(self.http_port)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(XRAYAGE), "serve", "--config", str(self.config), "--role", self.role],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=self._limits,
        )
        wait_until(self._up, 120, "the node to answer C-ECHO", interval=0.5)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"xrayage serve exited: {self.log.read_text()}")
        if self.role in ("receive", "all"):
            return echo(self.port)
        return self.ready()

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2).ok
        except requests.ConnectionError:
            return False

    def metrics(self) -> dict[str, float]:
        """The process's ``/metrics``, sample name with labels -> value."""
        text = requests.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text
        return {
            name: float(value)
            for line in text.splitlines()
            if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]
        }

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class PostgreSQL:
    """A throwaway PostgreSQL server: initdb in a fresh folder, listening on 127.0.0.1:``port``
    only, run as the unprivileged ``postgres`` user when started as root (PostgreSQL refuses
    root); ``stop()`` removes it all."""

    def __init__(self, port: int) -> None:
        self.port = port
        # Not under pytest's folders: those are private to root, and the server runs as postgres.
        self.folder = Path(tempfile.mkdtemp(prefix="xrayage-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        command = [str(bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise AssertionError(f"{args[0]} failed: {done.stderr or done.stdout}")

    def start(self) -> None:
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
        self._run(
            "pg_ctl", "-D", str(data), "-o", options, "-l", str(self.folder / "log"), "-w", "start"
        )

    def create_database(self, name: str) -> str:
        """A new, empty database on this server; its SQLAlchemy URL."""
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a test's own name, not user input
        return self.url.rpartition("/")[0] + f"/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class FhirServer:
    """sekmet-fhir (PyPI) as the EHR's FHIR R4 server: SQLite in ``folder``, a static bearer
    ``token``, strict validation of what it is sent (fhir.resources' R4B models, refusals as
    OperationOutcome), conditional create and search by identifier."""

    folder: Path
    port: int
    token: str = "ehr-token-0123456789"
    proc: subprocess.Popen[bytes] | None = None
    tls: tuple[Path, Path, Path] | None = None  # certificate, key, the CA that signed them

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/fhir"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = self.folder / "settings.yaml"
        served = f"tls_certfile: {self.tls[0]}\ntls_keyfile: {self.tls[1]}\n" if self.tls else ""
        settings.write_text(
            f"base_url: {self.url}\ndata_dir: {self.folder / 'data'}\n{served}"
            f"server_auth:\n  types: [bearer]\n  tokens: [{self.token}]\n"
            "validation:\n  inbound: strict\n"
        )
        log = (self.folder / "fhir.log").open("wb")
        self.proc = subprocess.Popen(
            [str(XRAYAGE.parent / "sekmet"), "serve", "--config", str(settings),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
        )  # fmt: skip
        wait_until(self._up, 60, "the FHIR server")

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"sekmet exited: {(self.folder / 'fhir.log').read_text()}")
        try:
            return requests.get(f"{self.url}/metadata", timeout=1, verify=self._verify).ok
        except requests.ConnectionError:
            return False

    @property
    def _verify(self) -> str | bool:
        return str(self.tls[2]) if self.tls else True

    def post(self, resource: dict[str, Any]) -> requests.Response:
        return requests.post(
            f"{self.url}/{resource['resourceType']}", json=resource, timeout=10,
            headers={"Authorization": f"Bearer {self.token}"}, verify=self._verify,
        )  # fmt: skip

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        r = requests.get(
            f"{self.url}/{resource_type}", params=params, timeout=10,
            headers={"Authorization": f"Bearer {self.token}"}, verify=self._verify,
        )  # fmt: skip
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


class MllpListener:
    """An HL7 v2 receiver: hl7apy's MLLP server on a thread, on 127.0.0.1. It keeps every
    message it gets and answers with an ACK of ``ack`` (``AA``, ``AE`` or ``AR``, with
    ``text``), or, with ``ack=None``, never answers (a receiver that hangs)."""

    def __init__(self, ack: str | None = "AA", text: str = "") -> None:
        import threading

        from hl7apy.mllp import AbstractHandler, MLLPServer

        listener = self
        self.received: list[str] = []
        self.ack, self.text = ack, text
        self.release = threading.Event()

        class Answer(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                listener.received.append(self.incoming_message)
                if listener.ack is None:
                    listener.release.wait(60)
                    raise ConnectionAbortedError  # closes without an answer
                return listener.answer(self.incoming_message)

        self.port = free_port()
        self.server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (Answer,)}, 30)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, incoming: str) -> str:
        from hl7apy.core import Message
        from hl7apy.parser import parse_message

        msh = parse_message(incoming, find_groups=False).msh
        ack = Message("ACK", version="2.5.1")
        ack.msh.msh_3 = "EHR"
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = f"A{msh.msh_10.value}"[:20]
        ack.msh.msh_11 = "P"
        ack.msh.msh_12 = "2.5.1"
        ack.msa.msa_1 = self.ack
        ack.msa.msa_2 = msh.msh_10.value
        if self.text:
            ack.msa.msa_3 = self.text
        return str(ack.to_mllp())

    def start(self) -> MllpListener:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


OHIF_DIST = Path(__file__).parents[1] / ".ohif" / "dist"  # @ohif/app's dist/, by .ci/setup


class OhifServer:
    """The OHIF Viewer (``@ohif/app`` from the npm registry, its built ``dist/``) served on
    127.0.0.1, with ``/dicom-web`` proxied to Orthanc's DICOMweb plugin on the same origin, as
    a site deploys it behind one web server. Every path that is no file is the single-page
    app's ``index.html``; ``/app-config.js`` points the viewer at the proxy."""

    def __init__(self, dicomweb: str) -> None:
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = OHIF_CONFIG.replace("ROOT", f"{self.url}/dicom-web").encode()
        assert (OHIF_DIST / "index.html").is_file(), "no OHIF: run the README's test command"

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path.startswith("/dicom-web/"):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, "application/javascript", config)
                else:
                    if not (OHIF_DIST / path.lstrip("/")).is_file():
                        self.path = "/index.html"
                    super().do_GET()

            def _proxy(self) -> None:
                upstream = dicomweb + self.path.removeprefix("/dicom-web")
                accept = self.headers.get("Accept", "*/*")
                r = requests.get(upstream, headers={"Accept": accept}, timeout=30)
                self._send(r.status_code, r.headers.get("Content-Type", ""), r.content)

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        handler = functools.partial(Handler, directory=str(OHIF_DIST))
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> OhifServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


OHIF_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc', name: 'orthanc',
      wadoUriRoot: 'ROOT', qidoRoot: 'ROOT', wadoRoot: 'ROOT',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      staticWado: false, singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""
