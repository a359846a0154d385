"""Configuration: embedded defaults, then a TOML file, then ``XRAYAGE_*`` environment variables.

Nested keys use a double underscore: ``XRAYAGE_NODE__PORT=11112`` overrides ``[node] port``;
lists take JSON: ``XRAYAGE_DESTINATIONS='[{"name": "pacs", ...}]'``. Unknown keys in the file
are refused, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import datetime as dt
import os
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Literal, NamedTuple

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ai.limits import DECODE_MEMORY_MB
from storage.db import Database
from storage.filestore import FileStore
from storage.tables import DeliveryKind
from xrayage.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file, key or environment variable that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    # PS3.5 6.2: AE, at most 16 characters, no backslash or control characters.
    if not 0 < len(value.strip()) <= 16 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 characters)")
    return value.strip()


class ServerTls(_Section):
    """``[node.tls]``: the SCP speaks DICOM TLS on ``[node] port`` (PEM files)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None  # CAs whose client certificates are accepted
    require_client_certificate: bool = False  # mutual TLS

    @model_validator(mode="after")
    def _mutual_needs_cas(self) -> ServerTls:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self


class DestinationTls(_Section):
    """``tls = {...}`` on a destination: deliver over DICOM TLS."""

    ca_certificates: Path | None = None  # default: the system's CAs
    certificate: Path | None = None  # for a destination that wants a client certificate
    private_key: Path | None = None
    server_name: str | None = None  # name in the certificate, when not the host


class NodeSection(_Section):
    ae_title: str = "XRAYAGE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    # Idle time before an association is aborted, and the time one PDU may take to arrive.
    network_timeout_seconds: float = Field(60.0, gt=0)
    # Associations at once (exact: admitted when their request arrives), and connections that
    # have not sent their A-ASSOCIATE-RQ yet, which get this long to send it (an ARTIM timer).
    max_associations: int = Field(10, ge=1)
    max_pending_connections: int = Field(20, ge=1)
    association_request_timeout_seconds: float = Field(10.0, gt=0)
    # Maximum Length Received announced to peers (PS3.8 D.1); a longer P-DATA PDU is refused.
    max_pdu_bytes: int = Field(131072, ge=4096, le=1 << 24)
    # The largest data set one C-STORE may carry, also once a deflated one is inflated: a
    # longer one ends the association as it arrives (guard.py). The largest chest detectors
    # are about 4300 x 4300 pixels of 2 bytes, 37 MB; 128 MiB leaves 3.5 times that for
    # private tags and overlays, and bounds what any process reads of one data set.
    max_dataset_bytes: int = Field(128 << 20, ge=1 << 20)
    # Who may associate: calling AE titles (empty: any) and peer addresses or networks such as
    # "10.1.2.0/24" (empty: any). Others are rejected at association time and audited.
    allowed_calling_aets: list[str] = []
    allowed_peers: list[IPv4Network | IPv6Network] = []
    tls: ServerTls | None = None
    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, values: list[str]) -> list[str]:
        return [_ae_title(v) for v in values]


class StorageSection(_Section):
    path: Path = Path("./xrayage-data")
    database_url: str | None = None  # default: SQLite in WAL mode under ``path``
    # How long a write waits for the database before giving up: a C-STORE then answers 0xA700
    # (Out of Resources) and the sender retries later.
    database_timeout_seconds: float = Field(30.0, gt=0)
    # Free space kept on the store's file system: below it, C-STORE answers 0xA700 rather than
    # fill the disk that the database and the reports also need.
    min_free_mb: int = Field(1024, ge=0)
    # Write received files with O_DIRECT, bypassing the page cache (falls back by itself where
    # the file system refuses it); false: ordinary buffered writes, both fsynced before Success.
    direct_io: bool = True

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.path / 'xrayage.db'}"

    # The one place where the node's processes and commands open the database and the store.
    def open_database(self) -> Database:
        return Database(self.url, self.database_timeout_seconds)

    def open_file_store(self) -> FileStore:
        return FileStore(self.path / "dicom", self.min_free_mb * 1024 * 1024, self.direct_io)


