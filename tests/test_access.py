"""Access control at association time, with DCMTK's storescu as the caller: calling AE titles
and peer addresses outside the allow-lists are refused and audited; allowed ones store."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from node.service import NodeService
from storage import AuditEvent, Instance
from tests.conftest import node_in_process, storescu
from tests.servers import wait_until


def _audit(service: NodeService) -> list[tuple[str, str, str, str]]:
    """The association audit rows, once there is one: the node writes them after answering, so
    the caller may have exited a moment before."""

    def rows() -> list[tuple[str, str, str, str]]:
        with service.db.session() as s:
            found = s.scalars(select(AuditEvent).where(AuditEvent.event == "association")).all()
            return [(r.event, r.outcome, r.actor, r.detail or "") for r in found]

    wait_until(rows, 10, "an association audit row")
    return rows()


def _stored(service: NodeService) -> int:
    with service.db.session() as s:
        return len(s.scalars(select(Instance)).all())


def test_an_unknown_calling_ae_is_rejected_and_audited(tmp_path: Path, chest_pa: Path) -> None:
    with node_in_process(tmp_path, node={"allowed_calling_aets": ["PACS", "MODALITY1"]}) as service:
        out = storescu(service.settings.node.port, chest_pa)
        assert out.returncode != 0
        assert "Association Rejected" in out.stderr + out.stdout
        assert _stored(service) == 0
        [(_, outcome, actor, detail)] = _audit(service)
        assert (outcome, actor) == ("failure", "STORESCU")
        assert "rejected: calling ae title not recognised" in detail and "127.0.0.1" in detail


def test_a_listed_calling_ae_stores_and_the_association_is_audited(
    tmp_path: Path, chest_pa: Path
) -> None:
    with node_in_process(tmp_path, node={"allowed_calling_aets": ["STORESCU"]}) as service:
        out = storescu(service.settings.node.port, chest_pa)
        assert out.returncode == 0, out.stderr
        assert _stored(service) == 1
        assert _audit(service)[0][:3] == ("association", "success", "STORESCU")


def test_a_peer_outside_the_allowed_networks_is_disconnected(
    tmp_path: Path, chest_pa: Path
) -> None:
    with node_in_process(
        tmp_path, node={"allowed_peers": ["10.0.0.0/8", "192.168.1.7"]}
    ) as service:
        out = storescu(service.settings.node.port, chest_pa)
        assert out.returncode != 0 and _stored(service) == 0
        [(_, outcome, _, detail)] = _audit(service)
        assert outcome == "failure" and "peer 127.0.0.1 not allowed" in detail
    with node_in_process(tmp_path / "ok", node={"allowed_peers": ["127.0.0.0/8"]}) as service:
        assert storescu(service.settings.node.port, chest_pa).returncode == 0
        assert _stored(service) == 1
