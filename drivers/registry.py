"""Driver discovery through the ``labrelay.drivers`` entry-point group.

A site can ship its own driver package: declare an entry point in that group whose
object is a class with ``name``, ``protocol``, ``detect(raw)`` and ``decode(raw)``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

from drivers.model import AnalyzerMessage
from engine.errors import ConfigError

GROUP = "labrelay.drivers"

# Used when the package metadata is not installed (running from a source tree).
_BUILTIN = {
    "hl7-generic": "drivers.hl7.generic:GenericHL7Driver",
    "astm-generic": "drivers.astm.generic:GenericASTMDriver",
}
_DEFAULT_FOR_PROTOCOL = {"hl7": "hl7-generic", "astm": "astm-generic"}


class Driver(Protocol):
    name: str
    protocol: str

    def detect(self, raw: bytes) -> bool: ...

    def decode(self, raw: bytes) -> AnalyzerMessage: ...


def _load(target: str) -> Any:
    import importlib

    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def available() -> dict[str, str]:
    """Driver name -> import target, entry points first."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def create_driver(name: str, protocol: str, options: dict[str, Any] | None = None) -> Driver:
    """Instantiate the driver ``name`` (or the protocol's generic one for ``auto``)."""
    options = dict(options or {})
    if name == "auto":
        name = _DEFAULT_FOR_PROTOCOL[protocol]
    drivers = available()
    if name not in drivers:
        known = ", ".join(sorted(drivers))
        raise ConfigError(f"unknown driver {name!r}; installed drivers: {known}")
    cls = _load(drivers[name])
    try:
        driver: Driver = cls(options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"driver {name!r}: {exc}") from exc
    if driver.protocol != protocol:
        raise ConfigError(
            f"driver {name!r} speaks {driver.protocol}, but the interface is {protocol}"
        )
    return driver
