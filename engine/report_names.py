"""Report settings completed from the interfaces' mappings: panels and display names."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import structlog

from engine.errors import MappingError

log = structlog.get_logger(__name__)


def with_mapping_names(settings: Any, config: Any) -> Any:
    """``settings`` (a ReportSettings) with test panels and names from every mapping the
    configuration's interfaces use; the first mapping that names a test wins."""
    from engine.mapping import load_mapping

    panels: dict[str, str] = {}
    names: dict[str, str] = {}
    for iface in getattr(config, "interfaces", ()):
        if iface.mapping is None:
            continue
        try:
            mapping = load_mapping(Path(iface.mapping))
        except MappingError as exc:
            log.warning("report.mapping.unreadable", interface=iface.name, reason=str(exc)[:200])
            continue
        for test_code in sorted(mapping.lis_codes()):
            test = mapping.test(test_code)
            if test is None:
                continue
            if test.panel:
                panels.setdefault(test_code, test.panel)
            if test.name:
                names.setdefault(test_code, test.name)
    return dataclasses.replace(settings, test_panels=tuple(sorted(panels.items())),
                               test_names=tuple(sorted(names.items())))
