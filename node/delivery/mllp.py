"""HL7 v2 delivery over MLLP (HL7 v2.5.1 Appendix C, the Minimal Lower Layer Protocol), in
original-mode acknowledgement: each ORU^R01 is sent on its own connection and its ACK awaited
before the next.

- ``AA`` (or ``CA``) whose MSA-2 names the message: delivered.
- ``AE``/``AR`` (``CE``/``CR``): the receiver refused it; the delivery fails at once with the
  ACK's text (MSA-3, or ERR-8 and ERR-3).
- No ACK within ``[delivery] timeout_seconds``, a closed port, a broken connection, an ACK for
  another message: retried under ``[delivery]``.

python-hl7's asyncio streams do the framing, with a bound on what an ACK may take (a receiver
that never ends its block cannot fill the node's memory); hl7apy parses the ACK.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hl7.mllp import open_hl7_connection
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException

from node.config import Destination
from node.delivery.sender import Refused, one_by_one
from node.dicom.tls import client_context
from node.report.hl7 import parse

ACK_LIMIT = 64 * 1024  # bytes: ACKs are a few hundred


class MllpSender:
    def __init__(self, dest: Destination, timeout: float) -> None:
        assert dest.hl7_host is not None and dest.hl7_port is not None
        self.host, self.port, self.timeout = dest.hl7_host, dest.hl7_port, timeout
        self.where = dest.where
        self.tls = client_context(dest.tls, dest.hl7_host) if dest.tls else None

    def send(self, paths: list[Path]) -> list[str | None]:
        return one_by_one(paths, lambda path: asyncio.run(self._send(path.read_bytes())))

    async def _send(self, data: bytes) -> str | None:
        """One message on its own connection: many receivers close theirs after each ACK."""
        ssl_args = {}
        if self.tls is not None:
            ssl_args = {"ssl": self.tls[0], "server_hostname": self.tls[1]}
        try:
            reader, writer = await asyncio.wait_for(
                open_hl7_connection(self.host, self.port, limit=ACK_LIMIT, **ssl_args),
                self.timeout,
            )
        except (OSError, TimeoutError) as e:
            return f"HL7 {self.where}: cannot connect ({type(e).__name__}: {e})"
        try:
            writer.writeblock(data)
            await writer.drain()
            ack = await asyncio.wait_for(reader.readblock(), self.timeout)
        except TimeoutError:
            return f"HL7 {self.where}: no ACK within {self.timeout:g} s"
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            return f"HL7 {self.where}: connection lost before the ACK ({type(e).__name__})"
        finally:
            writer.close()
        return self._outcome(ack, read_control_id(data))

    def _outcome(self, ack: bytes, control_id: str) -> str | None:
        try:
            answer = parse(ack)
            code, acked = answer.msa.msa_1.value, answer.msa.msa_2.value
        except (HL7apyException, UnicodeDecodeError, AttributeError, IndexError) as e:
            return f"HL7 {self.where}: the answer is no ACK ({type(e).__name__})"
        if acked != control_id:
            return f"HL7 {self.where}: ACK for message {acked!r}, not {control_id}"
        if code in ("AA", "CA"):
            return None
        return Refused(f"HL7 {self.where}: ACK {code}: {_ack_text(answer)}")


def read_control_id(data: bytes) -> str:
    return str(parse(data).msh.msh_10.value)


def _ack_text(ack: Message) -> str:
    texts = [ack.msa.msa_3.value] if ack.msa.msa_3.value else []
    for err in (seg for seg in ack.children if seg.name == "ERR"):
        texts += [v for v in (err.err_8.value, err.err_3.to_er7()) if v]
    return "; ".join(texts)[:500] or "no text"
