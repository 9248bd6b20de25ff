"""Reports end to end: real databases, real PDF files read back by pypdf, pdftotext,
pdfium (rendering) and zxing (QR decoding)."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pypdf
import pypdfium2
import pytest
import zxingcpp
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from engine.cli import main as cli
from engine.outbox_runner import run_once
from lis_bridge.db import transaction
from lis_bridge.models import (
    AccessAudit,
    OrderedTest,
    OrderedTestStatus,
    OutboxJob,
    Patient,
    Report,
    Result,
    Sample,
    SampleEvent,
    SampleState,
)
from lis_bridge.notifications import ChannelSettings, NotificationSettings
from lis_bridge.outbox import enqueue, payload_of
from lis_bridge.reports import (
    ReportError,
    ReportSettings,
    content_hash,
    gather_report_data,
    make_token,
    render_pdf,
    render_report,
    report_path,
    safe_specimen_name,
    verify,
)

SPECIMEN = "S24-000123"
PATIENT_NAME = "Anna Łęcka-Öberg"
KEY = b"test-signing-key-0123456789abcdef"


@dataclass(frozen=True)
class Row:
    code: str
    name: str
    value: str
    unit: str
    ref: str
    flag: str = ""
    critical: bool = False
    comment: str = ""
    panel: str = "Chemistry"


ROWS = (
    Row("NA", "Sodium", "139", "mmol/L", "136-145", panel="Electrolytes"),
    Row("K", "Potassium", "6.9", "mmol/L", "3.5-5.1", "HH", True,
        "Sample not haemolysed; value confirmed on repeat.", "Electrolytes"),
    Row("CL", "Chloride", "97", "mmol/L", "98-107", "L", panel="Electrolytes"),
    Row("HCO3", "Bicarbonate", "24", "mmol/L", "22-29", panel="Electrolytes"),
    Row("GLU", "Glucose", "2.1", "mmol/L", "3.9-6.1", "LL", True),
    Row("UREA", "Urea", "8.9", "mmol/L", "2.5-7.8", "H"),
    Row("CREA", "Creatinine", "88", "umol/L", "45-90"),
    Row("CA", "Calcium", "2.31", "mmol/L", "2.20-2.60"),
    Row("PHOS", "Phosphate", "1.02", "mmol/L", "0.80-1.50"),
    Row("MG", "Magnesium", "0.85", "mmol/L", "0.70-1.00"),
    Row("ALB", "Albumin", "41", "g/L", "35-50", panel="Liver"),
    Row("TP", "Total protein", "72", "g/L", "60-80", panel="Liver"),
    Row("BILT", "Bilirubin total", "25", "umol/L", "<21", "H", panel="Liver"),
    Row("ALT", "ALT", "33", "U/L", "<41", panel="Liver"),
    Row("AST", "AST", "29", "U/L", "<40", panel="Liver"),
    Row("ALP", "Alkaline phosphatase", "110", "U/L", "40-130", panel="Liver"),
    Row("GGT", "Gamma-GT", "58", "U/L", "<60", panel="Liver"),
    Row("CHOL", "Cholesterol", "5.9", "mmol/L", "<5.2", "H",
        comment="Fasting status unknown.", panel="Lipids"),
    Row("TRIG", "Triglycerides", "1.4", "mmol/L", "<1.7", panel="Lipids"),
    Row("HDL", "HDL cholesterol", "1.3", "mmol/L", ">1.0", panel="Lipids"),
    Row("LDL", "LDL cholesterol", "3.9", "mmol/L", "<3.0", "H", panel="Lipids"),
    Row("CRP", "C-reactive protein", "<0.5", "mg/L", "<5"),
    Row("TSH", "TSH", "2.4", "mIU/L", "0.27-4.20", panel="Endocrine"),
    Row("FT4", "Free T4", "15.1", "pmol/L", "12.0-22.0", panel="Endocrine"),
    Row("HBA1C", "HbA1c", "41", "mmol/mol", "20-42", panel="Endocrine"),
)
PANELS = {r.code: r.panel for r in ROWS}
NAMES = {r.code: r.name for r in ROWS}


@pytest.fixture
def settings(tmp_path: Path) -> ReportSettings:
    return ReportSettings(
        output_dir=tmp_path / "reports",
        signing_key=KEY,
        lab_name="Riverside Hospital Laboratory",
        lab_address="1 River Road, Exampletown",
        lab_phone="+44 1234 567890",
        signatory_name="Dr Jane Okafor",
        signatory_title="Consultant Chemical Pathologist",
        key_id="t1",
    )


def make_completed_sample(sessions: sessionmaker[Session], specimen: str = SPECIMEN) -> int:
    with transaction(sessions) as session:
        patient = Patient(patient_id="MRN-4471902", name=PATIENT_NAME, sex="F",
                          birth_date=date(1969, 5, 12))
        sample = Sample(specimen_id=specimen, patient=patient, state=SampleState.COMPLETED,
                        location="Ward 7B", collected_at=datetime(2024, 3, 1, 7, 40, tzinfo=UTC))
        session.add_all([patient, sample])
        session.flush()
        session.add_all([
            SampleEvent(sample_fk=sample.id, specimen_id=specimen, from_state="",
                        to_state="COLLECTED", location="Ward 7B", actor="user:phleb",
                        at=datetime(2024, 3, 1, 7, 40, tzinfo=UTC)),
            SampleEvent(sample_fk=sample.id, specimen_id=specimen, from_state="COLLECTED",
                        to_state="RECEIVED_AT_LAB", location="Core lab", actor="user:recp",
                        at=datetime(2024, 3, 1, 8, 15, tzinfo=UTC)),
        ])
        for row in ROWS:
            session.add(OrderedTest(sample_fk=sample.id, test_code=row.code,
                                    status=OrderedTestStatus.FINAL))
            number = None if row.value.startswith("<") else Decimal(row.value)
            session.add(Result(
                sample_fk=sample.id, test_code=row.code, analyzer_code=row.code.lower(),
                value_text=row.value, value_number=number, units=row.unit,
                reference_range=row.ref, flag=row.flag, is_critical=row.critical,
                status="F", comments=row.comment, interface="cobas-1",
            ))
        session.add(OrderedTest(sample_fk=sample.id, test_code="LIPASE",
                                status=OrderedTestStatus.CANCELLED))
        return sample.id


def render(sessions: sessionmaker[Session], sample_id: int, settings: ReportSettings) -> Report:
    with transaction(sessions) as session:
        return render_report(session, sample_id, settings, panels=PANELS,
                             display_names=NAMES)


def pdf_text(data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    return "\n".join(page.extract_text() for page in reader.pages)


def qr_tokens(data: bytes) -> list[str]:
    document = pypdfium2.PdfDocument(data)
    try:
        image = document[0].render(scale=3).to_pil()
        return [barcode.text for barcode in zxingcpp.read_barcodes(image)]
    finally:
        document.close()


def assert_report_text(text: str) -> None:
    flat = " ".join(text.split())
    assert PATIENT_NAME in flat
    assert "MRN-4471902" in flat and SPECIMEN in flat
    assert "Riverside Hospital Laboratory" in flat and "Dr Jane Okafor" in flat
    lines = [x.strip() for x in text.splitlines()]
    for row in ROWS:
        # pdftotext -layout keeps a table row on one line; pypdf gives one line per cell.
        at = next(i for i, x in enumerate(lines) if x.startswith(row.name))
        line = lines[at] if row.value in lines[at] else " ".join(lines[at:at + 6])
        assert row.value in line and row.unit in line and row.ref in line, line
        if row.flag:
            assert row.flag in line, line
        if row.critical:
            assert "CRITICAL" in line, line
    for panel in {r.panel for r in ROWS}:
        assert panel in flat
    assert "LIPASE" in flat  # cancelled: listed as not done
    assert "Fasting status unknown." in flat
    assert "Page 1 of 2" in flat and "Page 2 of 2" in flat


def test_render_extract_qr_and_verify(
    sessions: sessionmaker[Session], settings: ReportSettings
) -> None:
    sample_id = make_completed_sample(sessions)
    report = render(sessions, sample_id, settings)

    path = settings.output_dir / SPECIMEN / f"{SPECIMEN}-v1.pdf"
    assert report.version == 1 and Path(report.path) == path
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == report.sha256
    assert len(pypdf.PdfReader(io.BytesIO(data)).pages) == 2
    assert_report_text(pdf_text(data))

    assert qr_tokens(data) == [report.token]
    with transaction(sessions) as session:
        by_token = verify(session, settings, report.token)
        by_file = verify(session, settings, data)
        sample = session.get(Sample, sample_id)
        assert sample is not None and sample.state == SampleState.REPORTED
        [event] = session.scalars(select(SampleEvent).where(
            SampleEvent.sample_fk == sample_id, SampleEvent.to_state == "REPORTED"))
        assert event.from_state == "COMPLETED" and event.actor == "engine"
        [job] = session.scalars(select(OutboxJob).where(OutboxJob.kind == "notify"))
        assert payload_of(job) == {
            "kind": "report_ready", "sample_id": sample_id, "specimen_id": SPECIMEN,
            "report_id": report.id, "version": 1, "amended": False, "critical": True}
    assert by_token.genuine and by_token.version == 1 and not by_token.superseded
    assert by_file.genuine and by_file.file_checked and by_file.specimen_id == SPECIMEN


@pytest.mark.skipif(shutil.which("pdftotext") is None,
                    reason="pdftotext (poppler-utils) is not installed: apt-get install "
                    "poppler-utils to run this second extraction check")
def test_pdftotext_reads_every_result(
    sessions: sessionmaker[Session], settings: ReportSettings
) -> None:
    report = render(sessions, make_completed_sample(sessions), settings)
    out = subprocess.run(["pdftotext", "-layout", report.path, "-"], capture_output=True,
                         check=True, timeout=60)
    assert_report_text(out.stdout.decode("utf-8"))


def test_tampered_pdf_is_refused(sessions: sessionmaker[Session], settings: ReportSettings,
                                 tmp_path: Path) -> None:
    report = render(sessions, make_completed_sample(sessions), settings)
    original = Path(report.path).read_bytes()
    token_at = original.index(report.token.encode())
    for position in (len(original) // 2, 200, token_at + 10, token_at + len(report.token) - 3):
        tampered = bytearray(original)
        tampered[position] = ord("A") if tampered[position] != ord("A") else ord("B")
        with transaction(sessions) as session:
            result = verify(session, settings, bytes(tampered))
        assert not result.genuine, position
        assert result.reason.startswith(("refused", "no labrelay")), result.reason
    with transaction(sessions) as session:
        assert "altered" in verify(session, settings, original[:-1] + b" ").reason
    # Another laboratory's key, or a forged signature.
    other = ReportSettings(output_dir=tmp_path, signing_key=b"another-key-0123456789",
                           key_id="t1")
    assert not verify(None, other, report.token).genuine
    forged = report.token[:-4] + ("AAAA" if not report.token.endswith("AAAA") else "BBBB")
    assert "signature" in verify(None, settings, forged).reason
    assert not verify(None, settings, "hello").genuine
    # Offline: a token can be checked, a file cannot (its sha256 lives in the database).
    assert verify(None, settings, report.token).genuine
    assert not verify(None, settings, original).genuine


def test_same_data_same_report_changed_data_new_version(
    sessions: sessionmaker[Session], settings: ReportSettings, tmp_path: Path
) -> None:
    sample_id = make_completed_sample(sessions)
    first = render(sessions, sample_id, settings)
    again = render(sessions, sample_id, settings)
    assert again.id == first.id and again.sha256 == first.sha256
    assert sorted(p.name for p in (settings.output_dir / SPECIMEN).iterdir()) == [
        f"{SPECIMEN}-v1.pdf"]

    # Deterministic: the same data, version and token give the same bytes.
    with transaction(sessions) as session:
        data = gather_report_data(session, sample_id, PANELS, NAMES)
    assert content_hash(data) == first.content_hash
    copy = tmp_path / "copy.pdf"
    render_pdf(data, copy, settings, version=1, token=first.token)
    assert copy.read_bytes() == Path(first.path).read_bytes()

    # A lost file is restored byte for byte, not re-versioned.
    Path(first.path).unlink()
    assert render(sessions, sample_id, settings).id == first.id
    assert hashlib.sha256(Path(first.path).read_bytes()).hexdigest() == first.sha256

    # A correction: the potassium result is superseded by a corrected one.
    with transaction(sessions) as session:
        old = session.scalar(select(Result).where(Result.sample_fk == sample_id,
                                                  Result.test_code == "K"))
        assert old is not None
        corrected = Result(sample_fk=sample_id, test_code="K", value_text="4.2",
                           value_number=Decimal("4.2"), units="mmol/L",
                           reference_range="3.5-5.1", status="C",
                           comments="Corrected: earlier value from a haemolysed aliquot.")
        session.add(corrected)
        session.flush()
        old.is_current = False
        old.superseded_by_fk = corrected.id
    second = render(sessions, sample_id, settings)
    assert second.version == 2 and second.content_hash != first.content_hash
    v2 = Path(second.path).read_bytes()
    text = " ".join(pdf_text(v2).split())
    assert "AMENDED" in text and "Corrected" in text and "4.2" in text

    with transaction(sessions) as session:
        v1 = session.get(Report, first.id)
        assert v1 is not None and v1.superseded_by_fk == second.id
        old_file = verify(session, settings, Path(first.path).read_bytes())
        assert old_file.genuine and old_file.superseded
        assert old_file.superseded_by_version == 2 and "SUPERSEDED" in old_file.reason
        assert not verify(session, settings, v2).superseded
        events = list(session.scalars(select(SampleEvent.to_state).where(
            SampleEvent.sample_fk == sample_id, SampleEvent.to_state == "REPORTED")))
        assert len(events) == 2  # COMPLETED -> REPORTED, then the amendment
        assert session.scalar(select(func.count()).select_from(AccessAudit).where(
            AccessAudit.action == "report.amended")) == 1
        assert session.scalar(select(func.count()).select_from(OutboxJob).where(
            OutboxJob.kind == "notify")) == 2
    assert Path(first.path).is_file()  # versions are kept


def test_sample_not_complete_is_refused(
    sessions: sessionmaker[Session], settings: ReportSettings
) -> None:
    with transaction(sessions) as session:
        sample = Sample(specimen_id="S-PROC", state=SampleState.PROCESSING)
        session.add(sample)
        session.flush()
        sample_id = sample.id
    with pytest.raises(ReportError, match="PROCESSING"), transaction(sessions) as session:
        render_report(session, sample_id, settings)
    with pytest.raises(ReportError, match="does not exist"), transaction(sessions) as session:
        render_report(session, 987654, settings)


def test_specimen_ids_are_safe_file_names(settings: ReportSettings) -> None:
    for hostile in ("../../etc/passwd", "a/b", ".hidden", "S 1:2", "..", "x" * 300):
        path = report_path(settings, hostile, 3).resolve()
        assert settings.output_dir.resolve() in path.parents
        assert "/" not in safe_specimen_name(hostile) and len(path.name) < 120
    assert safe_specimen_name("a/b") != safe_specimen_name("a_b")
    assert safe_specimen_name("S24-000123") == "S24-000123"


def test_outbox_renders_in_worker_process_and_notifies(
    sqlite_url: str, settings: ReportSettings
) -> None:
    from lis_bridge.db import make_engine, session_factory

    engine = make_engine(sqlite_url)
    sessions = session_factory(engine)
    sample_id = make_completed_sample(sessions)
    with transaction(sessions) as session:
        enqueue(session, "render_report", f"render:{sample_id}",
                {"sample_id": sample_id, "specimen_id": SPECIMEN, "reason": "completed"})
    notification_settings = NotificationSettings(
        channels=(ChannelSettings(name="hook", type="webhook", url="http://127.0.0.1:9/x"),),
        routes={"report_ready": ("hook",)},
    )
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)
    summary = run_once(sqlite_url, settings, notification_settings, now=later, workers=1,
                       sender=lambda _c, _d: None)
    assert summary.rendered == 1 and summary.notifications_created == 1
    assert summary.delivered == 1
    with transaction(sessions) as session:
        [report] = session.scalars(select(Report))
        assert Path(report.path).is_file()
        assert {j.status for j in session.scalars(select(OutboxJob))} == {"DONE"}
    engine.dispose()


def test_cli_render_and_verify(
    sqlite_url: str, settings: ReportSettings, tmp_path: Path
) -> None:
    from lis_bridge.db import make_engine, session_factory

    engine = make_engine(sqlite_url)
    make_completed_sample(session_factory(engine))
    engine.dispose()
    config = tmp_path / "labrelay.yaml"
    config.write_text(
        f"database: {sqlite_url}\n"
        "interfaces: []\n"
        "reports:\n"
        f"  output_dir: {settings.output_dir}\n"
        f"  signing_key: {KEY.decode()}\n"
        "  key_id: t1\n"
        "  lab_name: CLI Lab\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    rendered = runner.invoke(cli, ["-c", str(config), "reports", "render", SPECIMEN])
    assert rendered.exit_code == 0, rendered.output
    assert "version 1 written" in rendered.output
    again = runner.invoke(cli, ["-c", str(config), "reports", "render", SPECIMEN])
    assert "unchanged" in again.output
    forced = runner.invoke(cli, ["-c", str(config), "reports", "render", SPECIMEN, "--force"])
    assert "version 2 written" in forced.output, forced.output

    v1 = settings.output_dir / SPECIMEN / f"{SPECIMEN}-v1.pdf"
    ok = runner.invoke(cli, ["-c", str(config), "reports", "verify", str(v1)])
    assert ok.exit_code == 0 and "GENUINE" in ok.output and "SUPERSEDED" in ok.output
    tampered = tmp_path / "tampered.pdf"
    data = bytearray(v1.read_bytes())
    data[len(data) // 3] ^= 0x01
    tampered.write_bytes(bytes(data))
    bad = runner.invoke(cli, ["-c", str(config), "reports", "verify", str(tampered)])
    assert bad.exit_code == 1 and "REFUSED" in bad.output
    token = make_token(settings, SPECIMEN, 9, "0" * 64)
    unknown = runner.invoke(cli, ["-c", str(config), "reports", "verify", token])
    assert unknown.exit_code == 1 and "no report" in unknown.output
    missing = runner.invoke(cli, ["-c", str(config), "reports", "render", "NOPE"])
    assert missing.exit_code != 0 and "no sample" in missing.output


def test_cancelled_test_preliminary_value_is_not_reported(
    sessions: sessionmaker[Session],
) -> None:
    """A test cancelled after a preliminary value appears under "not done", never as a
    result on the final report."""
    from lis_bridge.lifecycle import transition as move
    from lis_bridge.orders import cancel_test
    from lis_bridge.results import apply_results
    from lis_bridge.types import ResultInput

    with transaction(sessions) as session:
        sample = Sample(specimen_id="CANC-1")
        move(session, sample, SampleState.COLLECTED, actor="t", location="w")
        for code in ("GLU", "NA"):
            session.add(OrderedTest(sample_fk=sample.id, test_code=code))
        move(session, sample, SampleState.RECEIVED_AT_LAB, actor="t")
        session.flush()
        apply_results(session, "CANC-1", [ResultInput("GLU", "GLU", "2.1", Decimal("2.1"),
                                                      units="mmol/L", status="P")],
                      interface="a", message_id=None)
        cancel_test(session, "CANC-1", "GLU", actor="tech")
        apply_results(session, "CANC-1", [ResultInput("NA", "NA", "140", Decimal("140"),
                                                      units="mmol/L")],
                      interface="a", message_id=None)
        data = gather_report_data(session, sample.id)
    shown = {line.test_code for panel in data.panels for line in panel.results}
    assert shown == {"NA"} and data.not_done == ("GLU",)
