"""The command line: results on stdout, one-line errors on stderr, never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import Database
from tests.servers import XRAYAGE, free_port


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(XRAYAGE), *args], capture_output=True, text=True, timeout=300)


def test_infer_json_gives_one_object_per_file(
    chest_pa: Path, extremity: Path, weights: Path
) -> None:
    out = run(
        "infer",
        str(chest_pa),
        str(extremity),
        "--weights",
        str(weights),
        "--json",
        "--device",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["path"] for r in rows] == [str(chest_pa), str(extremity)]
    assert all(isinstance(r["xray_age"], float) for r in rows)
    assert rows[0]["xray_age"] != rows[1]["xray_age"]  # the stand-in model tells images apart
    assert rows[0]["untrained"] is True


def test_a_bad_file_is_reported_and_the_others_still_run(
    chest_pa: Path, weights: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not dicom")
    data = chest_pa.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    explicit = b"1.2.840.10008.1.2.1\0"  # the file meta's Transfer Syntax UID, same length below
    unknown, garbled = tmp_path / "unknown-ts.dcm", tmp_path / "garbled-ts.dcm"
    unknown.write_bytes(data.replace(explicit, b"1.2.840.10008.1.2.9\0", 1))
    garbled.write_bytes(data.replace(explicit, b"#garbled?ts+%&!x@@\0\0", 1))
    bad = [junk, truncated, unknown, garbled]
    out = run("infer", *map(str, bad), str(chest_pa), "--weights", str(weights), "--json")
    assert out.returncode == 1
    rows = json.loads(out.stdout)
    assert "not a DICOM file" in rows[0]["error"] and "force=True" not in rows[0]["error"]
    assert all(row["error"] and row["xray_age"] is None for row in rows[:4])
    assert "cannot be decoded" in rows[2]["error"] and "cannot be decoded" in rows[3]["error"]
    assert rows[4]["xray_age"] is not None and rows[4]["error"] is None
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["infer", "x.dcm"], "xrayage: error: no weights: pass --weights PATH"),
        (["infer", "x.dcm", "--weights", "/nonexistent.pt"], "weights not found: /nonexistent.pt"),
        (["serve", "--config", "/nonexistent.toml"], "config file not found: /nonexistent.toml"),
        (["infer", "x.dcm", "--weights", "{junk}", "--device", "cpu"], "not a TorchScript model"),
        (["infer", "x.dcm", "--weights", "{weights}", "--device", "tpu"], "device must be auto"),
        (["audit", "--since", "yesterday", "-c", "{config}"], "--since: 'yesterday' is not a date"),
        (["rescan", "--from", "2026-11-01", "-c", "{config}"], "no [retro] peer in the config"),
        (["rescan", "-c", "{config}"], "give --from DATE [--to DATE], or --resume"),
        (["audit", "-c", "{empty}"], "no database at"),
        # click's own checks, in one line too (not a framed box of 4-6 lines)
        (["results", "--limit", "0", "-c", "{config}"], "'--limit': must be at least 1"),
        (["results", "-f", "xml", "-c", "{config}"], "'xml' is not one of 'table', 'csv'"),
        (["results", "--bogus"], "xrayage results: No such option: --bogus"),
        (["model"], "xrayage model: Missing command. (see xrayage model --help)"),
        (["audit", "--since", "2026-12-01", "--until", "2026-11-01", "-c", "{config}"],
         "--since 2026-12-01 is not before --until 2026-11-01"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line(
    args: list[str], message: str, weights: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04not a model")
    config, empty = tmp_path / "node.toml", tmp_path / "empty.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n')
    empty.write_text(f'[storage]\npath = "{tmp_path / "nothing"}"\n')
    Database.sqlite_in(tmp_path / "data").create_schema()
    args = [a.format(junk=junk, weights=weights, config=config, empty=empty) for a in args]
    out = run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_demo_shows_the_sr_of_an_untrained_model(tmp_path: Path, chest_pa: Path) -> None:
    """The demo ends with what happened and what to do next; its folder keeps the weights (the
    same SHA-256 on the next run), the node's data and a config that `results` reads."""
    out = run("demo", "--data", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'NUM:(,,"X-ray age")' in out.stdout  # dsrdump's content tree
    sr = next((tmp_path / "node" / "dicom" / "reports").rglob("*.dcm"))
    tail = out.stdout[out.stdout.index("UNTRAINED demo weights, not an age estimate") :]
    config = tmp_path / "xrayage.toml"
    assert str(sr) in tail and f"xrayage results -c {config}" in tail and "Next:" in tail
    rows = json.loads(run("results", "-f", "json", "-c", str(config)).stdout)
    assert len(rows) == 1 and rows[0]["untrained"] is True
    again = run("demo", "--data", str(tmp_path))
    assert again.returncode == 0, again.stderr
    later = json.loads(run("results", "-f", "json", "-c", str(config)).stdout)
    assert [r["weights_sha256"] for r in later] == [rows[0]["weights_sha256"]]


def test_version_and_help_keep_bracketed_config_keys() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout == f"xrayage {version('xrayage')}\n"

    def text(*command: str) -> str:  # the help's words, without the boxes rich draws
        return " ".join(run(*command, "--help").stdout.replace("│", " ").split())

    assert "archive ([retro] peer)" in text("rescan")
    assert "--version print the version" in text() and "<bool>" not in text()
    assert "(default: [model] cache_dir, ~/.cache/xrayage/models)" in text("model", "pull")


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, (out.returncode, out.stderr)
    assert out.stderr.startswith("xrayage: error: ") and not out.stdout
    return out.stderr.strip()


def test_infer_on_a_missing_file_names_it(tmp_path: Path, weights: Path) -> None:
    error = _one_line_error(run("infer", str(tmp_path / "nope.dcm"), "--weights", str(weights)))
    assert error == f"xrayage: error: no such file or folder: {tmp_path / 'nope.dcm'}"


def test_serve_names_the_port_in_use_and_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {port}\n[storage]\npath = "{tmp_path / "d"}"\n'
        )
        error = _one_line_error(run("serve", "-c", str(config)))
    assert f"[node] port = {port}: cannot listen on 127.0.0.1:{port}" in error
    assert "change [node] port" in error and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ('path = "/proc/xrayage/data"', "[storage] path = /proc/xrayage/data: cannot create it"),
        (
            'path = "{tmp}/d"\ndatabase_url = "sqlite:///{tmp}/missing/x.db"',
            "database sqlite:///{tmp}/missing/x.db: unable to open database file",
        ),
    ],
)
def test_serve_names_the_storage_it_cannot_open(
    tmp_path: Path, storage: str, expected: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {free_port()}\n[storage]\n'
        + storage.format(tmp=tmp_path)
    )
    assert expected.format(tmp=tmp_path) in _one_line_error(run("serve", "-c", str(config)))


