"""Admin HTTP of the running engine (DESIGN: observability): /health open, /status and
/metrics behind the bearer token, counters that move when a message arrives."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.enginerun import REPO, free_port, running_engine

pytestmark = pytest.mark.slow

TOKEN = "admin-test-token-0123456789"


def write_config(tmp_path: Path, port: int, admin_port: int) -> Path:
    config = tmp_path / "labrelay.yaml"
    config.write_text(
        f"""
database: sqlite:///unused.db
node_name: admin-test
interfaces:
  - name: adm-hl7
    protocol: hl7
    driver: hl7-generic
    mapping: {REPO / 'mappings' / 'generic_hl7.yaml'}
    transport:
      listen: tcp:{port}:interface=127.0.0.1
    ack: {{policy: after_commit}}
admin:
  listen: tcp:{admin_port}:interface=127.0.0.1
  token: {TOKEN}
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: admin-signing-key-0123456789abcdef
"""
    )
    return config


def get(admin_port: int, path: str, token: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body); HTTP errors are answers here, not exceptions."""
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http to 127.0.0.1
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["content-type"] or "", exc.read().decode()


def send_oru(port: int, control_id: str) -> bytes:
    message = (
        f"MSH|^~\\&|ADMTEST|CHEM1|LABRELAY|LAB|20250303101500||ORU^R01^ORU_R01|{control_id}|P|"
        "2.5.1\rPID|1||PX-1\rOBR|1|DEMO0001|DEMO0001|CHEM^Chemistry\r"
        "OBX|1|NM|GLU^Glucose||5.4|mmol/L|3.9-6.1|N|||F\r"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x0b" + message + b"\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            assert chunk, "the engine closed the connection"
            answer += chunk
    return answer


def received(admin_port: int) -> int:
    status, _type, body = get(admin_port, "/status", TOKEN)
    assert status == 200
    (iface,) = [i for i in json.loads(body)["interfaces"] if i["name"] == "adm-hl7"]
    return int(iface["received"])


def test_health_status_and_metrics(db_url: str, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    with running_engine(write_config(tmp_path, port, admin_port), db_url, tmp_path) as engine:
        engine.wait_for("admin.started")

        status, ctype, body = get(admin_port, "/health")
        assert status == 200 and ctype.startswith("application/json")
        assert json.loads(body)["ok"] is True
        assert json.loads(body)["ingest_process"] == "up"

        # /status and /metrics need the token
        for path in ("/status", "/metrics"):
            assert get(admin_port, path)[0] == 401
            assert get(admin_port, path, "wrong-token")[0] == 401
        status, ctype, body = get(admin_port, "/status", TOKEN)
        assert status == 200 and ctype.startswith("application/json")
        document = json.loads(body)
        assert document["node"] == "admin-test"
        (iface,) = document["interfaces"]
        assert iface["name"] == "adm-hl7" and iface["status"] == "up"
        assert iface["protocol"] == "hl7" and iface["received"] == 0
        assert iface["address"] == f"127.0.0.1:{port}"

        assert b"MSA|AA|ADM-1" in send_oru(port, "ADM-1")
        deadline = time.monotonic() + 10
        while received(admin_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the counter is bumped on the reactor; bounded wait
        assert received(admin_port) == 1

        status, ctype, body = get(admin_port, "/metrics", TOKEN)
        assert status == 200
        assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
        lines = body.splitlines()
        assert "# TYPE labrelay_messages_received_total counter" in lines
        assert 'labrelay_messages_received_total{interface="adm-hl7"} 1' in lines
        assert 'labrelay_interface_up{interface="adm-hl7"} 1' in lines
        assert "labrelay_ingest_process_up 1" in lines
        assert "labrelay_ingest_writer_units_total 1" in lines
        # how long the message waited for the batch before its own: a small, real figure
        wait = next(line for line in lines
                    if line.startswith("labrelay_ingest_writer_wait_seconds_total "))
        assert 0.0 <= float(wait.split()[1]) < 10.0
        # Prometheus text format: every sample line is `name{labels} value`
        for line in lines:
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                assert name.startswith("labrelay_"), line
                float(value)

        assert get(admin_port, "/nowhere", TOKEN)[0] == 404
