"""``xrayage model pull`` against a real HTTP server on 127.0.0.1: a good file, a wrong
checksum, a transfer cut short and resumed, and a file that is not TorchScript."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ai import AgeModel, resolve_weights
from ai.download import DownloadError, pull
from ai.presets import PRESETS
from tests.servers import free_port
from tests.test_cli import run

PRESET = PRESETS["riken-senet154"]


class Mirror(ThreadingHTTPServer):
    """Serves ``files`` by name with Range support; ``cut`` names files whose first transfer
    stops halfway through (the Content-Length promises the whole file)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.ranges: list[str | None] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(BaseHTTPRequestHandler):
    server: Mirror

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = int(header.removeprefix("bytes=").rstrip("-")) if header else 0
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if name in self.server.cut:
            self.server.cut.discard(name)
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-transfer
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture
def mirror(weights: Path) -> Iterator[Mirror]:
    server = Mirror()
    server.files["model.pt"] = weights.read_bytes()
    server.files["junk.pt"] = b"PK\x03\x04 not a TorchScript archive" * 100
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _nothing_looks_valid(cache: Path) -> None:
    assert not (cache / PRESET.filename).exists()
    assert not (cache / (PRESET.filename + ".part")).exists()


def test_pull_records_the_checksum_and_the_preset_name_then_works(
    mirror: Mirror, weights: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    out = run(
        "model", "pull", "riken-senet154", "--url", mirror.url("model.pt"), "--cache", str(cache)
    )
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"sha256 {digest} recorded" in out.stdout
    path = cache / PRESET.filename
    assert path.read_bytes() == weights.read_bytes()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["name"] == "riken-senet154" and card["sha256"] == digest

    # the preset name now works for the library, `infer --weights` and `[model] weights`
    assert resolve_weights("riken-senet154", cache) == path
    config = tmp_path / "xrayage.toml"
    config.write_text(f'[model]\nweights = "riken-senet154"\ncache_dir = "{cache}"\n')
    info = run("model", "info", "riken-senet154", "--config", str(config))
    assert json.loads(info.stdout)["downloaded"] is True
    listing = run("model", "presets", "--cache", str(cache))
    assert digest[:16] in listing.stdout and "not downloaded" not in listing.stdout


def test_a_wrong_checksum_leaves_nothing(mirror: Mirror, tmp_path: Path) -> None:
    out = run(
        "model", "pull", "riken-senet154", "--url", mirror.url("model.pt"),
        "--sha256", "0" * 64, "--cache", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().startswith("xrayage: error: SHA-256 mismatch")
    _nothing_looks_valid(tmp_path)


def test_a_cut_transfer_resumes_where_it_stopped(
    mirror: Mirror, weights: Path, tmp_path: Path
) -> None:
    mirror.cut.add("model.pt")
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        pull(PRESET, tmp_path, url=mirror.url("model.pt"))
    part = tmp_path / (PRESET.filename + ".part")
    kept = part.stat().st_size
    assert 0 < kept < len(weights.read_bytes())
    assert not (tmp_path / PRESET.filename).exists()

    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    path = pull(PRESET, tmp_path, url=mirror.url("model.pt"), sha256=expected)
    assert mirror.ranges[-1] == f"bytes={kept}-"  # resumed, not started over
    assert path.read_bytes() == weights.read_bytes() and not part.exists()
    assert AgeModel.load(path, "cpu").card.sha256 == expected


def test_a_file_that_is_not_torchscript_is_refused(mirror: Mirror, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not a TorchScript model; the download was deleted"):
        pull(PRESET, tmp_path, url=mirror.url("junk.pt"))
    _nothing_looks_valid(tmp_path)
    missing = run(
        "model", "pull", "riken-senet154", "--url", mirror.url("gone.pt"), "--cache", str(tmp_path)
    )
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr


def test_serving_never_downloads_a_missing_preset(tmp_path: Path) -> None:
    out = run(
        "infer", "x.dcm", "--weights", "riken-senet154", "--config", str(_cache_config(tmp_path))
    )
    assert out.returncode == 2
    cache = re.escape(str(tmp_path / "empty"))  # the command, whole, between the backticks
    assert re.search(
        rf"is not downloaded: run `xrayage model pull riken-senet154 --cache {cache}`$",
        out.stderr.strip(),
    ), out.stderr


def _cache_config(folder: Path) -> Path:
    config = folder / "xrayage.toml"
    config.write_text(f'[model]\ncache_dir = "{folder / "empty"}"\n')
    return config


def test_no_network_names_the_url_and_the_offline_route(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/model.pt"  # nothing listens: as without network
    out = run("model", "pull", "riken-senet154", "--url", url, "--cache", str(tmp_path / "c"))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"xrayage: error: could not reach {url} (ConnectionError)")
    assert f"copy the file {PRESET.filename} into {tmp_path / 'c'}" in out.stderr
    assert "--url" in out.stderr and "interrupted" not in out.stderr


def test_a_copied_preset_file_is_found_and_described(weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = json.loads(run("model", "info", "riken-senet154", "--cache", str(cache)).stdout)
    assert before["downloaded"] is False and before["size"] == "about 460 MB"
    assert before["file"] == PRESET.filename and before["license"] == "Apache-2.0"
    assert before["sha256"].startswith("not published")
    cache.mkdir()
    shutil.copy(weights, cache / PRESET.filename)  # the offline route: no card beside it
    after = json.loads(run("model", "info", "riken-senet154", "--cache", str(cache)).stdout)
    assert after["downloaded"] is True
    assert after["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert resolve_weights("riken-senet154", cache) == cache / PRESET.filename