def test_infer_table_shows_whole_paths_and_audit_lists_its_events(
    tmp_path: Path, chest_pa: Path, weights: Path
) -> None:
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "chest-pa-radiograph-of-a-patient.dcm"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(chest_pa.read_bytes())
    out = run("infer", str(deep), "--weights", str(weights))
    assert out.returncode == 0 and str(deep) in out.stdout, out.stdout
    error = _one_line_error(run("audit", "--event", "recieved"))
    assert "'recieved' is not an event; events: received, skipped, queued" in error


def test_demo_keeps_its_folder_where_it_says_and_refuses_a_png_in_one_line(
    tmp_path: Path,
) -> None:
    out = subprocess.run([str(XRAYAGE), "demo"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "X-ray age" in out.stdout, out.stderr
    kept = tmp_path / "xrayage-demo"
    assert f"Everything is kept in {kept}" in out.stdout
    assert (kept / "models" / "untrained-seresnet.pt").is_file()
    png = tmp_path / "chest.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    error = _one_line_error(run("demo", str(png)))
    assert f"{png}: not a DICOM image" in error and "File Meta" not in error


def test_help_does_not_import_torch() -> None:
    """--help and the commands that run no model start without torch (1.6 s, was 2.5 s)."""
    probe = "import sys, node.cli.main; print(sorted({'torch', 'lifelines'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
