"""Benchmark: report rendering throughput (reports/s) with one and two worker processes.

Each report: a COMPLETED sample with 25 results (some with comments), two A4 pages, QR
code, written atomically and recorded (sha256, lifecycle event, audit, notify job) in a
temporary SQLite database. Target: 500 reports in under 10 s on 2 cores.

Run: ``.venv/bin/python bench/reports.py [--reports 500]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from engine.logging import configure_logging, configure_worker_logging
from lis_bridge.db import make_engine, session_factory, transaction, upgrade
from lis_bridge.models import (
    OrderedTest,
    OrderedTestStatus,
    Patient,
    Report,
    Result,
    Sample,
    SampleState,
)
from lis_bridge.reports import ReportSettings, render_job

UNITS = ("mmol/L", "umol/L", "g/L", "U/L", "mg/L")
FLAGS = ("", "", "", "H", "L", "", "HH", "", "", "LL")
COMMENT = ("Sample slightly lipaemic; result verified on repeat analysis. Interpret with "
           "the clinical picture and previous results.")


def create_samples(url: str, prefix: str, count: int) -> list[int]:
    engine = make_engine(url)
    factory = session_factory(engine)
    ids: list[int] = []
    with transaction(factory) as session:
        for n in range(count):
            patient = Patient(patient_id=f"{prefix}-P{n:05d}", name=f"Bench Patient {n}",
                              sex="F" if n % 2 else "M", birth_date=date(1960 + n % 40, 1, 15))
            sample = Sample(specimen_id=f"{prefix}-{n:06d}", patient=patient,
                            state=SampleState.COMPLETED, location="Ward 3",
                            collected_at=datetime(2024, 3, 1, 7, 30, tzinfo=UTC))
            session.add_all([patient, sample])
            session.flush()
            for i in range(25):
                flag = FLAGS[i % len(FLAGS)]
                session.add(OrderedTest(sample_fk=sample.id, test_code=f"T{i:02d}",
                                        status=OrderedTestStatus.FINAL))
                session.add(Result(
                    sample_fk=sample.id, test_code=f"T{i:02d}", value_text=f"{i + 1}.{n % 10}",
                    value_number=Decimal(f"{i + 1}.{n % 10}"), units=UNITS[i % len(UNITS)],
                    reference_range=f"{i}.0-{i + 2}.0", flag=flag,
                    is_critical=flag in ("HH", "LL"),
                    comments=COMMENT if i % 3 == 0 else "",
                ))
            ids.append(sample.id)
    engine.dispose()
    return ids


def _warm(_n: int) -> int:
    # Import reportlab and load the fonts before the clock starts.
    from lis_bridge.reports import _report_fonts

    _report_fonts()
    return os.getpid()


def run(url: str, settings: ReportSettings, ids: list[int], workers: int) -> float:
    context = multiprocessing.get_context("forkserver")
    # Workers log like the engine, at WARNING here so the figures are readable.
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=configure_worker_logging,
                             initargs=("console", logging.WARNING, False)) as pool:
        list(pool.map(_warm, range(workers * 2)))
        start = time.perf_counter()
        results = list(pool.map(render_job, [url] * len(ids), ids, [settings] * len(ids),
                                chunksize=4))
        elapsed = time.perf_counter() - start
    assert all(r["created"] for r in results)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=int, default=500)
    args = parser.parse_args()
    configure_logging("console", logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        settings = ReportSettings(output_dir=Path(tmp) / "reports",
                                  signing_key=b"bench-signing-key-0123456789abcdef",
                                  lab_name="Bench Laboratory", lab_address="1 Bench Road",
                                  signatory_name="Dr Bench", signatory_title="Pathologist")
        print(f"cores: {os.cpu_count()}, reports per run: {args.reports}, database: SQLite")
        for workers in (1, 2):
            ids = create_samples(url, f"W{workers}", args.reports)
            elapsed = run(url, settings, ids, workers)
            print(f"{workers} worker process(es): {args.reports} reports in {elapsed:.2f} s = "
                  f"{args.reports / elapsed:.0f} reports/s ({elapsed / args.reports * 1000:.1f} "
                  "ms each)")
        engine = make_engine(url)
        with transaction(session_factory(engine)) as session:
            count = session.scalar(select(func.count()).select_from(Report))
            sample_report = session.scalar(select(Report).limit(1))
            assert sample_report is not None
        engine.dispose()
        from pypdf import PdfReader

        pages = len(PdfReader(sample_report.path).pages)
        size = Path(sample_report.path).stat().st_size
        print(f"reports recorded: {count}; each {pages} pages, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
