"""Admin HTTP on localhost: /health (open), /status and /metrics (bearer token)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

MAX_BODY = 64 * 1024


class AdminResource(Resource):
    isLeaf = True

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service

    def _authorised(self, request: Request) -> bool:
        token = self.service.config.admin.token
        if not token:
            return True
        header = (request.getHeader("authorization") or "").strip()
        return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode("ascii", "replace").rstrip("/") or "/"
        if path == "/health":
            status = self.service.status()
            failed = [i["name"] for i in status["interfaces"] if i["status"] == "failed"]
            ingest = status.get("ingest")
            # while the ingest process is down, every analyzer is told to resend
            ingest_down = ingest is not None and not ingest["running"]
            healthy = (not failed and not ingest_down
                       and status["writer"]["storage_errors"] == 0)
            request.setResponseCode(200 if not failed and not ingest_down else 503)
            request.setHeader("content-type", "application/json")
            body: dict[str, Any] = {"ok": healthy, "failed_interfaces": failed}
            if ingest is not None:
                body["ingest_process"] = "down" if ingest_down else "up"
            return json.dumps(body).encode()
        if not self._authorised(request):
            request.setResponseCode(401)
            request.setHeader("www-authenticate", "Bearer")
            return b'{"error": "send Authorization: Bearer <admin token from the config>"}'
        if path == "/status":
            request.setHeader("content-type", "application/json")
            return json.dumps(self.service.status(), indent=2).encode()
        if path == "/metrics":
            request.setHeader("content-type", "text/plain; version=0.0.4")
            return _metrics(self.service.status()).encode()
        request.setResponseCode(404)
        return b'{"error": "not found; try /health, /status or /metrics"}'


    def render_POST(self, request: Request) -> bytes | int:
        """POST /interfaces/<name>/orders {"specimen_ids": [...]}: download orders to an
        analyzer on that interface (ASTM). Answers when the orders are queued on the link.

        POST /mappings/reload: read every interface's mapping file again (200 when all
        loaded, 409 when one did not: that interface keeps the mapping it had)."""
        request.setHeader("content-type", "application/json")
        if not self._authorised(request):
            request.setResponseCode(401)
            return b'{"error": "send Authorization: Bearer <admin token from the config>"}'
        parts = request.path.decode("ascii", "replace").strip("/").split("/")
        if parts == ["mappings", "reload"]:
            return self._reload(request)
        if len(parts) != 3 or parts[0] != "interfaces" or parts[2] != "orders":
            request.setResponseCode(404)
            return b'{"error": "POST /interfaces/<name>/orders or POST /mappings/reload"}'
        assert request.content is not None
        body = request.content.read(MAX_BODY + 1)
        try:
            data: Any = json.loads(body) if len(body) <= MAX_BODY else {}
            specimen_ids = [str(s) for s in data["specimen_ids"]][:1000]
        except (ValueError, TypeError, KeyError):
            request.setResponseCode(400)
            return b'{"error": "expected JSON {\"specimen_ids\": [\"S1\", ...]}"}'
        return _json_later(request, self.service.push_orders(parts[1], specimen_ids),
                           lambda result: 202 if result.get("queued") else 409,
                           failed_code=400, failed_body={})

    def _reload(self, request: Request) -> int:
        return _json_later(request, self.service.reload_mappings(),
                           lambda result: 200 if result.get("ok") else 409,
                           failed_code=500, failed_body={"ok": False})


def _json_later(request: Request, d: Deferred[dict[str, Any]],
                code_of: Callable[[dict[str, Any]], int], *, failed_code: int,
                failed_body: dict[str, Any]) -> int:
    """Answer ``request`` with the JSON ``d`` fires with (status ``code_of(result)``), or
    with ``failed_body`` and the failure's message under ``failed_code``."""

    def done(result: dict[str, Any]) -> None:
        request.setResponseCode(code_of(result))
        request.write(json.dumps(result).encode())
        request.finish()

    def failed(failure: Failure) -> None:
        request.setResponseCode(failed_code)
        request.write(json.dumps({**failed_body, "error": failure.getErrorMessage()}).encode())
        request.finish()

    d.addCallbacks(done, failed)
    return NOT_DONE_YET


def _metrics(status: dict[str, Any]) -> str:
    lines = []
    counters = ("received", "applied", "held", "rejected", "duplicates", "storage_failures")
    for name in counters:
        lines.append(f"# TYPE labrelay_messages_{name}_total counter")
        for iface in status["interfaces"]:
            lines.append(f'labrelay_messages_{name}_total{{interface="{iface["name"]}"}} '
                         f"{iface[name]}")
    lines.append("# TYPE labrelay_interface_up gauge")
    for iface in status["interfaces"]:
        up = 1 if iface["status"] == "up" else 0
        lines.append(f'labrelay_interface_up{{interface="{iface["name"]}"}} {up}')
    lines.append("# TYPE labrelay_connections gauge")
    for iface in status["interfaces"]:
        lines.append(f'labrelay_connections{{interface="{iface["name"]}"}} '
                     f'{iface["connections"]}')
    writer = status["writer"]
    lines.append("# TYPE labrelay_writer_backlog gauge")
    lines.append(f"labrelay_writer_backlog {writer['backlog']}")
    lines.append("# TYPE labrelay_writer_batches_total counter")
    lines.append(f"labrelay_writer_batches_total {writer['batches']}")
    lines.append("# TYPE labrelay_writer_units_total counter")
    lines.append(f"labrelay_writer_units_total {writer['units']}")
    lines.append("# TYPE labrelay_writer_busy_seconds_total counter")
    lines.append(f"labrelay_writer_busy_seconds_total {writer['busy_seconds']}")
    lines.append("# TYPE labrelay_writer_wait_seconds_total counter")
    lines.append(f"labrelay_writer_wait_seconds_total {writer.get('wait_seconds', 0.0)}")
    lines.append("# TYPE labrelay_writer_storage_errors_total counter")
    lines.append(f"labrelay_writer_storage_errors_total {writer['storage_errors']}")
    ingest = status.get("ingest")
    if ingest is not None:
        # the ingest process (engine.ingest_process) and its writer, which applies every
        # inbound message; the labrelay_writer_* lines above are the engine's own writer
        lines.append("# TYPE labrelay_ingest_process_up gauge")
        lines.append(f"labrelay_ingest_process_up {1 if ingest['running'] else 0}")
        lines.append("# TYPE labrelay_ingest_process_restarts_total counter")
        lines.append(f"labrelay_ingest_process_restarts_total {ingest['restarts']}")
        lines.append("# TYPE labrelay_ingest_in_flight gauge")
        lines.append(f"labrelay_ingest_in_flight {ingest['in_flight']}")
        stats = ingest.get("writer") or {}
        for name in ("batches", "units", "busy_seconds", "wait_seconds", "storage_errors"):
            lines.append(f"# TYPE labrelay_ingest_writer_{name}_total counter")
            lines.append(f"labrelay_ingest_writer_{name}_total {stats.get(name, 0)}")
    return "\n".join(lines) + "\n"
