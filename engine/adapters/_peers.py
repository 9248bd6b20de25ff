"""Who is on the other end: peer labels and IP allowlists, shared by every adapter."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_text(address: Any) -> str:
    """``host:port`` for a TCP peer, the address's own text otherwise (``serial:/dev/...``)."""
    if isinstance(address, IPv4Address | IPv6Address):
        return f"{address.host}:{address.port}"
    return str(address)


def parse_allowlist(allowlist: Iterable[str] | None) -> tuple[Network, ...] | None:
    """``None`` allows everyone; otherwise a tuple of networks (CIDR or single hosts)."""
    if allowlist is None:
        return None
    networks = []
    for entry in allowlist:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError as exc:
            raise ValueError(
                f"allowlist entry {entry!r} is not an IP address or CIDR network "
                "(e.g. 10.1.2.3 or 10.1.2.0/24)"
            ) from exc
    return tuple(networks)


def host_allowed(networks: tuple[Network, ...] | None, host: str) -> bool:
    if networks is None:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)
