"""The engine as a user runs it: `labrelay run` on 127.0.0.1, a real database, python-hl7's
`mllp_send` as the external client (PROTOCOLS 75-90), and a SIGKILL in the middle of a stream.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from engine.cli import main as cli
from lis_bridge.db import make_engine, session_factory
from lis_bridge.models import MessageStatus, RawMessage, Result, Sample
from tests.integration.enginerun import REPO, free_port, running_engine

pytestmark = pytest.mark.slow

MLLP_SEND = Path(sys.executable).with_name("mllp_send")


def write_config(tmp_path: Path, port: int, *, ack_policy: str = "after_apply") -> Path:
    config = tmp_path / "labrelay.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
interfaces:
  - name: e2e-hl7
    protocol: hl7
    driver: hl7-generic
    mapping: {REPO / 'mappings' / 'generic_hl7.yaml'}
    transport:
      listen: tcp:{port}:interface=127.0.0.1
    ack: {{policy: {ack_policy}}}
    allowlist: [127.0.0.1]
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: e2e-signing-key-0123456789abcdef
"""
    )
    return config


def import_orders(db_url: str, *receive: str) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["orders", "import", str(REPO / "fixtures" / "orders_example.csv"),
                                 "--database", db_url])
    assert result.exit_code == 0, result.output
    if receive:
        result = runner.invoke(cli, ["samples", "receive", *receive, "--location", "Main lab",
                                     "--by", "tester", "--database", db_url])
        assert result.exit_code == 0, result.output


