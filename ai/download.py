"""Downloading weights: resumable, checksummed, and never leaving a bad file looking valid.

The transfer goes to ``NAME.part`` beside the target; an interrupted pull keeps it and the next
pull resumes with an HTTP Range request. The file gets its final name only after its SHA-256
matches (when one is known) and it loads as TorchScript; a file that fails either is deleted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import requests

from ai.card import file_sha256, write_card
from ai.errors import DownloadError, ModelLoadError
from ai.presets import Preset

Progress = Callable[[int, int | None], None]  # bytes so far, total bytes (None: unknown)

_CHUNK = 1 << 20


class _Unreachable(Exception):
    """Not one byte came: no network, a wrong host, a proxy in the way."""


def _fetch(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    done = offset
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416 and offset:  # the part is already whole
                return
            if r.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
            if r.status_code == 200:
                offset = 0  # the server ignored the range: start over
            length = r.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            done = offset
            with part.open("ab" if offset else "wb") as f:
                for chunk in r.iter_content(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                f.flush()
                os.fsync(f.fileno())
    except requests.RequestException as e:
        if done == offset:
            raise _Unreachable(f"{type(e).__name__}") from None
        raise DownloadError(
            f"transfer from {url} interrupted after {done:,} bytes ({type(e).__name__}); "
            "run the same command again to resume"
        ) from None
    if total is not None and done != total:
        raise DownloadError(
            f"transfer ended after {done:,} of {total:,} bytes; "
            "run the same command again to resume"
        )


def pull(
    preset: Preset,
    cache_dir: Path,
    url: str | None = None,
    sha256: str | None = None,
    progress: Progress | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``preset`` into ``cache_dir`` and write its card there; returns the file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / preset.filename
    part = target.with_name(target.name + ".part")
    expected = (sha256 or preset.sha256 or "").lower() or None
    if target.is_file() and (expected is None or file_sha256(target) == expected):
        return target  # already pulled (and checked then); hashing 460 MB only when asked
    source = url or preset.url
    try:
        _fetch(source, part, progress, timeout)
    except _Unreachable as e:
        raise DownloadError(
            f"could not reach {source} ({e}): without network, pull from a mirror with --url, "
            f"or copy the file {preset.filename} into {cache_dir} (README: Models)"
        ) from None

    digest = file_sha256(part)
    if expected and digest != expected:
        part.unlink()
        raise DownloadError(
            f"SHA-256 mismatch: got {digest}, expected {expected}; the download was deleted"
        )
    from ai.model import load_torchscript  # torch loads only when a file has arrived

    try:
        load_torchscript(part)
    except ModelLoadError:
        part.unlink()
        raise DownloadError(
            f"{source}: not a TorchScript model; the download was deleted"
        ) from None
    # Card first: a crash between the two leaves a card without weights, which reads as
    # "not downloaded", never weights with a card that does not vouch for them.
    write_card(target, replace(preset.card, sha256=digest))
    os.replace(part, target)
    return target