class ModelSection(_Section):
    # A preset name (``riken-senet154``, pulled into ``cache_dir``) or a path to TorchScript or
    # safetensors weights; no weights = receive and queue only.
    weights: str | None = None
    cache_dir: Path | None = None  # default: $XRAYAGE_MODEL_CACHE or ~/.cache/xrayage/models
    device: str = "auto"
    batch_size: int = Field(8, ge=1, le=1024)
    # With fewer than batch_size images queued, wait at most this long for more before running.
    # 0: an idle worker starts at once (latency); batches still fill while a batch runs.
    max_wait_ms: float = Field(0.0, ge=0)
    preprocess_workers: int | None = Field(None, ge=1)  # default: CPU count, at most 8
    # What one decoding process may map beyond what it starts with (RLIMIT_AS): an image whose
    # decoding needs more fails with that reason, instead of the kernel's OOM killer choosing
    # a victim. The largest image that is received and passes the pixel budget needs 0.75 GB.
    decode_memory_mb: int = Field(DECODE_MEMORY_MB, ge=256)
    # JPEG 2000 decoded on the model's GPU by nvImageCodec (the extra `gpu`); "auto": when the
    # extra is installed and the model runs on CUDA, else the CPU decoders (ai/device_decode.py).
    device_decode: Literal["auto", "off"] = "auto"
    # A claimed batch comes back to the queue if its worker has not finished it by then (a worker
    # on another host died); longer than the slowest batch. A restart on the same host does not
    # wait: it takes back its dead predecessor's jobs at once.
    lease_seconds: float = Field(300.0, gt=0)
    # Claims of one image whose worker died each time (a decoder that aborts, memory exhausted)
    # before the image is `failed` with that reason, and the queue goes on without it.
    max_attempts: int = Field(3, ge=1)
    # Where decoding and the model run: "process", a child of `serve` that the receiver outlives
    # (restarted when an image kills it); "thread", inside the serving process (tests, debugging).
    isolation: Literal["process", "thread"] = "process"


class GateSection(_Section):
    """Which images are analysed (ARCHITECTURE.md: gate before inference)."""

    body_parts: list[str] = ["CHEST"]
    views: list[str] = ["PA", "AP"]
    # CR systems commonly label their processed for-presentation images DERIVED\PRIMARY
    # (the pydicom-data chest CR does); SECONDARY images (captures, other AI output) never pass.
    accept_derived_primary: bool = True
    # Used only when BodyPartExamined / ViewPosition are absent: regular expressions matched
    # against SeriesDescription, ProtocolName and StudyDescription.
    chest_patterns: list[str] = [r"(?i)\bchest\b", r"(?i)\bthorax\b", r"(?i)\bcxr\b"]
    view_patterns: dict[str, str] = {"PA": r"(?i)\bp\.?a\b", "AP": r"(?i)\ba\.?p\b"}


class ReportSection(_Section):
    secondary_capture: bool = True
    sr_series_number: int = 9901
    sc_series_number: int = 9902
    institution_name: str | None = None
    # The system of the patient identifier in FHIR Observations (the EHR's MRN system, e.g.
    # "urn:oid:1.2.36.146.595.217.0.1"); unset, the identifier has the Patient ID alone.
    patient_identifier_system: str | None = None


class ReportConfig(NamedTuple):
    """What the inference worker needs to report: the ``[report]`` section, the node's AE title
    (the SR's device observer) and the destinations, which route each result
    (:mod:`node.delivery.routes`)."""

    section: ReportSection
    ae_title: str
    destinations: tuple[Destination, ...]


class DeliverySection(_Section):
    max_attempts: int = Field(10, ge=1)
    retry_initial_seconds: float = Field(30.0, gt=0)
    retry_max_seconds: float = Field(3600.0, gt=0)
    timeout_seconds: float = 30.0


