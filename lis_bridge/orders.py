"""Orders: importing the ward's CSV of collected samples, adding and cancelling tests.

CSV columns (header required, any order, no others)::

    specimen_id,patient_id,patient_name,sex,birth_date,tests,collected_at,location

``tests`` holds LIS test codes separated by spaces; ``sex`` is M, F, O or U; ``birth_date``
is an ISO date (may be empty when unknown); ``collected_at`` an ISO 8601 date-time (a time
without an offset is taken as UTC, so write ``Z`` or ``+01:00``); ``location`` may be empty.

Import rules:

- Every row is validated before anything is written. With errors, nothing is imported
  (the report lists line numbers and reasons), unless ``skip_invalid``: then the valid
  rows are imported and the invalid ones reported as skipped.
- A new specimen becomes a sample in COLLECTED with its creation audit event
  (``(new) -> COLLECTED``, dated at ``collected_at``, at the row's location).
- Re-importing the same file changes nothing: no new events, no duplicate tests.
- A known specimen listed with more tests gets the missing tests added as ORDERED (each
  addition audited in ``access_audit`` as ``test.added``); tests missing from the file are
  kept (cancelling is explicit: :func:`cancel_test`). Tests cannot be added to a COMPLETED
  or REPORTED sample: that row is an error (collect a new specimen instead).
- A known specimen with a different patient, or a known patient with different
  demographics, is an error: that is how a swapped label shows itself.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import LabrelayError
from lis_bridge import lifecycle
from lis_bridge.models import (
    AccessAudit,
    OrderedTest,
    OrderedTestStatus,
    Patient,
    Sample,
    SampleState,
    utcnow,
)

log = structlog.get_logger(__name__)

COLUMNS = ("specimen_id", "patient_id", "patient_name", "sex", "birth_date", "tests",
           "collected_at", "location")
REQUIRED = ("specimen_id", "patient_id", "patient_name", "sex", "tests", "collected_at")
SEXES = ("M", "F", "O", "U")

MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_ROWS = 50_000
MAX_TESTS_PER_SAMPLE = 100
FIELD_LIMITS = {
    "specimen_id": 64,
    "patient_id": 64,
    "patient_name": 200,
    "sex": 1,
    "birth_date": 10,
    "tests": 2000,
    "collected_at": 40,
    "location": 100,
}
MAX_TEST_CODE = 64
# A specimen id travels in HL7 and ASTM fields: no spaces, no delimiters (| ^ & ~ \ !).
SPECIMEN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/#+-]*")
TEST_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A collection time a little ahead of this machine's clock is clock drift; a day is a typo.
FUTURE_TOLERANCE = timedelta(hours=1)


class OrderError(LabrelayError):
    """An order cannot be imported or changed; the text says which and what to do."""


@dataclass(frozen=True, slots=True)
class RowError:
    line: int  # line number in the file (the header is line 1)
    specimen_id: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        who = f" ({self.specimen_id})" if self.specimen_id else ""
        return f"{where}{who}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did. ``ok`` is False when errors stopped it (nothing written)."""

    rows: int = 0  # data rows read
    samples_created: int = 0
    samples_unchanged: int = 0
    samples_updated: int = 0  # known samples that got tests added (or a patient attached)
    tests_added: int = 0  # tests added to samples that already existed
    tests_ordered: int = 0  # tests of newly created samples
    duplicate_rows: int = 0  # identical repeats of a specimen within the file
    skipped: int = 0  # invalid rows skipped (skip_invalid)
    imported: bool = False
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.imported

    def summary(self) -> str:
        if not self.imported:
            return f"{self.rows} rows read, {len(self.errors)} errors: nothing imported"
        text = (f"{self.rows} rows: {self.samples_created} samples created "
                f"({self.tests_ordered} tests), {self.samples_updated} updated "
                f"({self.tests_added} tests added), {self.samples_unchanged} unchanged")
        if self.duplicate_rows:
            text += f", {self.duplicate_rows} repeated rows ignored"
        if self.skipped:
            text += f", {self.skipped} invalid rows skipped"
        return text


