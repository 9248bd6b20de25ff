"""Admin HTTP on localhost: /health (open), /status and /metrics (bearer token)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request


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
            healthy = not failed and status["writer"]["storage_errors"] == 0
            request.setResponseCode(200 if not failed else 503)
            request.setHeader("content-type", "application/json")
            return json.dumps({"ok": healthy, "failed_interfaces": failed}).encode()
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
    lines.append("# TYPE labrelay_writer_storage_errors_total counter")
    lines.append(f"labrelay_writer_storage_errors_total {writer['storage_errors']}")
    return "\n".join(lines) + "\n"