class Peer(_Section):
    """Another DICOM node: its AE title, address and port, optionally over TLS."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTls | None = None
    _check_ae = field_validator("ae_title")(_ae_title)


class RouteConditions(_Section):
    """``when = {...}`` on a destination: it takes an image's results only where every
    condition given holds (README "Routing")."""

    calling_ae: list[str] | None = None  # the AE titles whose images it takes
    station_name: list[str] | None = None  # Station Name (0008,1010) values it takes
    trained_model: bool = False  # true: never a result of untrained (demo) weights


# What each kind of destination is given by, and what it can take of a result.
PROTOCOLS: dict[str, tuple[tuple[str, ...], frozenset[DeliveryKind]]] = {
    "C-STORE": (("ae_title", "host", "port"), frozenset({DeliveryKind.SR, DeliveryKind.SC})),
    "STOW-RS": (("stow_url",), frozenset({DeliveryKind.SR, DeliveryKind.SC})),
    "FHIR": (("fhir_url",), frozenset({DeliveryKind.OBSERVATION})),
    "HL7 MLLP": (("hl7_host", "hl7_port"), frozenset({DeliveryKind.ORU})),
}
_HTTP = ("STOW-RS", "FHIR")


class Destination(_Section):
    """Where results go (one kind per destination):

    - a DICOM node by C-STORE (``ae_title``, ``host``, ``port``, optional ``tls``): SR and SC;
    - a DICOMweb origin server by STOW-RS (``stow_url``): SR and SC;
    - a FHIR R4 server (``fhir_url``, its base): the result as an Observation;
    - an HL7 v2 interface engine over MLLP (``hl7_host``, ``hl7_port``, optional ``tls``): the
      result as an ORU^R01.

    HTTP destinations take a bearer ``token`` (or ``token_file``, read at each request so that
    a rotated token is used at once) or ``username`` and ``password``;
    ``tls.ca_certificates`` verifies an https server. ``when`` restricts what it takes.
    """

    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: DestinationTls | None = None
    stow_url: str | None = None
    fhir_url: str | None = None
    hl7_host: str | None = None
    hl7_port: int | None = Field(None, ge=1, le=65535)
    # What it takes of each result; by default all its kind can take (SR and SC, made when
    # [report] secondary_capture is on; the Observation; the ORU).
    send: list[DeliveryKind] | None = Field(None, min_length=1)
    token: str | None = None
    token_file: Path | None = None
    username: str | None = None
    password: str | None = None
    when: RouteConditions | None = None

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @field_validator("stow_url", "fhir_url")
    @classmethod
    def _check_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{info.field_name} must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        given = [p for p, (keys, _) in PROTOCOLS.items() if any(getattr(self, k) for k in keys)]
        if len(given) != 1:
            raise ValueError(
                "a destination is one of: ae_title, host and port (C-STORE); stow_url; "
                "fhir_url; hl7_host and hl7_port"
            )
        protocol = given[0]
        keys, takes = PROTOCOLS[protocol]
        missing = [k for k in keys if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {protocol} destination needs {' and '.join(missing)} too")
        credentials = [k for k in ("token", "token_file", "username") if getattr(self, k)]
        if protocol not in _HTTP:
            if credentials or self.password:
                raise ValueError(
                    "token, token_file, username and password are for stow_url and fhir_url "
                    "destinations"
                )
        elif len(credentials) > 1:
            raise ValueError("give one of token, token_file, or username and password")
        elif (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        wrong = sorted(set(self.send or ()) - takes)
        if wrong:
            raise ValueError(
                f"a {protocol} destination takes {', '.join(sorted(takes))}, "
                f"not {', '.join(wrong)}"
            )
        return self

    @property
    def protocol(self) -> str:
        """``C-STORE``, ``STOW-RS``, ``FHIR`` or ``HL7 MLLP``."""
        return next(p for p, (keys, _) in PROTOCOLS.items() if getattr(self, keys[0]))

    @property
    def takes(self) -> frozenset[DeliveryKind]:
        """The kinds of report object it takes."""
        return frozenset(self.send) if self.send else PROTOCOLS[self.protocol][1]

    @property
    def where(self) -> str:
        """Where it is, as its errors name it."""
        if self.stow_url or self.fhir_url:
            return str(self.stow_url or self.fhir_url)
        if self.hl7_host:
            return f"{self.hl7_host}:{self.hl7_port}"
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def peer(self) -> Peer:
        """The C-STORE peer of a DICOM destination."""
        return Peer(ae_title=self.ae_title, host=self.host, port=self.port, tls=self.tls)  # type: ignore[arg-type]


def _crontab(value: str) -> str:
    try:
        CronTrigger.from_crontab(value)
    except ValueError as e:
        raise ValueError(
            f"{value!r} is not a crontab expression (minute hour day month weekday): {e}"
        ) from None
    return value


class RetroSection(_Section):
    """``[retro]``: nightly re-scans of the archive (``peer``) for studies never reported."""

    peer: Peer | None = None  # the query/retrieve SCP; no peer, no retro-scans
    schedule: str = "0 22 * * *"  # crontab, in the node's local time
    window_end: dt.time = dt.time(
        6, 0
    )  # a scheduled scan stops fetching then, and resumes next night
    days_back: int = Field(7, ge=1)  # a scheduled scan covers the studies of the last N days
    # "move": C-MOVE to this node's AE title (the peer must know it); "get": C-GET on the
    # query association, for peers that cannot route back.
    retrieve: Literal["move", "get"] = "move"
    max_concurrent_moves: int = Field(2, ge=1, le=16)
    max_images_per_night: int = Field(5000, ge=1)
    timeout_seconds: float = Field(600.0, gt=0)  # for one C-FIND, C-MOVE or C-GET to complete
    _check_schedule = field_validator("schedule")(_crontab)


class SyslogSection(_Section):
    """``[audit.syslog]``: IHE ATNA audit messages (DICOM PS3.15 A.5) over RFC 5424 syslog."""

    host: str
    port: int = Field(6514, ge=1, le=65535)
    transport: Literal["udp", "tcp", "tls"] = "tls"
    tls: DestinationTls | None = None  # for "tls": the collector's CA, an optional client cert


class AuditSection(_Section):
    retention_days: int | None = Field(None, ge=1)  # None: keep every event
    purge_schedule: str = "30 3 * * *"
    syslog: SyslogSection | None = None
    _check_schedule = field_validator("purge_schedule")(_crontab)


class ValidationSection(_Section):
    """``[validation]``: the model's agreement with the chronological ages of this site's own
    patients, watched continuously (README "Validation")."""

    window_days: int = Field(30, ge=1)  # the rolling window of the figures and the alert
    # Alert when the rolling MAE exceeds the model card's stated MAE by more than this ...
    alert_margin_years: float = Field(2.0, ge=0)
    min_count: int = Field(100, ge=1)  # ... over at least this many patients
    # `xrayage model promote` refuses a candidate compared with the live model on fewer patients
    # (both models' images with a known age; --force overrides): with 30, a paired difference of
    # 1 year in absolute error is seen when its per-patient SD is under about 2.7 years.
    promote_min_patients: int = Field(30, ge=1)


class HttpSection(_Section):
    """``[http]``: the read-only audit API and status page; off without a port."""

    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    # Bearer tokens by the name the audit log records for their holder (``api:<name>``).
    tokens: dict[str, str] = {}

    @field_validator("tokens")
    @classmethod
    def _long_tokens(cls, tokens: dict[str, str]) -> dict[str, str]:
        short = [name for name, token in tokens.items() if len(token) < 16]
        if short:
            raise ValueError(f"tokens shorter than 16 characters: {', '.join(short)}")
        return tokens


class LoggingSection(_Section):
    """``[logging]``: one line per record, as text or as JSON for a log collector."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="XRAYAGE_", env_nested_delimiter="__", extra="forbid"
    )

    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    model: ModelSection = ModelSection()
    gate: GateSection = GateSection()
    report: ReportSection = ReportSection()
    delivery: DeliverySection = DeliverySection()
    destinations: list[Destination] = []
    retro: RetroSection = RetroSection()
    audit: AuditSection = AuditSection()
    validation: ValidationSection = ValidationSection()
    http: HttpSection = HttpSection()
    logging: LoggingSection = LoggingSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def database_url(self) -> str:
        return self.storage.url


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false",
          "string": "text", "list": "a list", "dict": "a table", "time": "a time (HH:MM)",
          "date": "a date (YYYY-MM-DD)", "url": "a URL"}  # fmt: skip
