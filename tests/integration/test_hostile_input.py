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
    # A NUL inside a field: SQLite stores it, PostgreSQL refuses it in text (the message
    # failed in the database, one at a time too, before decode_raw rejected it).
    nul = st.integers(0, len(seed)).map(lambda n: seed[:n] + b"\x00" + seed[n:])
    return st.one_of(cut, flip, insert, noise, nul)


def test_any_bytes_are_stored_and_never_raise(db_url: str) -> None:
    """On SQLite and PostgreSQL: whatever the bytes, ingest stores them exactly and gives
    an outcome; it never raises."""
    engine = make_engine(db_url)
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


def test_a_nul_in_a_field_is_a_clear_decode_error(db_url: str) -> None:
    """A NUL byte inside a field (line noise, a broken converter) made PostgreSQL refuse the
    message's text, in the batch and alone. It is rejected as it is decoded, naming the
    field, with the bytes kept; hex escapes that name a NUL (HL7 \\X00\\, ASTM &X00&) are
    kept as sent instead of becoming one."""
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    runtimes = {"hl7": _runtime("hl7"), "astm": _runtime("astm")}
    cases = [
        ("hl7", VALID_ORU.replace(b"OBX|1|", b"OBX|1|\x00", 1), "rejected"),
        ("astm", VALID_ASTM.replace(b"5.1", b"5\x00.1"), "rejected"),
        ("hl7", VALID_ORU.replace(b"OBX|1|", b"OBX|1|\\X00\\", 1), None),
        ("astm", VALID_ASTM.replace(b"5.1", b"5.1&X00&"), None),
    ]
    try:
        for protocol, raw, expected in cases:
            with sessions() as session:
                result = ingest(session, runtimes[protocol], raw, "127.0.0.1:1")
                session.commit()
            if expected is not None:
                assert result.outcome == expected
                assert result.hold_reason == "DECODE_ERROR"
                assert "NUL character (byte 0x00) in specimens[0].observations[0]" in (
                    result.hold_detail)
            else:
                assert result.outcome in ("accepted", "held")
            with sessions() as session:
                row = session.get(RawMessage, result.message_id)
                assert row is not None and row.payload == raw
    finally:
        engine.dispose()
