"""On-demand structural validation with hl7apy (`labrelay decode --validate`)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from drivers.hl7.validate import validate_structure
from engine.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_well_formed_oru_is_valid() -> None:
    report = validate_structure((REPO / "fixtures" / "oru_DEMO0001.hl7").read_bytes())
    assert report.structure == "ORU_R01" and report.version == "2.5.1"
    assert report.valid, report.errors


def test_problems_are_returned_as_data_not_raised() -> None:
    raw = (b"MSH|^~\\&|A|B|C|D|20250101||ORU^R01^ORU_R01|1|P|2.5.1\r"
           b"OBR|1|S1|S1|X\rOBX|1|NM|GLU||5|mmol/L|||||F|||||||||||||||||||extra|fields\r")
    report = validate_structure(raw)
    assert not report.valid
    assert any("OBX" in error for error in report.errors)


def test_decode_validate_flag() -> None:
    result = CliRunner().invoke(
        main, ["decode", "--validate", "--json", str(REPO / "fixtures" / "oru_DEMO0001.hl7")])
    assert result.exit_code == 0, result.output
    assert '"structure": "ORU_R01"' in result.output