def mllp_send(port: int, message_file: Path) -> str:
    assert MLLP_SEND.exists(), "python-hl7 provides the mllp_send client"
    done = subprocess.run(
        [str(MLLP_SEND), "--port", str(port), "--file", str(message_file), "--loose",
         "127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_results_arrive_with_real_client_and_are_acknowledged(db_url: str, tmp_path: Path) -> None:
    import_orders(db_url, "DEMO0001")
    port = free_port()
    config = write_config(tmp_path, port)
    with running_engine(config, db_url, tmp_path) as engine:
        # PROTOCOLS 83-85: AA, MSA-2 echoes MSH-10, sender and receiver swapped
        output = mllp_send(port, REPO / "fixtures" / "oru_DEMO0001.hl7")
        assert "MSA|AA|DEMO-0001" in output
        assert "MSH|^~\\&|LABRELAY|LAB|DEMOANALYZER|CHEM1|" in output.replace("\n", "\r")
        # DESIGN rule 3: an unknown specimen is stored and HELD; the analyzer gets AE + ERR
        output = mllp_send(port, REPO / "fixtures" / "oru_unknown_specimen.hl7")
        assert "MSA|AE|DEMO-0002" in output
        assert "ERR|" in output and "UNKNOWN_SPECIMEN" in output
        # PROTOCOLS 90 / DESIGN rule 5: a resend is acknowledged again, not applied twice
        output = mllp_send(port, REPO / "fixtures" / "oru_DEMO0001.hl7")
        assert "MSA|AA|DEMO-0001" in output
        assert engine.stop() == 0  # Ctrl-C: a clean stop
    assert engine.events("engine.stopped")
    sessions = session_factory(make_engine(db_url))
    with sessions() as session:
        statuses = [r.status for r in session.scalars(select(RawMessage).order_by(RawMessage.id))]
        assert statuses == [MessageStatus.APPLIED, MessageStatus.HELD, MessageStatus.DUPLICATE]
        sample = session.scalar(select(Sample).where(Sample.specimen_id == "DEMO0001"))
        assert sample is not None and sample.state in ("COMPLETED", "REPORTED")
        results = session.scalar(select(func.count()).select_from(Result)
                                 .where(Result.sample_fk == sample.id))
        assert results == 6
    # No patient data in the engine's log (names, ids, birth dates, values)
    log_text = "".join(engine.raw_lines)
    for secret in ("Testperson", "PX-1001", "19610412", "1961-04-12", "Alma"):
        assert secret not in log_text


def _stream(port: int, messages: list[bytes], acked: list[str], stop_after: int) -> None:
    """Send messages one by one, recording every control id whose AA came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for n, message in enumerate(messages):
            sock.sendall(b"\x0b" + message + b"\x1c\r")
            buffer = b""
            try:
                while b"\x1c\r" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
            except OSError:
                return
            if b"MSA|AA|" in buffer:
                acked.append(buffer.split(b"MSA|AA|", 1)[1].split(b"|")[0].split(b"\r")[0]
                             .decode())
            if n + 1 == stop_after:
                return


def _message(n: int) -> bytes:
    return (
        f"MSH|^~\\&|KILLTEST|CHEM1|LABRELAY|LAB|20250303101500||ORU^R01^ORU_R01|K{n:05d}|P|2.5.1\r"
        f"PID|1||PX-1001\rOBR|1|DEMO0001|DEMO0001|CHEM^Chemistry\r"
        f"OBX|1|NM|GLU^Glucose||{5 + n / 100:.2f}|mmol/L|3.9-6.1|N|||P\r"
    ).encode()


def test_sigkill_loses_no_acknowledged_message(db_url: str, tmp_path: Path) -> None:
    """DESIGN rule 1: every message that was ACKed is in the database exactly once after a
    SIGKILL and a restart, and the sender's resends are recognised as duplicates."""
    import_orders(db_url, "DEMO0001")
    port = free_port()
    config = write_config(tmp_path, port)
    messages = [_message(n) for n in range(400)]
    acked_first: list[str] = []
    with running_engine(config, db_url, tmp_path) as engine:
        import threading

        sender = threading.Thread(target=_stream, args=(port, messages, acked_first, 0))
        sender.start()
        # Kill mid-stream, once some messages are through (bounded wait, no fixed sleep)
        for _ in range(2000):
            if len(acked_first) >= 50 or not sender.is_alive():
                break
            sender.join(0.01)
        engine.process.send_signal(signal.SIGKILL)
        engine.process.wait(10)
        sender.join(30)
    assert 0 < len(acked_first) < len(messages), "the kill should land mid-stream"
    # Restart and resend everything, as an analyzer does with unacknowledged messages
    acked_second: list[str] = []
    with running_engine(config, db_url, tmp_path):
        _stream(port, messages, acked_second, 0)
    sessions = session_factory(make_engine(db_url))
    with sessions() as session:
        rows = session.execute(
            select(RawMessage.control_id, RawMessage.status).where(
                RawMessage.status != MessageStatus.DUPLICATE)
        ).all()
    stored = [control for control, _status in rows]
    for control in acked_first:
        count = stored.count(control)
        assert count == 1, f"{control} was ACKed but stored {count} times"
    assert len(set(stored)) == len(stored) == len(messages)
    assert len(acked_second) == len(messages)


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX userland")
def test_bad_config_does_not_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("interfaces:\n  - name: x\n    protocol: smoke-signals\n")
    done = subprocess.run([sys.executable, "-m", "engine", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert done.returncode != 0
    assert f"{bad}:3: interfaces[0].protocol: expected one of hl7, astm" in done.stderr


def test_a_crashed_ingest_process_is_restarted_and_nothing_acked_is_lost(
        db_url: str, tmp_path: Path) -> None:
    """The ingest process (engine.ingest_process) killed under load: the messages it held
    get no positive ACK (DESIGN rule 2), the engine logs it, starts it again, and every
    message that was ACKed is stored exactly once; the resends are duplicates."""
    import os
    import threading

    import_orders(db_url, "DEMO0001")
    port = free_port()
    config = write_config(tmp_path, port)
    messages = [_message(n) for n in range(300)]
    acked: list[str] = []
    with running_engine(config, db_url, tmp_path) as engine:
        child = engine.wait_for("ingest.process.started")["process_id"]
        assert isinstance(child, int)
        sender = threading.Thread(target=_stream, args=(port, messages, acked, 0))
        sender.start()
        for _ in range(2000):  # bounded: kill once some messages are through
            if len(acked) >= 30 or not sender.is_alive():
                break
            sender.join(0.01)
        os.kill(child, signal.SIGKILL)
        sender.join(60)
        exited = engine.wait_for("ingest.process.exited")
        assert exited["how"] == "signal 9"
        # started again (a second "started" event and its "ready"); then every resend
        # is answered
        engine.wait_for("ingest.process.started", count=2)
        engine.wait_for("ingest.process.ready", count=2)
        resent: list[str] = []
        _stream(port, messages, resent, 0)
        assert engine.stop() == 0
    assert 0 < len(acked) < len(messages), "the kill should land mid-stream"
    assert len(resent) == len(messages)
    sessions = session_factory(make_engine(db_url))
    with sessions() as session:
        stored = [c for c, in session.execute(select(RawMessage.control_id).where(
            RawMessage.status != MessageStatus.DUPLICATE)).all()]
    for control in acked:
        assert stored.count(control) == 1, f"{control} ACKed, stored {stored.count(control)} times"
    assert sorted(stored) == sorted(f"K{n:05d}" for n in range(len(messages)))


def test_after_commit_messages_a_crashed_ingest_process_stored_are_applied_after_restart(
        db_url: str, tmp_path: Path) -> None:
    """after_commit: a message the ingest process committed as RECEIVED before it died,
    and so never reported to the engine (the analyzer got no ACK; its resend is a
    duplicate), is applied once the ingest process is started again, not at the next
    restart of the engine. Here the row is written straight to the database, as the
    ingest process would have left it, and the ingest process is then killed."""
    import os

    from engine.config import load_config
    from engine.pipeline import ingest, load_runtime

    import_orders(db_url, "DEMO0001")
    port = free_port()
    config = write_config(tmp_path, port, ack_policy="after_commit")
    sessions = session_factory(make_engine(db_url))
    with running_engine(config, db_url, tmp_path) as engine:
        child = engine.wait_for("ingest.process.ready")
        child_pid = engine.wait_for("ingest.process.started")["process_id"]
        assert isinstance(child_pid, int) and child
        rt = load_runtime(load_config(config).interfaces[0])
        with sessions() as session:
            stored = ingest(session, rt, _message(7), "127.0.0.1:9", apply_now=False)
            session.commit()
        assert stored.status == MessageStatus.RECEIVED
        os.kill(child_pid, signal.SIGKILL)
        engine.wait_for("ingest.process.started", count=2)
        resumed = engine.wait_for("engine.resumed")
        assert resumed["messages"] == 1
        engine.wait_for("message.applied")
        assert engine.stop() == 0
    with sessions() as session:
        row = session.get(RawMessage, stored.message_id)
        assert row is not None and row.status == MessageStatus.APPLIED
        assert session.scalar(select(func.count()).select_from(Result)) == 1
    assert not engine.events("message.apply.failed")


def test_the_ingest_process_leaves_signals_to_the_engine(db_url: str, tmp_path: Path) -> None:
    """Ctrl-C and a service manager's SIGTERM reach the whole process group: the ingest
    process ignores them and finishes when the engine closes its input, so a message in
    its hands is answered and a clean stop stays clean (exit code 0)."""
    import os

    import_orders(db_url, "DEMO0001")
    port = free_port()
    config = write_config(tmp_path, port)
    with running_engine(config, db_url, tmp_path) as engine:
        child = engine.wait_for("ingest.process.started")["process_id"]
        assert isinstance(child, int)
        engine.wait_for("ingest.process.ready")
        os.kill(child, signal.SIGTERM)
        os.kill(child, signal.SIGINT)
        acked: list[str] = []
        _stream(port, [_message(1)], acked, 0)
        assert acked == ["K00001"]  # still there, still answering
        assert engine.stop() == 0
    stopped = engine.wait_for("ingest.process.stopped")
    assert stopped["how"] == "exit code 0"
    assert not engine.events("ingest.process.exited")


def test_a_second_stop_signal_is_not_an_error(sqlite_url: str, tmp_path: Path) -> None:
    """Ctrl-C twice, or `timeout` signalling the engine and then its process group: one
    clean stop, no critical traceback."""
    import os

    config = write_config(tmp_path, free_port())
    with running_engine(config, sqlite_url, tmp_path) as engine:
        engine.wait_for("ingest.process.ready")
        os.kill(engine.process.pid, signal.SIGTERM)
        os.kill(engine.process.pid, signal.SIGINT)
        assert engine.process.wait(30) == 0
    engine.wait_for("engine.stopped")
    assert len(engine.events("engine.stop.requested")) == 1
    assert not [line for line in engine.raw_lines if '"critical"' in line]


def test_content_the_database_refuses_is_held_through_the_ingest_process(
        db_url: str, tmp_path: Path) -> None:
    """The ingest process's side of test_pipeline's held-not-refused test: a write the
    database refuses (a trigger of this test's own refuses every result row) reaches the
    engine as the message's fault, not a storage failure. The bytes are kept, HELD with
    INTERNAL_ERROR, and the analyzer gets AE, not "database unavailable, resend"."""
    from tests.integration.refusals import refuse_results

    import_orders(db_url, "DEMO0001")
    engine_db = make_engine(db_url)
    with engine_db.begin() as conn:
        refuse_results(conn)
    engine_db.dispose()
    port = free_port()
    with running_engine(write_config(tmp_path, port), db_url, tmp_path) as engine:
        output = mllp_send(port, REPO / "fixtures" / "oru_DEMO0001.hl7")
        assert "MSA|AE|DEMO-0001" in output, output
        assert "unavailable" not in output
        assert engine.stop() == 0
    sessions = session_factory(make_engine(db_url))
    with sessions() as session:
        rows = [(r.status, r.hold_reason) for r in session.scalars(select(RawMessage))]
    assert rows == [(MessageStatus.HELD, "INTERNAL_ERROR")]
