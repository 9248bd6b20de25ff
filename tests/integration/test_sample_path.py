"""A sample's whole path as the lab runs it: orders imported, tube dispatched and received
at the lab door (CLI), results from the analyzer through the message path, report rendered
by the outbox in a worker process (CLI), the PDF read by a real text extractor, the QR code
read by a real decoder, `reports verify` accepting it and refusing a tampered copy, and the
journey traced from the audit trail."""

from __future__ import annotations

import io
from pathlib import Path

import pypdf
import pypdfium2
import zxingcpp
from click.testing import CliRunner
from sqlalchemy import select

from drivers.registry import create_driver
from engine.cli import main as cli
from engine.config import InterfaceConfig
from engine.mapping import load_mapping
from engine.pipeline import InterfaceRuntime, ingest
from lis_bridge.db import make_engine, session_factory
from lis_bridge.models import Report, Sample

REPO = Path(__file__).resolve().parents[2]


def test_collection_to_verified_report(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "labrelay.yaml"
    config.write_text(
        f"""
database: {db_url}
interfaces:
  - name: chem
    protocol: hl7
    mapping: {REPO / 'mappings' / 'generic_hl7.yaml'}
    transport: {{listen: 'tcp:0:interface=127.0.0.1'}}
reports:
  output_dir: {tmp_path / 'reports'}
  signing_key: path-test-signing-key-0123456789
  lab_name: Path Test Laboratory
  signatory_name: Dr P. Tester
  workers: 1
"""
    )
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("orders", "import", str(REPO / "fixtures" / "orders_example.csv"), "--by", "clerk")
    run("samples", "dispatch", "DEMO0001", "--location", "Courier van 2", "--by", "driver")
    run("samples", "receive", "DEMO0001", "--location", "Main lab", "--by", "porter")

    # The analyzer's results, through the message path the engine runs
    mapping_path = REPO / "mappings" / "generic_hl7.yaml"
    runtime = InterfaceRuntime(
        InterfaceConfig(name="chem", protocol="hl7", mapping=mapping_path,
                        listen="tcp:0:interface=127.0.0.1"),
        create_driver("hl7-generic", "hl7"), load_mapping(mapping_path))
    sessions = session_factory(make_engine(db_url))
    with sessions() as session:
        result = ingest(session, runtime, (REPO / "fixtures" / "oru_DEMO0001.hl7").read_bytes(),
                        "127.0.0.1:4000")
        session.commit()
    assert result.status == "APPLIED", result.hold_detail

    run("outbox", "run", "--once")  # renders in a worker process, sends what it can

    with sessions() as session:
        sample = session.scalars(select(Sample).where(Sample.specimen_id == "DEMO0001")).one()
        assert sample.state == "REPORTED"
        report = session.scalars(select(Report).where(Report.sample_fk == sample.id)).one()
    pdf = Path(report.path).read_bytes()

    text = " ".join(" ".join(p.extract_text() for p in pypdf.PdfReader(io.BytesIO(pdf)).pages)
                    .split())
    for expected in ("Testperson Alma", "PX-1001", "DEMO0001", "Path Test Laboratory",
                     "Glucose", "5.4", "Potassium", "6.8", "HH CRITICAL", "Creatinine", "88",
                     "umol/L", "45 - 84", "mmol/L", "3.5 - 5.1", "Electrolytes", "Chemistry",
                     "Dr P. Tester", "Page 1 of 1"):
        assert expected in text, expected

    document = pypdfium2.PdfDocument(pdf)
    try:
        codes = zxingcpp.read_barcodes(document[0].render(scale=3).to_pil())
    finally:
        document.close()
    [token] = [c.text for c in codes]
    assert token == report.token

    assert "genuine" in run("reports", "verify", token)
    assert "genuine" in run("reports", "verify", report.path)
    tampered = tmp_path / "tampered.pdf"
    middle = len(pdf) // 2
    tampered.write_bytes(pdf[:middle] + bytes([pdf[middle] ^ 0x01]) + pdf[middle + 1:])
    refused = runner.invoke(cli, ["--config", str(config), "reports", "verify", str(tampered)])
    assert refused.exit_code == 1

    trace = run("samples", "trace", "DEMO0001")
    for step in ("COLLECTED", "IN_TRANSIT", "RECEIVED_AT_LAB", "PROCESSING", "COMPLETED",
                 "REPORTED", "driver", "porter", "Courier van 2", "interface:chem"):
        assert step in trace, step
