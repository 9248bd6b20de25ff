"""Importing orders from CSV: validation with line numbers, skip-invalid, idempotence, CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from engine.cli import main
from lis_bridge import orders
from lis_bridge.models import (
    AccessAudit,
    OrderedTest,
    Patient,
    Sample,
    SampleEvent,
    SampleState,
)
from lis_bridge.orders import OrderError, add_test, import_orders_csv

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "orders_example.csv"
HEADER = "specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location\n"
NOW = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)


def counts(session: Session) -> tuple[int, int, int, int]:
    return (
        session.scalar(select(func.count(Sample.id))) or 0,
        session.scalar(select(func.count(Patient.id))) or 0,
        session.scalar(select(func.count(OrderedTest.id))) or 0,
        session.scalar(select(func.count(SampleEvent.id))) or 0,
    )


def test_example_file_imports(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        report = import_orders_csv(session, FIXTURE, actor="clerk", now=NOW)
        session.commit()
        assert report.ok and report.errors == []
        assert (report.rows, report.samples_created) == (8, 8)
        # DEMO0001 and DEMO0006 belong to the same patient.
        assert counts(session) == (8, 7, report.tests_ordered, 8)
        sample = session.scalars(select(Sample).where(Sample.specimen_id == "DEMO0001")).one()
        assert sample.state == SampleState.COLLECTED
        assert sample.location == "Ward 3 North"
        assert [t.test_code for t in sample.ordered_tests] == ["GLU", "NA", "K", "CL", "CREA",
                                                                "UREA"]
        event = session.scalars(select(SampleEvent)
                                .where(SampleEvent.sample_fk == sample.id)).one()
        assert (event.from_state, event.to_state, event.actor, event.location) == (
            "", "COLLECTED", "clerk", "Ward 3 North")
        assert session.scalar(select(Patient.sex).where(Patient.patient_id == "PX-1006")) == "U"


def test_reimport_changes_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        import_orders_csv(session, FIXTURE, actor="clerk", now=NOW)
        session.commit()
        before = counts(session)
        again = import_orders_csv(session, FIXTURE, actor="clerk", now=NOW)
        session.commit()
        assert again.ok
        assert (again.samples_created, again.samples_unchanged, again.tests_added) == (0, 8, 0)
        assert counts(session) == before


def test_reimport_with_more_tests_adds_them(sessions: sessionmaker[Session]) -> None:
    text = HEADER + "S1,P1,Doe Jo,F,1980-01-01,GLU NA,2025-03-03T08:00:00Z,ward\n"
    more = HEADER + "S1,P1,Doe Jo,F,1980-01-01,GLU NA K,2025-03-03T08:00:00Z,ward\n"
    with sessions() as session:
        import_orders_csv(session, text, actor="clerk", now=NOW)
        report = import_orders_csv(session, more, actor="clerk2", now=NOW)
        session.commit()
        assert (report.samples_updated, report.tests_added) == (1, 1)
        codes = session.scalars(select(OrderedTest.test_code).order_by(OrderedTest.id)).all()
        assert codes == ["GLU", "NA", "K"]
        audit = session.scalars(select(AccessAudit)
                                .where(AccessAudit.action == "test.added")).one()
        assert (audit.actor, audit.object_id, audit.detail) == ("clerk2", "S1",
                                                                "K (orders import)")
        assert session.scalar(select(func.count(SampleEvent.id))) == 1
        add_test(session, "S1", "K", actor="clerk")  # already ordered: nothing new
        add_test(session, "S1", "TSH", actor="clerk")
        with pytest.raises(OrderError, match="not in the LIS"):
            add_test(session, "S404", "TSH", actor="clerk")
        assert session.scalar(select(func.count(OrderedTest.id))) == 4


def test_invalid_file_lists_lines_and_imports_nothing(sessions: sessionmaker[Session]) -> None:
    text = HEADER + (
        "S1,P1,Doe Jo,F,1980-01-01,GLU NA,2025-03-03T08:00:00Z,ward\n"  # line 2: fine
        "S2,P2,Roe Al,X,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"  # 3: sex
        "S3,P3,Poe Ed,M,31.12.1980,GLU,2025-03-03T08:00:00Z,ward\n"  # 4: birth date
        "S4,,Loe Bo,M,1980-01-01,GLU,2025-03-03,ward\n"  # 5: patient id, collected_at
        "S1,P1,Doe Jo,F,1980-01-01,GLU K,2025-03-03T08:00:00Z,ward\n"  # 6: S1 differs
        "S1,P1,Doe Jo,F,1980-01-01,GLU NA,2025-03-03T08:00:00Z,ward\n"  # 7: same as 2: fine
        "S 5,P5,Moe Cy,F,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"  # 8: specimen id
        "S6,P6,Noe Di,F,1980-01-01,GLU,2030-03-03T08:00:00Z,ward\n"  # 9: future
        f"S7,P7,{'N' * 201},F,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"  # 10: too long
        "S8,P1,Other Name,F,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"  # 11: patient differs
        "S9,P9,Qoe Fa,F,1980-01-01,GLU,2025-03-03T08:00:00Z\n"  # 12: field missing
    )
    with sessions() as session:
        report = import_orders_csv(session, text, actor="clerk", now=NOW)
        session.commit()
        assert not report.ok
        lines = sorted({e.line for e in report.errors})
        assert lines == [3, 4, 5, 6, 8, 9, 10, 11, 12]
        by_line = {e.line: e for e in report.errors}
        assert "sex 'X'" in by_line[3].reason
        assert "birth_date" in by_line[4].reason
        assert {e.reason for e in report.errors if e.line == 5} >= {
            "patient_id is empty"}
        assert "first on line 2" in by_line[6].reason
        assert "future" in by_line[9].reason
        assert "longer than 200" in by_line[10].reason
        assert "line 2" in by_line[11].reason
        assert str(by_line[3]).startswith("line 3 (S2): ")
        assert counts(session) == (0, 0, 0, 0)
        assert report.duplicate_rows == 1

        skipped = import_orders_csv(session, text, actor="clerk", skip_invalid=True, now=NOW)
        session.commit()
        assert skipped.ok and skipped.skipped == 9
        assert session.scalars(select(Sample.specimen_id)).all() == ["S1"]


def test_conflict_with_the_lis_is_an_error(sessions: sessionmaker[Session]) -> None:
    first = HEADER + "S1,P1,Doe Jo,F,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"
    swapped = HEADER + "S1,P2,Roe Al,M,1970-01-01,GLU,2025-03-03T08:00:00Z,ward\n"
    renamed = HEADER + "S2,P1,Doe Joanna,F,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"
    with sessions() as session:
        import_orders_csv(session, first, actor="clerk", now=NOW)
        session.commit()
        report = import_orders_csv(session, swapped, actor="clerk", now=NOW)
        assert not report.ok
        assert "another patient" in report.errors[0].reason and report.errors[0].line == 2
        report = import_orders_csv(session, renamed, actor="clerk", now=NOW)
        assert not report.ok and "different name" in report.errors[0].reason
        assert counts(session) == (1, 1, 1, 1)


def test_bad_header_and_oversized_file(sessions: sessionmaker[Session], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with sessions() as session:
        report = import_orders_csv(session, "specimen,patient\nS1,P1\n", actor="c",
                                   skip_invalid=True)
        assert not report.ok and report.errors[0].line == 1
        assert "missing: specimen_id" in report.errors[0].reason
        big = tmp_path / "big.csv"
        big.write_text(HEADER + "x" * 200)
        monkeypatch.setattr(orders, "MAX_FILE_BYTES", 100)
        with pytest.raises(OrderError, match="larger than"):
            import_orders_csv(session, big, actor="c")
        with pytest.raises(OrderError, match="cannot read"):
            import_orders_csv(session, tmp_path / "missing.csv", actor="c")


def test_cli_import(db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["orders", "import", str(FIXTURE), "--by", "clerk",
                                  "--database", db_url])
    assert result.exit_code == 0, result.output
    assert "8 samples created" in result.stdout
    result = runner.invoke(main, ["orders", "import", str(FIXTURE), "--database", db_url])
    assert result.exit_code == 0, result.output
    assert "8 unchanged" in result.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "S1,P1,Doe Jo,Q,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n"
                   "S2,P2,Roe Al,M,1980-01-01,GLU,2025-03-03T08:00:00Z,ward\n")
    result = runner.invoke(main, ["orders", "import", str(bad), "--database", db_url])
    assert result.exit_code == 1
    assert "line 2 (S1): sex 'Q' is not one of M, F, O, U" in result.stderr
    assert "nothing imported" in result.stderr
    result = runner.invoke(main, ["orders", "import", str(bad), "--skip-invalid",
                                  "--database", db_url])
    assert result.exit_code == 0, result.output
    assert "1 invalid rows skipped" in result.stdout
    assert "NOT imported" in result.stderr
