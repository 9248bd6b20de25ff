"""`labrelay decode --option KEY=VALUE`: a driver option tried on a capture."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from engine.cli import main


def _specimens(output: str) -> list[str]:
    return [s["specimen_id"] for m in json.loads(output)["messages"] for s in m["specimens"]]


def test_a_driver_option_changes_what_decode_reads(corpus: Path) -> None:
    """Mindray CL-series HL7 sends its barcode in OBR-2 and a sample number in OBR-3
    (SOURCES.md, mindray_cl2000i__1). Decoded as an interface with
    ``specimen_id_order: [OBR-2, OBR-3]`` would decode it, the barcode is the id."""
    capture = str(corpus / "hl7" / "mindray_cl2000i__1.hl7")
    plain = CliRunner().invoke(main, ["decode", "--json", capture])
    assert plain.exit_code == 0, plain.output
    assert _specimens(plain.output) == ["10"]
    tried = CliRunner().invoke(main, ["decode", "--json", capture,
                                      "--option", "specimen_id_order=[OBR-2, OBR-3]"])
    assert tried.exit_code == 0, tried.output
    assert _specimens(tried.output) == ["12345678"]


def test_a_bad_option_is_refused_with_what_to_write(corpus: Path) -> None:
    capture = str(corpus / "hl7" / "mindray_cl2000i__1.hl7")
    runner = CliRunner()
    not_a_pair = runner.invoke(main, ["decode", capture, "--option", "specimen_id_order"])
    assert not_a_pair.exit_code == 2
    assert "is not KEY=VALUE" in not_a_pair.output
    unknown = runner.invoke(main, ["decode", capture, "--option", "bogus=1"])
    assert unknown.exit_code == 1
    assert "unknown hl7-generic driver option(s): bogus" in unknown.output
    not_yaml = runner.invoke(main, ["decode", capture, "--option", "specimen_id_order=[OBR-2"])
    assert not_yaml.exit_code == 2 and "not YAML" in not_yaml.output
