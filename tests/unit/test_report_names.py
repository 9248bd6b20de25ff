"""Reports group results by the mapping's panels and show its test names."""

from __future__ import annotations

from pathlib import Path

from engine.config import load_config
from engine.report_names import with_mapping_names
from lis_bridge.reports import ReportSettings

REPO = Path(__file__).resolve().parents[2]


def test_panels_and_names_come_from_the_interfaces_mappings(tmp_path: Path) -> None:
    config = load_config(REPO / "config" / "labrelay.example.yaml")
    settings = with_mapping_names(ReportSettings(tmp_path, b"k" * 32), config)
    panels, names = dict(settings.test_panels), dict(settings.test_names)
    assert panels["K"] == "Electrolytes" and names["K"] == "Potassium"
    assert panels["GLU"] == "Chemistry" and names["GLU"] == "Glucose"
