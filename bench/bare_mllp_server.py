"""The ceiling for bench/ingest_hl7.py: a bare Twisted MLLP server that only stores raw bytes.

Same framer and same group-commit writer as the engine, no decoding, mapping or applying;
the ACK is a fixed AA built from the MSH alone.

    python bench/bare_mllp_server.py PORT DATABASE_URL
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString

from engine.adapters.mllp import MLLPServerFactory
from engine.writer import DatabaseWriter
from lis_bridge.db import make_engine, session_factory, upgrade
from lis_bridge.models import RawMessage


class StoreOnly:
    def __init__(self, writer: DatabaseWriter) -> None:
        self.writer = writer

    def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[bytes]:
        digest = hashlib.sha256(raw).hexdigest()
        control = raw.split(b"\r", 1)[0].split(b"|")[9]

        def work(session: object) -> None:
            session.add(RawMessage(interface=interface, payload=raw, sha256=digest,  # type: ignore[attr-defined]
                                   size=len(raw), peer=peer))

        d = self.writer.submit(work)
        d.addCallback(lambda _r: b"MSH|^~\\&|LIS||BENCH||20261125||ACK^R01^ACK|A1|P|2.5.1\rMSA|AA|"
                      + control + b"\r")
        return d


def main() -> None:
    port, url = int(sys.argv[1]), sys.argv[2]
    engine = make_engine(url)
    upgrade(engine)
    writer = DatabaseWriter(session_factory(engine), reactor)
    writer.start()
    factory = MLLPServerFactory(StoreOnly(writer), "bare", max_connections=64)
    serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(factory)
    reactor.addSystemEventTrigger("before", "shutdown", writer.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