_BOUNDS = {"greater_than_equal": ("at least", "ge"), "greater_than": ("above", "gt"),
           "less_than_equal": ("at most", "le"), "less_than": ("below", "lt")}  # fmt: skip


def _where(loc: list[str], path: Path | None) -> str:
    """The key as the user wrote it: an environment variable (named), or the file's key."""
    name = "XRAYAGE_" + "__".join(loc).upper()
    for variable in os.environ:  # pydantic-settings matches them case-insensitively
        if variable.upper() == name or variable.upper().startswith(name + "__"):
            return f"environment variable {variable}"
    key = ".".join(loc)
    return f"config {path}: {key}" if path is not None else f"config: {key}"


def _explain(error: Any) -> str:
    """pydantic's error in this project's words."""
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        return "unknown key (see the README's configuration table)"
    if kind == "missing":
        return "required, and not given"
    if kind.endswith(("_parsing", "_type")):
        return f"{value!r} is not {_KINDS.get(kind.split('_')[0], 'of the right kind')}"
    if kind == "literal_error":
        return f"{value!r} is not one of {ctx['expected']}"
    if kind in _BOUNDS:
        words, bound = _BOUNDS[kind]
        return f"{value!r} is not {words} {ctx[bound]}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Settings from ``path`` (TOML) with environment overrides; a clear ConfigError otherwise."""
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")

    for variable in os.environ:  # pydantic-settings ignores a section it does not know
        section = variable.upper().removeprefix("XRAYAGE_").split("__")[0].lower()
        if variable.upper().startswith("XRAYAGE_") and section not in Settings.model_fields:
            raise ConfigError(
                f"environment variable {variable}: no section {section!r} "
                f"(sections: {', '.join(Settings.model_fields)})"
            )

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FromFile(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first["loc"] if "[" not in str(p)]  # no union paths
        raise ConfigError(f"{_where(loc, path)}: {_explain(first)}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config: {e}") from None
