"""`labrelay samples`: collect / dispatch / receive / show / trace / overdue, both databases."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from engine.cli import main
from engine.cli.samples_cmd import format_duration, parse_duration
from lis_bridge.db import make_engine, session_factory, transaction
from lis_bridge.models import AccessAudit, MessageSpecimen, MessageStatus, RawMessage
from lis_bridge.orders import import_orders_csv
from lis_bridge.results import apply_results
from lis_bridge.types import ResultInput

HEADER = "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
ORDERS = HEADER + (
    "T1,PT1,Invented Ida,F,1970-05-05,GLU NA,2025-03-03T08:00:00Z,Ward 2\n"
    "T2,PT2,Made-up Max,M,1965-06-06,HGB,2025-03-03T08:05:00Z,Ward 2\n"
)


def run(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--database", db_url])


@pytest.fixture
def lis(db_url: str) -> str:
    engine = make_engine(db_url)
    with transaction(session_factory(engine)) as session:
        import_orders_csv(session, ORDERS, actor="clerk")
    engine.dispose()
    return db_url


def test_collect_dispatch_receive(lis: str) -> None:
    result = run(lis, "samples", "collect", "N1", "T1", "--location", "ER", "--by", "nurse")
    assert result.exit_code == 1
    assert "ok      N1: (new) -> COLLECTED at ER" in result.stdout
    assert "FAILED  T1: already registered: COLLECTED at Ward 2" in result.stderr
    assert "1 of 2 specimen(s) not collected" in result.stderr

    result = run(lis, "samples", "dispatch", "T1", "T2", "--location", "van 2", "--by", "drv")
    assert result.exit_code == 0, result.output
    assert "2 specimen(s) dispatched" in result.stdout

    # T2 cannot be dispatched twice; the unknown tube fails alone; T1 and N1 are received.
    result = run(lis, "samples", "receive", "T1", "NOPE", "N1", "--location", "lab", "--by", "t")
    assert result.exit_code == 1
    assert "ok      T1: IN_TRANSIT -> RECEIVED_AT_LAB at lab" in result.stdout
    assert "ok      N1: COLLECTED -> RECEIVED_AT_LAB at lab" in result.stdout
    assert "FAILED  NOPE: not in the LIS" in result.stderr
    result = run(lis, "samples", "dispatch", "T2", "--location", "van 2", "--by", "drv")
    assert result.exit_code == 1
    assert "cannot move from IN_TRANSIT to IN_TRANSIT" in result.stderr

    result = run(lis, "samples", "receive", "T2", "--by", "t")
    assert result.exit_code == 2 and "--location" in result.output


def test_show_and_trace(lis: str) -> None:
    run(lis, "samples", "dispatch", "T1", "--location", "van 2", "--by", "drv")
    run(lis, "samples", "receive", "T1", "--location", "lab", "--by", "tech")
    engine = make_engine(lis)
    with transaction(session_factory(engine)) as session:
        apply_results(session, "T1", [ResultInput("GLU", "G", "2.1", Decimal("2.1"),
                                                  units="mmol/L", flag="LL", is_critical=True)],
                      interface="an1", message_id=None)
        held = RawMessage(interface="an1", payload=b"x", sha256="0" * 64,
                          status=MessageStatus.HELD, hold_reason="UNMAPPED_CODE",
                          hold_detail="unmapped analyzer codes: XYZ")
        held.specimens.append(MessageSpecimen(specimen_id="T1"))
        session.add(held)
    engine.dispose()

    result = run(lis, "samples", "show", "T1", "--by", "jsmith")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "specimen T1: PROCESSING at lab" in out
    assert "Invented Ida (PT1), sex F, born 1970-05-05" in out
    assert "GLU        FINAL        2.1 mmol/L LL CRITICAL" in out
    assert "NA         ORDERED      -" in out
    assert "HELD MESSAGES (1)" in out and "UNMAPPED_CODE: unmapped analyzer codes: XYZ" in out

    result = run(lis, "samples", "show", "T1", "--json", "--by", "jsmith")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["state"] == "PROCESSING"
    assert data["patient"]["patient_id"] == "PT1"
    assert [t["test_code"] for t in data["ordered_tests"]] == ["GLU", "NA"]
    assert data["results"][0]["is_critical"] is True
    assert data["held_messages"][0]["hold_reason"] == "UNMAPPED_CODE"

    engine = make_engine(lis)
    with session_factory(engine)() as session:
        audits = session.scalars(select(AccessAudit).where(AccessAudit.action == "sample.show"))
        assert [(a.actor, a.object_id) for a in audits] == [("jsmith", "T1"), ("jsmith", "T1")]
    engine.dispose()

    result = run(lis, "samples", "show", "NOPE")
    assert result.exit_code == 1 and "not in the LIS" in result.stderr

    result = run(lis, "samples", "trace", "T1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "(new) -> COLLECTED" in lines[2] and "Ward 2" in lines[2] and "clerk" in lines[2]
    assert "COLLECTED -> IN_TRANSIT" in lines[3] and "van 2" in lines[3] and "drv" in lines[3]
    assert "IN_TRANSIT -> RECEIVED_AT_LAB" in lines[4] and "tech" in lines[4]
    assert "RECEIVED_AT_LAB -> PROCESSING" in lines[5] and "interface:an1" in lines[5]
    trace = json.loads(run(lis, "samples", "trace", "T1", "--json").stdout)
    assert trace[0]["since_previous"] is None and trace[1]["since_previous"] > 0
    assert run(lis, "samples", "trace", "NOPE").exit_code == 1


def test_overdue(lis: str) -> None:
    run(lis, "samples", "dispatch", "T2", "--location", "cooler 3", "--by", "drv")
    # T1 was collected in 2025 and is still COLLECTED; T2 has just left.
    result = run(lis, "samples", "overdue", "--older-than", "2h")
    assert result.exit_code == 0, result.output
    assert "1 sample(s) in one state for more than 2h" in result.stdout
    assert "T1" in result.stdout and "Ward 2" in result.stdout and "GLU NA" in result.stdout
    assert "T2 " not in result.stdout
    data = json.loads(run(lis, "samples", "overdue", "--older-than", "0s", "--json",
                          "--state", "IN_TRANSIT").stdout)
    assert [(d["specimen_id"], d["location"]) for d in data] == [("T2", "cooler 3")]
    result = run(lis, "samples", "overdue", "--older-than", "3d", "--state", "PROCESSING")
    assert result.exit_code == 0 and "no sample" in result.stdout
    result = run(lis, "samples", "overdue", "--older-than", "2 hours")
    assert result.exit_code == 2 and "90s, 30m, 2h or 3d" in result.output


def test_duration_helpers() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("3d") == timedelta(days=3)
    assert format_duration(timedelta(days=2, hours=5)) == "2d 5h"
    assert format_duration(timedelta(minutes=75)) == "1h 15m"
    assert format_duration(None) == "-"


def test_help_texts_have_examples() -> None:
    runner = CliRunner()
    for command in (["orders", "import"], ["samples", "collect"], ["samples", "dispatch"],
                    ["samples", "receive"], ["samples", "show"], ["samples", "trace"],
                    ["samples", "overdue"]):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output and f"labrelay {' '.join(command)}" in result.output
