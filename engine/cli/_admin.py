"""Talk to a running engine through its localhost admin HTTP (address and token from the
configuration)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

from engine.cli import CliState


def admin_url(state: CliState) -> tuple[str, str]:
    config = state.load_config()
    listen = config.admin.listen or ""
    fields = listen.split(":")
    options = dict(p.split("=", 1) for p in fields[2:] if "=" in p)
    try:
        port = int(fields[1])
    except (IndexError, ValueError) as exc:
        raise click.ClickException(
            f"{config.source}: `admin.listen` is not set; the running engine cannot be reached"
        ) from exc
    return f"http://{options.get('interface', '127.0.0.1')}:{port}", config.admin.token


def admin_request(
    state: CliState, method: str, path: str, body: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body); raises OSError when the engine is not reachable."""
    base, token = admin_url(state)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - our own http:// admin address
        base + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {"error": str(exc)}
        return int(exc.code), payload