@dataclass(frozen=True, slots=True)
class OrderRow:
    """One validated row."""

    line: int
    specimen_id: str
    patient_id: str
    patient_name: str
    sex: str
    birth_date: date | None
    tests: tuple[str, ...]
    collected_at: datetime
    location: str

    def content(self) -> tuple[object, ...]:
        return (self.patient_id, self.patient_name, self.sex, self.birth_date,
                frozenset(self.tests), self.collected_at, self.location)

    def demographics(self) -> tuple[object, ...]:
        return (self.patient_name, self.sex, self.birth_date)


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _read_text(path_or_text: str | Path | bytes) -> tuple[str, str]:
    """The CSV text and a name for it. A str with a newline is CSV text, else a path."""
    if isinstance(path_or_text, bytes):
        raw, name = path_or_text, "<bytes>"
    elif isinstance(path_or_text, str) and "\n" in path_or_text:
        raw, name = path_or_text.encode("utf-8"), "<text>"
    else:
        path = Path(path_or_text)
        name = str(path)
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise OrderError(f"cannot read orders file {name}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise OrderError(f"orders file {name} is larger than {MAX_FILE_BYTES // (1024 * 1024)} "
                         "MiB; split it into smaller files")
    try:
        return raw.decode("utf-8-sig"), name
    except UnicodeDecodeError as exc:
        raise OrderError(f"orders file {name} is not UTF-8 (byte {exc.start}): save it as "
                         "UTF-8 CSV") from exc


def _parse_datetime(text: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    if len(text) < 16:  # a bare date is not a collection time
        return None
    return _as_utc(value)


def _validate_row(line: int, raw: dict[str, str], now: datetime) -> tuple[OrderRow | None,
                                                                           list[str]]:
    problems: list[str] = []
    values = {name: (raw.get(name) or "").strip() for name in COLUMNS}
    for name in REQUIRED:
        if not values[name]:
            problems.append(f"{name} is empty")
    for name, limit in FIELD_LIMITS.items():
        if len(values[name]) > limit:
            problems.append(f"{name} is longer than {limit} characters")
        if _CONTROL.search(values[name]):
            problems.append(f"{name} contains control characters (a line break inside a field?)")
    specimen_id = values["specimen_id"]
    if specimen_id and not SPECIMEN_ID.fullmatch(specimen_id):
        problems.append(f"specimen_id {specimen_id!r} may hold only letters, digits and . _ : / "
                        "# + - (no spaces or HL7/ASTM delimiters)")
    sex = values["sex"].upper()
    if values["sex"] and sex not in SEXES:
        problems.append(f"sex {values['sex']!r} is not one of M, F, O, U")
    birth_date: date | None = None
    if values["birth_date"]:
        try:
            birth_date = date.fromisoformat(values["birth_date"])
        except ValueError:
            problems.append(f"birth_date {values['birth_date']!r} is not a date like 1970-01-31")
        else:
            if birth_date > now.date():
                problems.append(f"birth_date {values['birth_date']} is in the future")
    collected_at: datetime | None = None
    if values["collected_at"]:
        collected_at = _parse_datetime(values["collected_at"])
        if collected_at is None:
            problems.append(f"collected_at {values['collected_at']!r} is not a date-time like "
                            "2025-03-04T08:15:00+01:00")
        elif collected_at > now + FUTURE_TOLERANCE:
            problems.append(f"collected_at {values['collected_at']} is in the future")
        elif birth_date is not None and collected_at.date() < birth_date:
            problems.append("collected_at is before birth_date")
    tests = tuple(dict.fromkeys(values["tests"].split()))
    if len(tests) > MAX_TESTS_PER_SAMPLE:
        problems.append(f"more than {MAX_TESTS_PER_SAMPLE} tests")
    bad = [t for t in tests if len(t) > MAX_TEST_CODE or not TEST_CODE.fullmatch(t)]
    if bad:
        problems.append(f"test code(s) {', '.join(repr(t[:20]) for t in bad[:5])} are not valid "
                        "LIS test codes (letters, digits, . _ -; separate codes with spaces)")
    if problems or collected_at is None:
        return None, problems
    return OrderRow(line, specimen_id, values["patient_id"], values["patient_name"], sex,
                    birth_date, tests, collected_at, values["location"]), []


def parse_orders_csv(
    text: str, now: datetime | None = None
) -> tuple[list[OrderRow], list[RowError], int, int]:
    """Validate the file without the database: (rows, errors, data rows read, repeats)."""
    now = _as_utc(now or utcnow())
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    errors: list[RowError] = []
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        return [], [RowError(1, "", f"the header line is not valid CSV: {exc}")], 0, 0
    if not header:
        return [], [RowError(1, "", "the file is empty; expected the header line "
                             + ",".join(COLUMNS))], 0, 0
    names = [h.strip() for h in header]
    reader.fieldnames = names
    missing = [c for c in COLUMNS if c not in names]
    unknown = [h for h in names if h not in COLUMNS]
    if missing or unknown or len(set(names)) != len(names):
        reason = "the header must be " + ",".join(COLUMNS)
        if missing:
            reason += f"; missing: {', '.join(missing)}"
        if unknown:
            reason += f"; unknown: {', '.join(unknown)}"
        return [], [RowError(1, "", reason)], 0, 0

    rows: list[OrderRow] = []
    by_specimen: dict[str, OrderRow] = {}
    by_patient: dict[str, OrderRow] = {}
    count = 0
    repeats = 0
    while True:
        try:
            raw = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(RowError(reader.line_num, "", f"not valid CSV: {exc}"))
            break
        # DictReader skips blank lines; after the read, line_num is this row's (last) line.
        start = reader.line_num
        count += 1
        if count > MAX_ROWS:
            errors.append(RowError(start, "", f"more than {MAX_ROWS} rows; split the file"))
            break
        if None in raw:  # more fields than the header
            errors.append(RowError(start, (raw.get("specimen_id") or "")[:64],
                                   f"more than {len(COLUMNS)} fields (a comma inside a field "
                                   "needs quotes)"))
            continue
        if any(value is None for value in raw.values()):
            errors.append(RowError(start, (raw.get("specimen_id") or "")[:64],
                                   f"fewer than {len(COLUMNS)} fields"))
            continue
        row, problems = _validate_row(start, raw, now)
        if row is None:
            specimen = (raw.get("specimen_id") or "").strip()[:64]
            errors.extend(RowError(start, specimen, p) for p in problems)
            continue
        first = by_specimen.get(row.specimen_id)
        if first is not None:
            if first.content() == row.content():
                repeats += 1
            else:
                errors.append(RowError(start, row.specimen_id,
                                       f"specimen listed again with different content (first "
                                       f"on line {first.line}); one specimen is one tube"))
            continue
        other = by_patient.get(row.patient_id)
        if other is not None and other.demographics() != row.demographics():
            errors.append(RowError(start, row.specimen_id,
                                   f"patient {row.patient_id} has a different name, sex or "
                                   f"birth date than on line {other.line}"))
            continue
        by_specimen[row.specimen_id] = row
        by_patient.setdefault(row.patient_id, row)
        rows.append(row)
    return rows, errors, count, repeats


def _check_against_lis(session: Session, row: OrderRow) -> str:
    """Why this row conflicts with what the LIS already holds, or ""."""
    sample = session.scalar(select(Sample).where(Sample.specimen_id == row.specimen_id))
    patient = session.scalar(select(Patient).where(Patient.patient_id == row.patient_id))
    if patient is not None and (patient.name, patient.sex, patient.birth_date) != (
        row.patient_name, row.sex, row.birth_date
    ):
        return (f"patient {row.patient_id} is in the LIS with a different name, sex or birth "
                "date; check the file against the patient record")
    if sample is None:
        return ""
    if sample.patient is not None and sample.patient.patient_id != row.patient_id:
        return (f"specimen {row.specimen_id} is already in the LIS for another patient: a "
                "swapped or reused label? Check the tube before anything else")
    if sample.collected_at is not None and _as_utc(sample.collected_at) != row.collected_at:
        return (f"specimen {row.specimen_id} is in the LIS collected at "
                f"{_as_utc(sample.collected_at).isoformat()}, the file says "
                f"{row.collected_at.isoformat()}")
    known = {t.test_code for t in sample.ordered_tests}
    new_tests = [t for t in row.tests if t not in known]
    if new_tests and sample.state in (SampleState.COMPLETED, SampleState.REPORTED):
        return (f"specimen {row.specimen_id} is {sample.state}; tests "
                f"{', '.join(new_tests)} cannot be added to it: order them on a new specimen")
    return ""


def import_orders_csv(
    session: Session,
    path_or_text: str | Path | bytes,
    *,
    skip_invalid: bool = False,
    actor: str,
    now: datetime | None = None,
) -> ImportReport:
    """Import an orders CSV in the caller's transaction (see the module text for the rules).

    ``path_or_text``: a Path, a str path, CSV bytes, or CSV text (a str with a line break).
    Returns the report; with errors and without ``skip_invalid`` nothing is written and
    ``report.ok`` is False. Raises :class:`OrderError` when the file cannot be read at all.
    """
    now = _as_utc(now or utcnow())
    text, name = _read_text(path_or_text)
    rows, errors, count, repeats = parse_orders_csv(text, now)
    report = ImportReport(rows=count, duplicate_rows=repeats)
    valid: list[OrderRow] = []
    for row in rows:
        conflict = _check_against_lis(session, row)
        if conflict:
            errors.append(RowError(row.line, row.specimen_id, conflict))
        else:
            valid.append(row)
    errors.sort(key=lambda e: e.line)
    report.errors = errors
    if errors and (not skip_invalid or any(e.line <= 1 for e in errors)):
        # A bad header or an unreadable file is never "skipped": nothing was understood.
        log.warning("lis.orders.invalid", source=name, errors=len(errors), rows=count)
        return report
    report.skipped = len({e.line for e in errors})

    for row in valid:
        _apply_row(session, row, actor, report, now)
    report.imported = True
    session.add(AccessAudit(actor=actor, action="orders.import", object_type="orders_file",
                            object_id=Path(name).name[:100], detail=report.summary(), at=now))
    session.flush()
    log.info("lis.orders.imported", source=name, created=report.samples_created,
             updated=report.samples_updated, unchanged=report.samples_unchanged,
             skipped=report.skipped)
    return report


def _patient_for(session: Session, row: OrderRow, now: datetime) -> Patient:
    patient = session.scalar(select(Patient).where(Patient.patient_id == row.patient_id))
    if patient is None:
        patient = Patient(patient_id=row.patient_id, name=row.patient_name, sex=row.sex,
                          birth_date=row.birth_date, created_at=now)
        session.add(patient)
        session.flush()
    return patient


def _apply_row(session: Session, row: OrderRow, actor: str, report: ImportReport,
               now: datetime) -> None:
    sample = session.scalar(select(Sample).where(Sample.specimen_id == row.specimen_id))
    patient = _patient_for(session, row, now)
    if sample is None:
        sample = Sample(specimen_id=row.specimen_id, patient_fk=patient.id,
                        collected_at=row.collected_at, created_at=now)
        # The event is dated at collection: the trace and the overdue list measure from when
        # the tube was drawn, not from when the file reached us.
        lifecycle.transition(session, sample, SampleState.COLLECTED, actor=actor,
                             location=row.location, at=min(row.collected_at, now),
                             note="from orders import")
        for code in row.tests:
            session.add(OrderedTest(sample_fk=sample.id, test_code=code, ordered_at=now))
        report.samples_created += 1
        report.tests_ordered += len(row.tests)
        return
    changed = False
    if sample.patient_fk is None:  # registered by `samples collect` before its order came
        sample.patient_fk = patient.id
        session.add(AccessAudit(actor=actor, action="sample.patient_attached",
                                object_type="sample", object_id=sample.specimen_id,
                                detail="from orders import", at=now))
        changed = True
    if sample.collected_at is None:
        sample.collected_at = row.collected_at
        changed = True
    known = {t.test_code for t in sample.ordered_tests}
    added = [code for code in row.tests if code not in known]
    for code in added:
        _add(session, sample, code, actor, now, "orders import")
    report.tests_added += len(added)
    if added or changed:
        report.samples_updated += 1
    else:
        report.samples_unchanged += 1


def _sample(session: Session, specimen_id: str) -> Sample:
    sample = session.scalar(select(Sample).where(Sample.specimen_id == specimen_id))
    if sample is None:
        raise OrderError(f"specimen {specimen_id} is not in the LIS; import its order first "
                         "(`labrelay orders import FILE.csv`)")
    return sample


def _add(session: Session, sample: Sample, test_code: str, actor: str, now: datetime,
         why: str) -> OrderedTest:
    test = OrderedTest(sample_fk=sample.id, test_code=test_code, ordered_at=now)
    session.add(test)
    session.add(AccessAudit(actor=actor, action="test.added", object_type="sample",
                            object_id=sample.specimen_id, detail=f"{test_code} ({why})", at=now))
    session.flush()
    session.refresh(sample, ["ordered_tests"])
    return test


def add_test(
    session: Session, specimen_id: str, test_code: str, *, actor: str,
    now: datetime | None = None,
) -> OrderedTest:
    """Order one more test on a sample (idempotent: an existing order is returned)."""
    code = test_code.strip()
    if not TEST_CODE.fullmatch(code) or len(code) > MAX_TEST_CODE:
        raise OrderError(f"{test_code!r} is not a valid LIS test code")
    sample = _sample(session, specimen_id)
    existing = next((t for t in sample.ordered_tests if t.test_code == code), None)
    if existing is not None:
        return existing
    if sample.state in (SampleState.COMPLETED, SampleState.REPORTED):
        raise OrderError(f"specimen {specimen_id} is {sample.state}; {code} cannot be added: "
                         "order it on a new specimen")
    return _add(session, sample, code, actor, _as_utc(now or utcnow()), "added")


def cancel_test(
    session: Session, specimen_id: str, test_code: str, actor: str,
    now: datetime | None = None,
) -> OrderedTest:
    """Cancel an ordered test (it then counts as done); may complete the sample.

    A test with a final result cannot be cancelled (send a correction instead); cancelling
    an already cancelled test changes nothing.
    """
    from lis_bridge.results import complete_if_done

    when = _as_utc(now or utcnow())
    sample = _sample(session, specimen_id)
    test = next((t for t in sample.ordered_tests if t.test_code == test_code), None)
    if test is None:
        raise OrderError(f"specimen {specimen_id} has no order for {test_code} (ordered: "
                         f"{', '.join(t.test_code for t in sample.ordered_tests) or 'nothing'})")
    if test.status == OrderedTestStatus.CANCELLED:
        return test
    if test.status == OrderedTestStatus.FINAL:
        raise OrderError(f"{test_code} on specimen {specimen_id} already has a final result; "
                         "it cannot be cancelled (a wrong value needs a correction)")
    test.status = OrderedTestStatus.CANCELLED
    session.add(AccessAudit(actor=actor, action="test.cancelled", object_type="sample",
                            object_id=specimen_id, detail=test_code, at=when))
    session.flush()
    complete_if_done(session, sample, actor=actor, now=when)
    log.info("lis.test.cancelled", sample_id=specimen_id, test_code=test_code)
    return test
