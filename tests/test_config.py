"""Config: the keys of the issue as written, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_settings

EXAMPLE = """
[node]
ae_title = "XRAYAGE"
host = "0.0.0.0"
port = 11112
[storage]
path = "./xrayage-data"          # DICOM files and the SQLite database
# database_url = "postgresql+psycopg://..."   # default: SQLite under path
[model]
weights = "/path/to/model.pt"
device = "auto"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example"
port = 104
"""


def test_the_documented_keys_load(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(EXAMPLE)
    s = load_settings(path)
    assert (s.node.ae_title, s.node.host, s.node.port) == ("XRAYAGE", "0.0.0.0", 11112)
    assert s.model.weights == "/path/to/model.pt" and s.model.device == "auto"
    assert s.destinations[0].host == "pacs.example" and s.destinations[0].port == 104
    assert s.database_url == "sqlite:///xrayage-data/xrayage.db"
    assert s.report.secondary_capture is True


def test_the_example_config_in_deploy_loads(tmp_path: Path) -> None:
    """As shipped, what is TO FILL IN is left out (the node starts without it); its lines,
    uncommented, are valid keys with the values a site would change."""
    example = Path(__file__).parents[1] / "deploy" / "xrayage.example.toml"
    s = load_settings(example)
    assert s.node.port == 11112 and s.destinations == [] and s.retro.peer is None
    assert s.model.weights is None and s.model.max_wait_ms == 0 and s.http.port is None
    starts = ("# weights", "# peer", "# [[destinations]]", "# name =", "# ae_title =",
              '# host = "pacs', "# port = 104", "# port = 8080", "# fhir_url", "# token_file",
              "# when", "# hl7_")  # fmt: skip
    filled = tmp_path / "filled.toml"
    filled.write_text("".join(
        line[2:] if line.startswith(starts) else line
        for line in example.read_text().splitlines(keepends=True)
    ))  # fmt: skip
    s = load_settings(filled)
    assert s.model.weights == "riken-senet154" and s.http.port == 8080
    assert s.retro.peer is not None
    assert [(d.name, d.protocol) for d in s.destinations] == [
        ("pacs", "C-STORE"), ("ehr", "FHIR"), ("interface-engine", "HL7 MLLP"),
    ]  # fmt: skip


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.toml"
    path.write_text(EXAMPLE)
    monkeypatch.setenv("XRAYAGE_NODE__PORT", "4242")
    monkeypatch.setenv("XRAYAGE_STORAGE__DATABASE_URL", "sqlite:////tmp/other.db")
    monkeypatch.setenv("XRAYAGE_REPORT__SECONDARY_CAPTURE", "false")
    monkeypatch.setenv(
        "XRAYAGE_DESTINATIONS", '[{"name": "b", "ae_title": "B", "host": "h", "port": 11}]'
    )
    s = load_settings(path)
    assert s.node.port == 4242 and s.node.ae_title == "XRAYAGE"
    assert s.database_url == "sqlite:////tmp/other.db"
    assert s.report.secondary_capture is False
    assert [d.name for d in s.destinations] == ["b"]


def test_defaults_without_a_file() -> None:
    s = load_settings(None)
    assert s.node.port == 11112 and s.model.weights is None and s.destinations == []


def test_environment_variables_are_named_in_their_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A typo in a variable is named as the variable, not as a config key."""
    monkeypatch.setenv("XRAYAGE_NODE__PORTT", "5")
    with pytest.raises(ConfigError, match=r"^environment variable XRAYAGE_NODE__PORTT: unknown"):
        load_settings(None)
    monkeypatch.delenv("XRAYAGE_NODE__PORTT")
    monkeypatch.setenv("XRAYAGE_NODE__PORT", "abc")
    with pytest.raises(ConfigError, match="XRAYAGE_NODE__PORT: 'abc' is not a whole number"):
        load_settings(None)
    monkeypatch.delenv("XRAYAGE_NODE__PORT")
    monkeypatch.setenv("XRAYAGE_NODEE__PORT", "5")  # pydantic-settings would ignore it
    with pytest.raises(ConfigError, match="XRAYAGE_NODEE__PORT: no section 'nodee'"):
        load_settings(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nprot = 1\n", "node.prot: unknown key"),
        (
            "[node]\nport = 70000\n",
            "node.port: 70000 is not at most 65535",
        ),
        ('[node]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "not a valid AE title"),
        ("[node\n", "config: "),
        (
            '[node.tls]\ncertificate = "a.crt"\nprivate_key = "a.key"\n'
            "require_client_certificate = true\n",
            "node.tls: require_client_certificate needs ca_certificates",
        ),
        ('[retro]\nschedule = "at ten"\n', "retro.schedule: 'at ten' is not"),
        ('[retro]\nwindow_end = "25:00"\n', "retro.window_end: '25:00' is not a time"),
        ('[retro]\nretrieve = "copy"\n', "retro.retrieve: 'copy' is not one of 'move' or 'get'"),
        ('[http]\nport = 8080\ntokens = { ward = "short" }\n', "tokens shorter than 16"),
        (
            '[[destinations]]\nname = "a"\nhost = "h"\n',
            "a C-STORE destination needs ae_title and port too",
        ),
        ('[[destinations]]\nname = "a"\n', "a destination is one of: ae_title, host and port"),
        (
            '[[destinations]]\nname = "a"\nhl7_host = "h"\nhl7_port = 2575\nsend = ["sr"]\n',
            "a HL7 MLLP destination takes oru, not sr",
        ),
        (
            '[[destinations]]\nname = "a"\nfhir_url = "http://x"\nhl7_host = "h"\n',
            "a destination is one of",
        ),
        (
            '[[destinations]]\nname = "a"\nhl7_host = "h"\nhl7_port = 2575\ntoken = "t"\n',
            "token, token_file, username and password are for stow_url and fhir_url",
        ),
        (
            '[[destinations]]\nname = "a"\nfhir_url = "x"\n',
            "fhir_url must start with http://",
        ),
        (
            '[[destinations]]\nname = "a"\nfhir_url = "http://x"\nwhen = { station = ["A"] }\n',
            "destinations.0.when.station",
        ),
        ('[[destinations]]\nname = "a"\nstow_url = "ftp://x"\n', "must start with http://"),
        (
            '[[destinations]]\nname = "a"\nstow_url = "http://x"\nport = 104\n',
            "a destination is one of",
        ),
        (
            '[[destinations]]\nname = "a"\nstow_url = "http://x"\ntoken = "t"\nusername = "u"\n',
            "give one of token, token_file, or username and password",
        ),
        ('[[destinations]]\nname = "a"\nstow_url = "http://x"\nusername = "u"\n', "go together"),
        ('[logging]\nformat = "xml"\n', "x.toml: logging.format: 'xml' is not one of 'text' or"),
    ],
)
def test_mistakes_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(path)
