"""Crash isolation with real parts: a JPEG-LS chest CR whose Rows disagree with its codestream
makes GDCM abort the process that decodes it (SIGABRT, gdcmBitmap.cxx). Sent with normal images
to a real ``xrayage serve``, it may kill only the decoding process that reads it: the receiver
and the inference process go on, the normal images are reported, and the bad one ends ``failed``
with the cause: no crash loop. A death of the inference process itself is supervised.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import gdcm
import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from ai import AgeModel, Engine
from storage import Database, Instance, InstanceState
from storage.tables import AuditEvent
from tests.conftest import node_config, small_chests, storescu
from tests.servers import NodeProcess, echo, free_port, running, wait_until


def jpeg_ls_that_aborts(source: Path, out: Path) -> Path:
    """``source`` as JPEG-LS Lossless (GDCM's encoder), then one row more in the header than
    in the codestream."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLSLossless))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    ds = pydicom.dcmread(out)
    ds.Rows += 1
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(out)
    return out


def _inference_children(pid: int) -> list[int]:
    """The spawned children of ``pid`` (not multiprocessing's resource tracker)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` but multiprocessing's resource tracker: the inference
    process's fork server and the decoding processes forked from it."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    return [
        d
        for c in children
        if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
        for d in [c, *_descendants(c)]
    ]


def test_the_crasher_aborts_a_process(tmp_path: Path, chest_ds: pydicom.Dataset) -> None:
    """The premise: decoding the file ends a Python process with SIGABRT (not an exception)."""
    (small,) = small_chests(chest_ds, tmp_path, 1)
    bad = jpeg_ls_that_aborts(small, tmp_path / "bad.dcm")
    code = f"import pydicom; pydicom.dcmread({str(bad)!r}).pixel_array"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == -6


KILLED = "pixel data cannot be decoded: the decoding process was killed by SIGABRT"


def test_the_engine_reads_the_files_in_flight_again_alone(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    """`xrayage infer` and the node's worker: the crasher is that file's error, its
    neighbours in the batch and the next batch are read again and analysed."""
    small = small_chests(chest_ds, tmp_path / "images", 3)
    bad = jpeg_ls_that_aborts(small[0], tmp_path / "bad.dcm")
    with Engine(AgeModel.load(weights, "cpu"), batch_size=2, workers=2) as engine:
        outcomes = list(engine.run([small[1], bad, small[2], small[1], small[2]]))
    assert [o.error for o in outcomes] == [None, KILLED, None, None, None]
    assert all(o.xray_age is not None for o in outcomes if o.error is None)


def test_an_image_that_kills_the_decoder_does_not_take_the_node_down(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    small = small_chests(chest_ds, tmp_path / "images", 4)
    bad = jpeg_ls_that_aborts(small[0], tmp_path / "bad.dcm")
    port = free_port()
    config = node_config(tmp_path, port, weights, None, model="max_attempts = 2")
    node = NodeProcess(config, port, tmp_path / "node.log", http_port=free_port())
    db = Database(f"sqlite:///{tmp_path / 'data' / 'xrayage.db'}")
    node.start()
    try:
        assert node.proc is not None
        serving = node.proc.pid
        (inference,) = _inference_children(serving)
        sent = storescu(port, bad, *small[1:3], options=("-xt",))
        assert sent.returncode == 0, sent.stderr

        def states() -> dict[str, InstanceState]:
            with db.session() as s:
                return {i.sop_instance_uid: i.state for i in s.scalars(select(Instance))}

        def deaths() -> list[str]:
            with db.session() as s:
                details = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "node"))
                return [d for d in details if d and "inference process" in d]

        bad_uid = pydicom.dcmread(bad, stop_before_pixels=True).SOPInstanceUID
        wait_until(lambda: states().get(bad_uid) == InstanceState.FAILED, 180, "bad one failed")
        wait_until(
            lambda: list(states().values()).count(InstanceState.REPORTED) == 2, 120, "reports"
        )
        # Only a decoding process died: the file that killed it, read again alone, failed at
        # once with the cause; the receiver and the inference process (and its model) live on.
        with db.session() as s:
            failed = s.scalars(select(Instance).where(Instance.sop_instance_uid == bad_uid)).one()
        assert failed.reason == KILLED
        assert deaths() == []
        assert node.proc.poll() is None and node.proc.pid == serving
        assert _inference_children(serving) == [inference]
        assert echo(port)
        assert storescu(port, small[3]).returncode == 0
        wait_until(
            lambda: list(states().values()).count(InstanceState.REPORTED) == 3, 120, "reports"
        )

        # A death of the inference process itself (the model's, say) is the supervisor's:
        # audited with its cause, and a new process takes over.
        os.kill(inference, signal.SIGKILL)
        wait_until(lambda: len(deaths()) == 1, 30, "the death audited")
        assert f"inference process {inference} killed by SIGKILL" in deaths()[0]
        wait_until(node.ready, 60, "ready again")
        (inference,) = _inference_children(serving)
        decoders = _descendants(inference)
        assert len(decoders) >= 2  # the fork server and a decoding process, before any image

        # A killed `serve` takes its inference process with it (its successor would otherwise
        # wait a lease for the jobs that one holds), and that one its decoding processes.
        node.proc.kill()
        node.proc.wait()
        wait_until(lambda: not running(inference), 0.5, "the inference process to die")
        wait_until(lambda: not any(map(running, decoders)), 10, "its decoders to end")
    finally:
        node.stop()
        db.dispose()
