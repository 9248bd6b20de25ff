"""Raw-byte capture on the running engine, `labrelay capture show`, and `labrelay replay`
into a second running engine (DESIGN rule 7)."""

from __future__ import annotations

import base64
import datetime
import json
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from lis_bridge.db import make_engine, upgrade
from lis_bridge.models import RawMessage
from tests.conftest import CORPUS
from tests.integration.enginerun import LABRELAY, REPO, free_port, running_engine

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, name: str, protocol: str, port: int, *, capture: bool) -> Path:
    mapping = "generic_hl7.yaml" if protocol == "hl7" else "roche_cobas_c311.yaml"
    driver = "hl7-generic" if protocol == "hl7" else "astm-generic"
    ack = "    ack: {policy: after_commit}\n" if protocol == "hl7" else ""
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
capture_dir: {tmp_path / 'captures'}
interfaces:
  - name: {name}
    protocol: {protocol}
    driver: {driver}
    mapping: {REPO / 'mappings' / mapping}
    transport:
      listen: tcp:{port}:interface=127.0.0.1
{ack}    capture: {'true' if capture else 'false'}
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: capture-signing-key-0123456789abcdef
"""
    )
    return config


def second_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'replayed.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def inbound_payloads(db_url: str) -> list[bytes]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(
                select(RawMessage.payload).where(RawMessage.direction == "in")
                .order_by(RawMessage.id)
            ))
    finally:
        engine.dispose()


def oru(control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|CAPTEST|CHEM1|LABRELAY|LAB|20250303101500||ORU^R01^ORU_R01|{control_id}|P|"
        "2.5.1\rPID|1||PX-1001\rOBR|1|DEMO0001|DEMO0001|CHEM^Chemistry\r"
        "OBX|1|NM|GLU^Glucose||5.4|mmol/L|3.9-6.1|N|||F\r"
    ).encode()


def read_reply(sock: socket.socket) -> bytes:
    buffer = b""
    while not buffer.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        assert chunk, "the engine closed the connection"
        buffer += chunk
    return buffer


def capture_file(tmp_path: Path, interface: str) -> Path:
    day = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    files = sorted((tmp_path / "captures").glob(f"{interface}-*.jsonl"))
    assert [f.name for f in files] == [f"{interface}-{day}.jsonl"]
    return files[0]


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def joined(entries: list[dict[str, object]], direction: str, conn: int) -> bytes:
    return b"".join(base64.b64decode(str(e["b64"])) for e in entries
                    if e["dir"] == direction and e["conn"] == conn)


def test_hl7_capture_holds_every_byte_and_replays(db_url: str, tmp_path: Path) -> None:
    port, replay_port = free_port(), free_port()
    config = write_config(tmp_path, "cap-hl7", "hl7", port, capture=True)
    sent: list[bytes] = []
    answered: list[bytes] = []
    with running_engine(config, db_url, tmp_path) as engine:
        for connection in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                block = b"\x0b" + oru(f"CAP-{connection}") + b"\x1c\r"
                # in small pieces, so the capture holds several chunks for one message
                for start in range(0, len(block), 7):
                    sock.sendall(block[start:start + 7])
                answered.append(read_reply(sock))
                sent.append(block)
        assert engine.events("capture.enabled")
    path = capture_file(tmp_path, "cap-hl7")
    # Captures hold patient data: owner read/write only.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = records(path)
    conns = sorted({int(str(e["conn"])) for e in entries})
    assert conns == [1, 2]
    for index, conn in enumerate(conns):
        dirs = [e["dir"] for e in entries if e["conn"] == conn]
        assert dirs[0] == "open" and dirs[-1] == "close"
        assert "in" in dirs and "out" in dirs
        assert joined(entries, "in", conn) == sent[index]
        assert joined(entries, "out", conn) == answered[index]
        assert b"MSA|AA|CAP-" in answered[index]
    assert all(str(e["t"]).endswith("Z") and str(e["peer"]).startswith("127.0.0.1:")
               for e in entries)

    shown = subprocess.run([*LABRELAY, "capture", "show", str(path), "--conn", "2"],
                           capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    assert "patient data" in shown.stderr
    assert "<VT>MSH|^~\\&|CAPTEST|" in shown.stdout
    assert "<FS><CR>" in shown.stdout
    assert "in  <-" in shown.stdout and "out ->" in shown.stdout
    assert "CAP-0" not in shown.stdout  # --conn 2 shows the second connection only
    assert "connection opened" in shown.stdout and "connection closed" in shown.stdout

    # Replay into a second engine with its own database: both messages, in order, AA.
    other_db = second_database(tmp_path)
    other = write_config(tmp_path, "replay-hl7", "hl7", replay_port, capture=False)
    with running_engine(other, other_db, tmp_path):
        done = subprocess.run(
            [*LABRELAY, "replay", str(path), "--to", f"127.0.0.1:{replay_port}"],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "conn 1 #1 CAP-0 AA" in done.stdout
    assert "conn 2 #1 CAP-1 AA" in done.stdout
    assert inbound_payloads(other_db) == [oru("CAP-0"), oru("CAP-1")]


def test_replay_into_nothing_exits_1(tmp_path: Path) -> None:
    capture = tmp_path / "x.jsonl"
    block = base64.b64encode(b"\x0b" + oru("R-1") + b"\x1c\r").decode()
    capture.write_text(json.dumps({"t": "2025-03-03T10:00:00.000000Z", "dir": "in",
                                   "peer": "127.0.0.1:1", "conn": 1, "b64": block}) + "\n")
    done = subprocess.run(
        [*LABRELAY, "replay", str(capture), "--to", f"127.0.0.1:{free_port()}", "--timeout", "2"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )
    assert done.returncode == 1
    assert "conn 1 #1 R-1 - cannot connect" in done.stdout


def test_astm_capture_replays_into_second_engine(db_url: str, tmp_path: Path) -> None:
    session_file = CORPUS / "astm" / "roche_cobas_c311__1.txt"
    if not session_file.exists():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    port, replay_port = free_port(), free_port()
    config = write_config(tmp_path, "cap-astm", "astm", port, capture=True)
    with running_engine(config, db_url, tmp_path):
        done = subprocess.run(
            [*LABRELAY, "send", "astm", "--to", f"127.0.0.1:{port}", "--listen-after", "0.2",
             str(session_file)],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    original = inbound_payloads(db_url)
    assert len(original) == 1
    path = capture_file(tmp_path, "cap-astm")
    entries = records(path)
    inbound = joined(entries, "in", 1)
    outbound = joined(entries, "out", 1)
    # PROTOCOLS 1-5: ENQ opens, EOT closes; every frame was answered with ACK
    assert inbound.startswith(b"\x05") and inbound.endswith(b"\x04")
    assert set(outbound) == {0x06}
    assert outbound.count(b"\x06") == inbound.count(b"\x02") + 1  # frames + the ENQ

    other_db = second_database(tmp_path)
    other = write_config(tmp_path, "replay-astm", "astm", replay_port, capture=False)
    with running_engine(other, other_db, tmp_path):
        done = subprocess.run(
            [*LABRELAY, "replay", str(path), "--to", f"127.0.0.1:{replay_port}",
             "--interface-protocol", "astm", "--listen-after", "0.2"],
            capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "conn 1 session 1 frame 1 FN 1 ACK" in done.stdout
    assert inbound_payloads(other_db) == original
