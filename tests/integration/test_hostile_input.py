"""Hostile, malformed, truncated and oversized input: nothing raises out of the message
path, every byte is stored, and the engine keeps serving everyone else."""

from __future__ import annotations

import socket
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from drivers.registry import create_driver
from engine.config import InterfaceConfig
from engine.mapping import load_mapping
from engine.pipeline import InterfaceRuntime, ingest
from lis_bridge.db import make_engine, session_factory, upgrade
from lis_bridge.models import RawMessage
from tests.integration.enginerun import REPO, free_port, running_engine

VALID_ORU = (REPO / "fixtures" / "oru_DEMO0001.hl7").read_bytes()
VALID_ASTM = (
    b"H|\\^&|||an^1|||||host||P|1\rP|1\rO|1|S-1||^^^GLU|R||||||N||||||||||||||F\r"
    b"R|1|^^^GLU|5.1|mmol/L|3.9 to 6.1|N||F||||20240101090000|M1\rL|1|N\r"
)


def _runtime(protocol: str) -> InterfaceRuntime:
    driver = "hl7-generic" if protocol == "hl7" else "astm-generic"
    mapping = REPO / "mappings" / f"generic_{protocol}.yaml"
    config = InterfaceConfig(name=f"fuzz-{protocol}", protocol=protocol, driver=driver,
                             mapping=mapping, listen="tcp:0:interface=127.0.0.1")
    return InterfaceRuntime(config, create_driver(driver, protocol), load_mapping(mapping))


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, insertions, byte flips and splices of a valid message, plus noise."""
    cut = st.integers(0, len(seed)).map(lambda n: seed[:n])
    flip = st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)).map(
        lambda t: seed[: t[0]] + bytes([t[1]]) + seed[t[0] + 1:])
    insert = st.tuples(st.integers(0, len(seed)), st.binary(max_size=64)).map(
        lambda t: seed[: t[0]] + t[1] + seed[t[0]:])
    noise = st.binary(max_size=512)
    return st.one_of(cut, flip, insert, noise)


def test_any_bytes_are_stored_and_never_raise(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lis.db'}"
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    runtimes = {"hl7": _runtime("hl7"), "astm": _runtime("astm")}

    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(hl7=_mutations(VALID_ORU), astm=_mutations(VALID_ASTM))
    def check(hl7: bytes, astm: bytes) -> None:
        for protocol, raw in (("hl7", hl7), ("astm", astm)):
            with sessions() as session:
                result = ingest(session, runtimes[protocol], raw, "127.0.0.1:1")
                session.commit()
            assert result.outcome in ("accepted", "held", "rejected", "duplicate", "ack")
            with sessions() as session:
                row = session.get(RawMessage, result.message_id)
                assert row is not None and row.payload == raw  # the exact bytes, always

    try:
        check()
    finally:
        engine.dispose()


def test_engine_keeps_serving_through_garbage_and_oversized_blocks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lis.db'}"
    upgrade(make_engine(url))
    port = free_port()
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"interfaces:\n  - name: h\n    protocol: hl7\n"
        f"    mapping: {REPO / 'mappings' / 'generic_hl7.yaml'}\n"
        f"    transport: {{listen: 'tcp:{port}:interface=127.0.0.1'}}\n"
        "    limits: {max_message_bytes: 4096}\n"
    )
    with running_engine(config, url, tmp_path) as engine:
        # an oversized block, then garbage with stray control bytes, on two connections
        with socket.create_connection(("127.0.0.1", port), timeout=10) as big:
            big.sendall(b"\x0b" + b"A" * 20_000 + b"\x1c\r")
            big.settimeout(10)
            assert big.recv(100) in (b"",)  # refused and closed, never acknowledged
        with socket.create_connection(("127.0.0.1", port), timeout=10) as noisy:
            noisy.sendall(b"\x1c\r\x00\xff\x0b\x0b\x1cjunk\r\n" * 50)
        # a well-behaved analyzer is still served
        with socket.create_connection(("127.0.0.1", port), timeout=10) as good:
            good.sendall(b"\x0b" + VALID_ORU + b"\x1c\r")
            reply = b""
            while b"\x1c\r" not in reply:
                chunk = good.recv(4096)
                assert chunk
                reply += chunk
            assert b"MSA|" in reply
        engine.wait_for("mllp.message.too_large")
    with session_factory(make_engine(url))() as session:
        controls = session.scalars(select(RawMessage.control_id)).all()
        assert "DEMO-0001" in controls
