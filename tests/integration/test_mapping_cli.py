"""`labrelay mapping` commands through click's CliRunner, on real files and a real SQLite DB."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.mapping import load_mapping
from lis_bridge.db import make_engine, session_factory
from lis_bridge.models import MessageStatus, RawMessage

REPO = Path(__file__).resolve().parents[2]
GENERIC_HL7 = REPO / "mappings" / "generic_hl7.yaml"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def mapping_copy(tmp_path: Path) -> Path:
    target = tmp_path / "site.yaml"
    shutil.copyfile(GENERIC_HL7, target)
    return target


def test_check_shipped_files(runner: CliRunner) -> None:
    files = sorted(str(p) for p in (REPO / "mappings").glob("*.yaml"))
    result = runner.invoke(main, ["mapping", "check", *files])
    assert result.exit_code == 0, result.output
    assert "generic_hl7.yaml: OK - Generic HL7 v2 analyzer (hl7), mapping version 1.0" in \
        result.output
    assert "unit conversions" in result.output
    assert "critical limits on" in result.output


def test_check_lists_every_error_and_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'metadata: {analyzer: X, protocol: hl7, version: "1"}\n'
        "tests:\n"
        "  GLU:\n"
        "    test: GLU\n"
        "    units: {ucum: mmol/L, convert: [{from: mg/dL, factor: x}]}\n"
        "    critcal: {low: 1}\n",
        encoding="utf-8",
    )
    result = runner.invoke(main, ["mapping", "check", str(GENERIC_HL7), str(bad)])
    assert result.exit_code == 1
    assert "generic_hl7.yaml: OK" in result.output
    assert f"{bad}:5: tests.GLU.units.convert[0].factor: expected a number" in result.output
    assert f"{bad}:6: tests.GLU.critcal: unknown key" in result.output


def test_show_one_code(runner: CliRunner) -> None:
    result = runner.invoke(main, ["mapping", "show", str(GENERIC_HL7), "--code", "glucose"])
    assert result.exit_code == 0, result.output
    assert "LIS test:      GLU  Glucose" in result.output
    assert "mg/dL x 0.0555 -> mmol/L" in result.output
    assert "critical:      low 2.5, high 25.0" in result.output
    roche = REPO / "mappings" / "roche_cobas_c311.yaml"
    result = runner.invoke(main, ["mapping", "show", str(roche), "--code", "685/"])
    assert "LIS test:      ALT" in result.output
    assert "ordered as:    685" in result.output


def test_show_ignored_and_unknown(runner: CliRunner) -> None:
    result = runner.invoke(main, ["mapping", "show", str(GENERIC_HL7), "--code", "PT"])
    assert result.exit_code == 0
    assert "ignored on purpose" in result.output
    result = runner.invoke(main, ["mapping", "show", str(GENERIC_HL7), "--code", "NOPE"])
    assert result.exit_code == 1
    assert "NOPE is not mapped" in result.output
    assert "labrelay mapping set" in result.output


def test_show_all_codes(runner: CliRunner) -> None:
    result = runner.invoke(main, ["mapping", "show", str(GENERIC_HL7)])
    assert result.exit_code == 0
    assert "GLU -> GLU  Glucose  [Chemistry] mmol/L" in result.output
    assert "PT -> (ignored)" in result.output


def test_set_adds_entry_preserving_comments_and_order(
    runner: CliRunner, mapping_copy: Path
) -> None:
    before = mapping_copy.read_text(encoding="utf-8")
    result = runner.invoke(main, [
        "mapping", "set", str(mapping_copy), "--code", "GLUC2", "--test", "GLU",
        "--units", "mmol/L", "--panel", "Chemistry", "--critical-low", "2.5",
        "--critical-high", "25",
    ])
    assert result.exit_code == 0, result.output
    assert "added tests.GLUC2 -> GLU (validated)" in result.output
    after = mapping_copy.read_text(encoding="utf-8")
    # Everything that was there is still there, byte for byte, comments included.
    assert after.startswith(before.rstrip("\n"))
    assert "# REFERENCE RANGES AND CRITICAL LIMITS BELOW ARE EXAMPLES." in after
    assert "# urea (not BUN) mg/dL -> mmol/L" in after
    mapping = load_mapping(mapping_copy)
    added = mapping.find("GLUC2")
    assert added is not None
    assert (added.test_code, added.ucum, added.panel) == ("GLU", "mmol/L", "Chemistry")
    limits = added.critical_limits
    assert [(str(c.low), str(c.high)) for c in limits] == [("2.5", "25")]
    assert [t.analyzer_code for t in mapping.tests][-1] == "GLUC2"


def test_set_changes_existing_entry_in_place(runner: CliRunner, mapping_copy: Path) -> None:
    before = mapping_copy.read_text(encoding="utf-8").splitlines()
    result = runner.invoke(main, [
        "mapping", "set", str(mapping_copy), "--code", "k", "--test", "K",
        "--critical-high", "6.5",
    ])
    assert result.exit_code == 0, result.output
    assert "changed tests.K -> K" in result.output
    after = mapping_copy.read_text(encoding="utf-8").splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [("    critical: {low: 2.8, high: 6.2}",
                        "    critical: {low: 2.8, high: 6.5}")]


def test_set_refuses_invalid_edit(runner: CliRunner, mapping_copy: Path) -> None:
    before = mapping_copy.read_bytes()
    result = runner.invoke(main, [
        "mapping", "set", str(mapping_copy), "--code", "K", "--test", "K",
        "--critical-low", "7",
    ])
    assert result.exit_code == 1
    assert "edit refused" in result.output
    assert "tests.K.critical.low: critical low 7 must be below critical high 6.2" in result.output
    assert mapping_copy.read_bytes() == before
    # a code that is ignored cannot also be mapped
    result = runner.invoke(main, [
        "mapping", "set", str(mapping_copy), "--code", "PT", "--test", "PT",
    ])
    assert result.exit_code == 1
    assert "listed under ignore:" in result.output
    assert mapping_copy.read_bytes() == before
    assert not list(mapping_copy.parent.glob(".site.yaml.*"))  # no temp file left behind


def test_set_refuses_bad_number(runner: CliRunner, mapping_copy: Path) -> None:
    result = runner.invoke(main, [
        "mapping", "set", str(mapping_copy), "--code", "K", "--test", "K",
        "--critical-low", "low",
    ])
    assert result.exit_code == 2
    assert "expected a number" in result.output


def _held(interface: str, detail: str, at: datetime, reason: str = "UNMAPPED_CODE",
          status: str = MessageStatus.HELD) -> RawMessage:
    return RawMessage(
        interface=interface, direction="in", protocol="hl7", sender="LAB", control_id=detail[:8],
        message_type="ORU^R01", payload=b"MSH|...", sha256=f"{hash((interface, detail, at)):x}",
        size=7, received_at=at, status=status, hold_reason=reason, hold_detail=detail,
    )


def test_unmapped_lists_codes_of_held_messages(runner: CliRunner, sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    day = datetime(2025, 7, 1, 8, 0, tzinfo=UTC)
    with session_factory(engine)() as session:
        session.add_all([
            _held("demo-hl7", "unmapped analyzer codes: GLUC2, XYZ; GLUC2: no entry; XYZ: no "
                  "entry; add them to mappings/generic_hl7.yaml", day),
            _held("demo-hl7", "unmapped analyzer codes: GLUC2; GLUC2: units", day.replace(hour=9)),
            _held("demo-astm", "unmapped analyzer codes: 999/", day.replace(hour=10)),
            _held("demo-hl7", "specimen S1 is not known", day, reason="UNKNOWN_SPECIMEN"),
            _held("demo-hl7", "unmapped analyzer codes: OLD", day,
                  status=MessageStatus.APPLIED),
        ])
        session.commit()
        ids = [m.id for m in session.query(RawMessage).order_by(RawMessage.id)]
    engine.dispose()

    result = runner.invoke(main, ["mapping", "unmapped", "--database", sqlite_url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["CODE", "INTERFACE", "COUNT", "FIRST", "SEEN", "LAST", "SEEN",
                                "MESSAGES"]
    rows = {tuple(line.split()[:3]): line for line in lines[1:-1]}
    assert set(rows) == {("GLUC2", "demo-hl7", "2"), ("XYZ", "demo-hl7", "1"),
                         ("999/", "demo-astm", "1")}
    gluc2 = rows[("GLUC2", "demo-hl7", "2")]
    assert "2025-07-01 08:00:00" in gluc2 and "2025-07-01 09:00:00" in gluc2
    assert f"#{ids[0]}, #{ids[1]}" in gluc2
    assert "OLD" not in result.output
    assert "labrelay mapping set" in lines[-1]

    result = runner.invoke(main, ["mapping", "unmapped", "--interface", "demo-astm",
                                  "--database", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "999/" in result.output
    assert "GLUC2" not in result.output


def test_unmapped_when_nothing_is_held(runner: CliRunner, sqlite_url: str) -> None:
    result = runner.invoke(main, ["mapping", "unmapped", "--database", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "no held messages with unmapped analyzer codes" in result.output


def test_help_has_examples(runner: CliRunner) -> None:
    for command in ("check", "show", "set", "unmapped"):
        result = runner.invoke(main, ["mapping", command, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output, command


def test_check_notes_critical_limits_that_leave_patients_out(tmp_path: Path) -> None:
    """Critical limits by age with no entry for everyone: valid, but an adult (or a
    patient of unknown age) gets no critical limits, and `mapping check` says so."""
    path = tmp_path / "k.yaml"
    path.write_text(
        'metadata: {analyzer: t, protocol: hl7, version: "1"}\n'
        "tests:\n"
        "  K:\n"
        "    test: K\n"
        "    critical: [{age_max: 0.0833, low: 2.0, high: 7.5}]\n"
        "  NA:\n"
        "    test: NA\n"
        "    critical: [{age_max: 1, low: 125}, {low: 120, high: 160}]\n")
    result = CliRunner().invoke(main, ["mapping", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert "note: tests.K.critical has no entry for everyone" in result.output
    assert "tests.NA.critical" not in result.output
