"""Notifications end to end: real HTTP and SMTP servers on 127.0.0.1, real databases.

Time is driven through the explicit ``now`` of run_once: nothing sleeps.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from engine.cli import main as cli
from engine.outbox_runner import run_once
from lis_bridge.db import transaction
from lis_bridge.models import JobStatus, Notification, OutboxJob, Patient, Sample
from lis_bridge.notifications import (
    ChannelSettings,
    NotificationSettings,
    create_notifications,
    notification_counts,
)
from lis_bridge.outbox import RetryPolicy, enqueue

# Outbox rows are due from the wall-clock time they were written: start just after it.
T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)


@pytest.fixture(autouse=True)
def _fresh_t0() -> None:
    """T0 is "a minute from now" for each test: jobs are queued at the real time, so a T0
    fixed at import would fall behind them in a long suite."""
    global T0
    T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)
PATIENT_NAME = "Zofia Kowalska-Nowak"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class WebhookReceiver:
    """A real HTTP server in a thread, started and stopped on demand on a fixed port."""

    port: int
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.raw.append(body)
                receiver.headers.append(dict(self.headers.items()))
                if receiver.status < 300:
                    receiver.requests.append(json.loads(body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MailSink:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content or envelope.content)
        return "250 OK"


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(port=free_port())  # closed until a test starts it
    yield receiver
    receiver.stop()


@pytest.fixture
def smtp() -> Iterator[tuple[MailSink, int]]:
    sink = MailSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield sink, port
    controller.stop()


def settings_for(webhook: WebhookReceiver, smtp_port: int, **kw: Any) -> NotificationSettings:
    return NotificationSettings(
        channels=(
            ChannelSettings(name="ward-hook", type="webhook", url=webhook.url, timeout=5,
                            headers={"Authorization": "Bearer hook-token"}),
            ChannelSettings(name="oncall-mail", type="smtp", host="127.0.0.1", port=smtp_port,
                            sender="labrelay@lab.example", recipients=("oncall@lab.example",),
                            timeout=5),
        ),
        routes={
            "report_ready": ("ward-hook",),
            "critical_value": ("ward-hook", "oncall-mail"),
            "engine_alert": ("ward-hook",),
        },
        escalate_after=kw.pop("escalate_after", 120.0),
        retry=kw.pop("retry", RetryPolicy(max_attempts=4, initial_delay=5, max_delay=60)),
    )


def make_sample(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        patient = Patient(patient_id="PID-7731", name=PATIENT_NAME, sex="F")
        sample = Sample(specimen_id="SPC-0042", patient=patient, state="REPORTED")
        session.add_all([patient, sample])
        session.flush()
        return sample.id


def notify(sessions: sessionmaker[Session], key: str, payload: dict[str, Any]) -> None:
    with transaction(sessions) as session:
        enqueue(session, "notify", key, payload)


def notifications(sessions: sessionmaker[Session]) -> list[Notification]:
    with transaction(sessions) as session:
        return list(session.scalars(select(Notification).order_by(Notification.id)))


def test_receiver_down_then_back_delivers_exactly_once(
    db_url: str, sessions: sessionmaker[Session], webhook: WebhookReceiver,
    smtp: tuple[MailSink, int],
) -> None:
    settings = settings_for(webhook, smtp[1])
    sample_id = make_sample(sessions)
    notify(sessions, "notify:report_ready:1:v1", {
        "kind": "report_ready", "sample_id": sample_id, "specimen_id": "SPC-0042",
        "version": 1, "report_id": 1, "patient_name": PATIENT_NAME,  # must not travel
    })

    with capture_logs() as logs:
        first = run_once(db_url, None, settings, now=T0)  # receiver down: refused
    assert first.notifications_created == 1
    assert first.delivery_failed == 1
    [n] = notifications(sessions)
    assert n.status == JobStatus.PENDING and n.attempts == 1
    assert "unreachable" in n.last_error
    with transaction(sessions) as session:
        assert session.scalar(select(OutboxJob.status)) == JobStatus.DONE

    # Not due yet (backoff 5 s): no attempt.
    assert run_once(db_url, None, settings, now=T0 + timedelta(seconds=2)).delivery_failed == 0
    assert run_once(db_url, None, settings, now=T0 + timedelta(seconds=6)).delivery_failed == 1

    webhook.start()  # the receiver comes back
    later = T0 + timedelta(seconds=20)
    assert run_once(db_url, None, settings, now=later).delivered == 1
    for minutes in (1, 5, 60):
        again = run_once(db_url, None, settings, now=later + timedelta(minutes=minutes))
        assert again.delivered == 0

    assert len(webhook.requests) == 1, "delivered exactly once"
    [n] = notifications(sessions)
    assert n.status == JobStatus.DONE and n.attempts == 3 and n.delivered_at is not None
    body = webhook.requests[0]
    assert body["kind"] == "report_ready"
    assert body["specimen_id"] == "SPC-0042" and body["sample_id"] == sample_id
    assert "What happens next" in body["body"]
    assert PATIENT_NAME not in webhook.raw[0].decode()
    assert webhook.headers[0]["Authorization"] == "Bearer hook-token"
    assert webhook.headers[0]["Idempotency-Key"] == f"labrelay-notification-{n.id}"
    assert all(PATIENT_NAME not in repr(event) for event in logs)


def test_escalation_to_second_channel_after_delay(
    db_url: str, sessions: sessionmaker[Session], webhook: WebhookReceiver,
    smtp: tuple[MailSink, int],
) -> None:
    sink, port = smtp
    settings = settings_for(webhook, port, escalate_after=120.0,
                            retry=RetryPolicy(max_attempts=10, initial_delay=5, max_delay=60))
    sample_id = make_sample(sessions)
    notify(sessions, "notify:critical:1", {
        "kind": "critical_value", "sample_id": sample_id, "specimen_id": "SPC-0042",
        "test_code": "K", "display_name": "Potassium", "value": "6.9", "units": "mmol/L",
        "flag": "HH", "reference_range": "3.5-5.1",
    })
    run_once(db_url, None, settings, now=T0)
    run_once(db_url, None, settings, now=T0 + timedelta(seconds=60))
    assert sink.messages == []  # not escalated before the delay
    [original] = notifications(sessions)
    assert original.escalated_to_fk is None and original.attempts == 2

    summary = run_once(db_url, None, settings, now=T0 + timedelta(seconds=121))
    assert summary.escalated == 1 and summary.delivered == 1
    assert len(sink.messages) == 1
    mail = message_from_bytes(sink.messages[0])
    assert "[ESCALATED]" in mail["Subject"] and "CRITICAL VALUE" in mail["Subject"]
    text = mail.get_payload()
    assert isinstance(text, str)
    assert "6.9 mmol/L" in text and "SPC-0042" in text and "ward-hook" in text
    original, copy = notifications(sessions)
    assert original.escalated_to_fk == copy.id and copy.channel == "oncall-mail"
    assert original.status == JobStatus.PENDING  # the original keeps retrying
    assert notification_counts(sessions()) == {
        "pending": 1, "failed": 0, "escalated": 1, "delivered": 1}

    # Escalation happens once; the original is still delivered when its channel is back.
    run_once(db_url, None, settings, now=T0 + timedelta(seconds=400))
    assert len(sink.messages) == 1
    webhook.start()
    run_once(db_url, None, settings, now=T0 + timedelta(hours=1))
    assert len(webhook.requests) == 1
    assert {n.status for n in notifications(sessions)} == {JobStatus.DONE}


def test_failed_after_max_attempts_is_listed_and_can_be_retried(
    db_url: str, sessions: sessionmaker[Session], webhook: WebhookReceiver,
    smtp: tuple[MailSink, int],
) -> None:
    webhook.status = 500
    webhook.start()
    settings = settings_for(webhook, smtp[1])
    notify(sessions, "notify:alert:1", {"kind": "engine_alert", "message": "link down",
                                        "interface": "cobas-1"})
    now = T0
    for _ in range(10):
        run_once(db_url, None, settings, now=now)
        now += timedelta(minutes=5)
    [n] = notifications(sessions)
    assert n.status == JobStatus.FAILED and n.attempts == 4
    assert "HTTP 500" in n.last_error
    assert len(webhook.raw) == 4

    runner = CliRunner()
    listed = runner.invoke(cli, ["notifications", "list", "--status", "FAILED",
                                 "--database", db_url])
    assert listed.exit_code == 0, listed.output
    assert f"#{n.id}" in listed.output and "FAILED" in listed.output
    assert "HTTP 500" in listed.output and "failed 1" in listed.output
    as_json = runner.invoke(cli, ["notifications", "list", "--json", "--database", db_url])
    assert json.loads(as_json.output.splitlines()[0])["status"] == "FAILED"

    webhook.status = 204
    retried = runner.invoke(cli, ["notifications", "retry", str(n.id), "--database", db_url])
    assert retried.exit_code == 0, retried.output
    run_once(db_url, None, settings, now=now)
    [n] = notifications(sessions)
    assert n.status == JobStatus.DONE
    missing = runner.invoke(cli, ["notifications", "retry", "99999", "--database", db_url])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_unrouted_kind_is_kept_visible(db_url: str, sessions: sessionmaker[Session]) -> None:
    settings = NotificationSettings()
    with transaction(sessions) as session:
        [n] = create_notifications(session, {"kind": "engine_alert", "message": "x"},
                                   settings, T0)
        assert n.status == JobStatus.FAILED and n.channel == "(none)"
        assert "notifications.routes.engine_alert" in n.last_error


SERVICE_SCRIPT = r'''
import json, sys
from datetime import UTC, datetime
from pathlib import Path

from twisted.internet import reactor, task

from engine.outbox_runner import OutboxRunner
from lis_bridge.db import make_engine, session_factory, transaction
from lis_bridge.models import JobStatus, Notification, Report
from lis_bridge.notifications import ChannelSettings, NotificationSettings
from lis_bridge.reports import ReportSettings
from sqlalchemy import select


def main():
    url, hook, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    reports = ReportSettings(output_dir=out, signing_key=b"service-test-key-0123456789")
    notes = NotificationSettings(
        channels=(ChannelSettings(name="hook", type="webhook", url=hook, timeout=5),),
        routes={"report_ready": ("hook",)},
    )
    runner = OutboxRunner(url, reports, notes, workers=1, poll_interval=0.05)
    sessions = session_factory(make_engine(url))
    state = {"checks": 0}

    def check():
        state["checks"] += 1
        with transaction(sessions) as session:
            reports_done = list(session.scalars(select(Report)))
            delivered = list(session.scalars(select(Notification).where(
                Notification.status == JobStatus.DONE)))
        if (reports_done and delivered) or state["checks"] > 1200:
            loop.stop()
            d = runner.stopService()
            def done(_):
                print(json.dumps({"reports": len(reports_done), "delivered": len(delivered),
                                  "ticks": runner.ticks}))
                reactor.stop()
            d.addBoth(done)

    loop = task.LoopingCall(check)
    reactor.callWhenRunning(runner.startService)
    reactor.callWhenRunning(loop.start, 0.05)
    reactor.run()

# Worker processes (forkserver/spawn) import this module again: guard the entry point.
if __name__ == "__main__":
    main()
'''


def test_outbox_service_renders_and_delivers_under_the_reactor(
    sqlite_url: str, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    """The Twisted service end to end in its own process (the global reactor runs once per
    process): a render job goes through the process pool, its notification to a real
    HTTP receiver, then the service stops cleanly."""
    import subprocess
    import sys

    from lis_bridge.db import make_engine, session_factory

    engine = make_engine(sqlite_url)
    sessions = session_factory(engine)
    sample_id = make_sample(sessions)
    with transaction(sessions) as session:
        sample = session.get(Sample, sample_id)
        assert sample is not None
        sample.state = "COMPLETED"
        enqueue(session, "render_report", "render:1",
                {"sample_id": sample_id, "specimen_id": "SPC-0042", "reason": "completed"})
    engine.dispose()
    webhook.start()
    script = tmp_path / "service.py"
    script.write_text(SERVICE_SCRIPT, encoding="utf-8")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script), sqlite_url, webhook.url, str(tmp_path / "reports")],
        capture_output=True, timeout=90, cwd=repo, check=False,
        env={**__import__("os").environ, "PYTHONPATH": str(repo)},
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["reports"] == 1 and summary["delivered"] == 1
    assert len(webhook.requests) == 1 and webhook.requests[0]["specimen_id"] == "SPC-0042"
    assert PATIENT_NAME.encode() not in done.stdout + done.stderr
