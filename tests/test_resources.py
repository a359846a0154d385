"""Out of resources: a full disk, a failing write, a database that cannot be written. The
sender gets 0xA700 (Out of Resources, PS3.4 B.2.3), never Success, and nothing is lost: a
resend once the cause is gone is stored as usual."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.dicom.scu import send_files
from storage import AuditEvent, Instance, Job
from tests.conftest import node_config, node_in_process, small_chests
from tests.servers import NodeProcess, free_port
from tests.test_receive import count, send

A700 = "C-STORE status 0xA700"


def test_a_store_without_its_reserve_of_free_space_answers_a700(
    tmp_path: Path, chest_pa: Path, caplog: pytest.LogCaptureFixture
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    with node_in_process(tmp_path, storage={"min_free_mb": free_mb + 1024}) as node:
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("below [storage] min_free_mb" in m for m in said), said  # said at start
        assert send(node, chest_pa) == [A700]
        assert count(node, Instance) == 0
        assert list((tmp_path / "data" / "dicom").rglob("*.dcm")) == []
        with node.db.session() as s:
            refused = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")).one()
        assert "MB kept in reserve" in (refused.detail or "")


def test_a_write_the_kernel_refuses_answers_a700(
    tmp_path: Path, chest_pa: Path, chest_ds: pydicom.Dataset
) -> None:
    """RLIMIT_FSIZE makes the kernel fail writes past 2 MB (EFBIG), as a full disk would."""
    port = free_port()
    config = node_config(tmp_path, port, None, None, storage="min_free_mb = 0")
    node = NodeProcess(config, port, tmp_path / "node.log", file_size_limit=2 << 20)
    node.start()
    try:
        [small] = small_chests(chest_ds, tmp_path / "small", 1)
        errors = send_files("TESTSCU", "XRAYAGE", "127.0.0.1", port, [chest_pa, small])
        assert errors == [A700, None]  # 7 MB refused, 110 kB stored: the node carries on
        assert "File too large" in node.log.read_text()
        assert list((tmp_path / "data" / "dicom" / "tmp").rglob("*.part")) == []
    finally:
        node.stop()


def test_a_locked_database_answers_a700_and_the_resend_is_stored(
    tmp_path: Path, chest_pa: Path
) -> None:
    with node_in_process(tmp_path, storage={"database_timeout_seconds": 1}) as node:
        lock = sqlite3.connect(tmp_path / "data" / "xrayage.db", isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")  # another writer holds the database
            assert send(node, chest_pa) == [A700]
            lock.execute("ROLLBACK")
            assert send(node, chest_pa) == [None]  # the file kept from the first try is reused
            assert count(node, Instance) == 1 and count(node, Job) == 1
        finally:
            lock.close()
