"""Laboratory reports: gather a sample's data, render the PDF, sign and verify it.

One report is one immutable file per version, ``<output_dir>/<specimen_id>/<specimen_id>-v<N>.pdf``.
Rendering is idempotent: the data that went into a version is hashed (``content_hash``);
the same data gives the existing version back, changed data (a correction) gives a new
version that supersedes the previous one.

Verification token (printed as a QR code on the first page, also in the PDF's keywords):
``LR1.<base64url payload>.<base64url HMAC-SHA256>``. The payload carries the specimen id,
the version, the content hash, the issue date and the signing key id. The token sits
inside the PDF, so it cannot sign the PDF's own bytes: the PDF's sha256 is recorded in
the ``reports`` table instead, and verifying a file checks both (the token's MAC and the
file's sha256 against the database). A single changed byte fails one or the other.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import structlog
from reportlab.platypus import Flowable
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine.errors import LabrelayError
from lis_bridge import lifecycle
from lis_bridge.models import (
    AccessAudit,
    OrderedTest,
    OrderedTestStatus,
    Patient,
    Report,
    Result,
    Sample,
    SampleEvent,
    SampleState,
    utcnow,
)
from lis_bridge.outbox import enqueue

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "LR1"  # noqa: S105 - a format marker, not a secret
DEFAULT_PANEL = "Results"
_TOKEN_RE = re.compile(rb"/Keywords \((LR1\.[A-Za-z0-9_-]{8,2000}\.[A-Za-z0-9_-]{16,200})\)")
_MAX_TOKEN_CHARS = 4000


class ReportError(LabrelayError):
    """A report could not be rendered (unknown sample, sample not complete, disk full...)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """What a report needs besides the data. Picklable: it travels to worker processes."""

    output_dir: Path
    signing_key: bytes
    lab_name: str = "Laboratory"
    lab_address: str = ""
    lab_phone: str = ""
    signatory_name: str = ""
    signatory_title: str = ""
    key_id: str = "k1"
    # test_code -> panel / display name, from the mappings (the engine fills them in):
    # results are grouped by panel and shown by name. Tuples keep the settings hashable.
    test_panels: tuple[tuple[str, str], ...] = ()
    test_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if len(self.signing_key) < 16:
            raise ReportError(
                "the report signing key is missing or shorter than 16 bytes: set "
                "reports.signing_key (e.g. `openssl rand -hex 32`)"
            )
        if not self.key_id or "." in self.key_id:
            raise ReportError("reports.key_id must be a short name without dots (e.g. k1)")


def report_settings_from_config(cfg: Any) -> ReportSettings:
    """Settings from the engine configuration (``EngineConfig`` or its ``reports`` section).

    ReportError when the signing key is missing or too short: reports cannot be signed.
    """
    reports = getattr(cfg, "reports", cfg)
    return ReportSettings(
        output_dir=Path(reports.output_dir),
        signing_key=str(reports.signing_key).encode("utf-8"),
        lab_name=str(reports.lab_name),
        lab_address=str(reports.lab_address),
        lab_phone=str(reports.lab_phone),
        signatory_name=str(reports.signatory_name),
        signatory_title=str(reports.signatory_title),
        key_id=str(reports.key_id),
    )


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class ResultLine:
    test_code: str
    display_name: str
    value: str
    unit: str
    reference_range: str
    flag: str  # normalised: L H LL HH A N or ""
    is_critical: bool
    status: str  # F final, P preliminary, C corrected
    comments: str
    observed_at: str  # ISO 8601 UTC, "" when unknown

    @property
    def corrected(self) -> bool:
        return self.status == "C"

    @property
    def abnormal(self) -> bool:
        return self.flag not in ("", "N")


@dataclass(frozen=True, slots=True)
class PanelGroup:
    name: str
    results: tuple[ResultLine, ...]


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything printed on a report, as plain values (hashable, picklable, JSON-able)."""

    sample_id: int
    specimen_id: str
    patient_id: str
    patient_name: str
    patient_sex: str
    birth_date: str  # ISO date or ""
    age: str  # at collection, e.g. "42 y", "5 mo", "" when unknown
    collected_at: str
    collection_location: str
    received_at: str
    panels: tuple[PanelGroup, ...]
    not_done: tuple[str, ...]  # display names of ordered tests not done (cancelled)
    notes: tuple[str, ...] = field(default=())  # interpretation notes

    @property
    def result_count(self) -> int:
        return sum(len(p.results) for p in self.panels)

    @property
    def has_critical(self) -> bool:
        return any(r.is_critical for p in self.panels for r in p.results)


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:  # SQLite returns naive datetimes; they are stored in UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(birth: date | None, at: datetime | None) -> str:
    if birth is None or at is None:
        return ""
    ref = at.date()
    if ref < birth:
        return ""
    years = ref.year - birth.year - ((ref.month, ref.day) < (birth.month, birth.day))
    if years >= 2:
        return f"{years} y"
    months = (ref.year - birth.year) * 12 + ref.month - birth.month - (ref.day < birth.day)
    if months >= 1:
        return f"{months} mo"
    return f"{(ref - birth).days} d"


def _value_text(result: Result) -> str:
    text = (result.value_text or "").strip()
    if text:
        if result.comparator and not text.startswith(result.comparator):
            return f"{result.comparator}{text}"
        return text
    if result.value_number is None:
        return ""
    number = Decimal(result.value_number)
    shown = format(number.normalize(), "f") if number == number.to_integral() else str(
        number.normalize()
    )
    return f"{result.comparator}{shown}"


def gather_report_data(
    session: Session,
    sample_id: int,
    panels: Mapping[str, str] | None = None,
    display_names: Mapping[str, str] | None = None,
) -> ReportData:
    """Read what the report of ``sample_id`` shows. ``panels``: test_code -> panel name."""
    sample = session.get(Sample, sample_id)
    if sample is None:
        raise ReportError(f"sample #{sample_id} does not exist; nothing to report")
    panels = panels or {}
    display_names = display_names or {}
    patient: Patient | None = sample.patient
    events = list(
        session.scalars(
            select(SampleEvent).where(SampleEvent.sample_fk == sample.id).order_by(SampleEvent.id)
        )
    )
    collection_location = next(
        (e.location for e in events if e.to_state == SampleState.COLLECTED and e.location),
        next((e.location for e in events if e.location), sample.location),
    )
    received = next((e.at for e in events if e.to_state == SampleState.RECEIVED_AT_LAB), None)

    results = list(
        session.scalars(
            select(Result)
            .where(Result.sample_fk == sample.id, Result.is_current.is_(True))
            .order_by(Result.id)
        )
    )
    ordered_tests = list(session.scalars(
        select(OrderedTest).where(OrderedTest.sample_fk == sample.id).order_by(OrderedTest.id)
    ))
    cancelled_codes = {t.test_code for t in ordered_tests
                       if t.status == OrderedTestStatus.CANCELLED}
    grouped: dict[str, list[ResultLine]] = {}
    not_done: list[str] = []
    for result in results:
        name = display_names.get(result.test_code, result.test_code)
        if result.status == "X":  # "cannot be done" from the analyzer
            not_done.append(name)
            continue
        if result.status == "P" and result.test_code in cancelled_codes:
            # a preliminary value of a test cancelled afterwards is never a reported result
            not_done.append(name)
            continue
        line = ResultLine(
            test_code=result.test_code,
            display_name=name,
            value=_value_text(result),
            unit=result.units or "",
            reference_range=result.reference_range or "",
            flag=(result.flag or "").upper(),
            is_critical=bool(result.is_critical) or (result.flag or "").upper() in ("HH", "LL"),
            status=result.status or "F",
            comments=(result.comments or "").strip(),
            observed_at=_iso(result.observed_at),
        )
        grouped.setdefault(panels.get(result.test_code, DEFAULT_PANEL), []).append(line)
    reported_codes = {r.test_code for r in results}
    for ordered in ordered_tests:
        if ordered.test_code in cancelled_codes and ordered.test_code not in reported_codes:
            not_done.append(display_names.get(ordered.test_code, ordered.test_code))

    groups = tuple(PanelGroup(name, tuple(lines)) for name, lines in grouped.items())
    notes: list[str] = []
    critical = [r.display_name for g in groups for r in g.results if r.is_critical]
    if critical:
        notes.append(
            "Critical value(s): "
            + ", ".join(critical)
            + ". Critical values are telephoned to the requesting clinician by the laboratory."
        )
    corrected = [r.display_name for g in groups for r in g.results if r.corrected]
    if corrected:
        notes.append(
            "Corrected result(s): "
            + ", ".join(corrected)
            + ". These replace values reported earlier; please disregard the earlier values."
        )
    if not_done:
        notes.append("Not done: " + ", ".join(not_done) + ". A new specimen may be requested.")
    return ReportData(
        sample_id=sample.id,
        specimen_id=sample.specimen_id,
        patient_id=patient.patient_id if patient else "",
        patient_name=patient.name if patient else "",
        patient_sex=patient.sex if patient else "U",
        birth_date=patient.birth_date.isoformat() if patient and patient.birth_date else "",
        age=_age(patient.birth_date if patient else None, sample.collected_at),
        collected_at=_iso(sample.collected_at),
        collection_location=collection_location or "",
        received_at=_iso(received),
        panels=groups,
        not_done=tuple(not_done),
        notes=tuple(notes),
    )


def content_hash(data: ReportData) -> str:
    """sha256 of a canonical JSON of the data: equal data, equal hash (idempotency)."""
    canonical = json.dumps(asdict(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class TokenClaims:
    specimen_id: str
    version: int
    content_hash: str
    issued: str  # ISO date
    key_id: str


class TokenError(LabrelayError):
    """A verification token is malformed or its signature is wrong."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def make_token(
    settings: ReportSettings,
    specimen_id: str,
    version: int,
    content_hash: str,
    issued: date | None = None,
) -> str:
    """A compact, URL-safe, signed token naming one report version."""
    claims = {
        "s": specimen_id,
        "v": version,
        "h": content_hash,
        "d": (issued or utcnow().date()).isoformat(),
        "k": settings.key_id,
    }
    body = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    signed = f"{TOKEN_PREFIX}.{body}"
    return f"{signed}.{_b64(_mac(settings.signing_key, signed))}"


def parse_token(settings: ReportSettings, token: str) -> TokenClaims:
    """Check the token's signature and return what it claims; TokenError otherwise."""
    token = token.strip()
    if len(token) > _MAX_TOKEN_CHARS:
        raise TokenError("the token is too long to be a labrelay verification token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError("not a labrelay verification token (expected LR1.<payload>.<signature>)")
    try:
        raw = _unb64(parts[1])
        mac = _unb64(parts[2])
        claims = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("the token is damaged (not valid base64url/JSON)") from exc
    if not isinstance(claims, dict):
        raise TokenError("the token is damaged (payload is not an object)")
    key_id = str(claims.get("k", ""))
    if key_id != settings.key_id:
        raise TokenError(
            f"the token was signed with key {key_id!r}, this laboratory signs with "
            f"{settings.key_id!r}: it was not issued here, or the key was rotated"
        )
    if not hmac.compare_digest(mac, _mac(settings.signing_key, f"{parts[0]}.{parts[1]}")):
        raise TokenError("the token's signature is wrong: it was altered or not issued here")
    try:
        return TokenClaims(
            specimen_id=str(claims["s"]),
            version=int(claims["v"]),
            content_hash=str(claims["h"]),
            issued=str(claims["d"]),
            key_id=key_id,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenError("the token is damaged (a field is missing)") from exc


def token_in_pdf(pdf: bytes) -> str | None:
    """The verification token embedded in a labrelay PDF (its keywords), or None."""
    found = _TOKEN_RE.search(pdf)
    return found.group(1).decode("ascii") if found else None


# --------------------------------------------------------------------------- PDF


_FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
    Path("/Library/Fonts"),
)
_fonts: tuple[str, str, str] | None = None


def _report_fonts() -> tuple[str, str, str]:
    """(regular, bold, italic) font names. DejaVu Sans when installed: the 14 standard PDF
    fonts only know Latin-1, and a patient's name must never lose a letter."""
    global _fonts
    if _fonts is not None:
        return _fonts
    from reportlab import rl_config
    from reportlab.pdfbase import pdfmetrics

    # Binary (zlib) streams instead of ASCII85 text: a quarter smaller, and encoding them
    # was the largest cost of a report. reportlab reads this global when writing streams;
    # labrelay is its only user in the process.
    rl_config.useA85 = 0
    from reportlab.pdfbase.ttfonts import TTFont

    for folder in _FONT_DIRS:
        files = [folder / f for f in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf",
                                      "DejaVuSans-Oblique.ttf")]
        if all(f.is_file() for f in files):
            names = ("LabrelaySans", "LabrelaySans-Bold", "LabrelaySans-Oblique")
            for name, path in zip(names, files, strict=True):
                pdfmetrics.registerFont(TTFont(name, str(path)))
            pdfmetrics.registerFontFamily(
                names[0], normal=names[0], bold=names[1], italic=names[2], boldItalic=names[1]
            )
            _fonts = names
            return _fonts
    log.warning("report.font.fallback", detail="DejaVu Sans not found; non-Latin-1 letters "
                "cannot be printed. Install fonts-dejavu-core.")
    _fonts = ("Helvetica", "Helvetica-Bold", "Helvetica-Oblique")
    return _fonts


def _qr_modules(text: str) -> list[list[bool]]:
    """The QR module matrix of ``text`` (reportlab's encoder, error correction M).

    The mask is fixed instead of searched: the spec lets the encoder choose any of the
    eight masks (the search only tunes contrast), and searching costs 40 ms per report.
    """
    from reportlab.graphics.barcode.qrencoder import QRCode, QRErrorCorrectLevel

    qr = QRCode(None, QRErrorCorrectLevel.M)
    qr.addData(text)
    qr.version = qr.calculate_version()
    qr.makeImpl(False, 2)
    return [[bool(m) for m in row] for row in qr.modules]


class _QrFlowable(Flowable):
    """A QR code drawn as one filled path (a reportlab shape per module is 10x slower)."""

    def __init__(self, text: str, size: float, border: int = 2) -> None:
        super().__init__()
        self.modules = _qr_modules(text)
        self.size = size
        self.border = border

    def wrap(self, _avail_width: float, _avail_height: float) -> tuple[float, float]:
        return self.size, self.size

    def draw(self) -> None:
        count = len(self.modules)
        box = self.size / (count + 2 * self.border)
        canvas = self.canv
        path = canvas.beginPath()
        for r, row in enumerate(self.modules):
            y = self.size - (r + self.border + 1) * box
            c = 0
            while c < count:
                if row[c]:
                    start = c
                    while c < count and row[c]:
                        c += 1
                    path.rect((start + self.border) * box, y, (c - start) * box, box)
                else:
                    c += 1
        canvas.saveState()
        canvas.setFillColorRGB(0, 0, 0)
        canvas.drawPath(path, stroke=0, fill=1)
        canvas.restoreState()


SEX_NAMES = {"M": "Male", "F": "Female", "O": "Other", "U": "Unknown"}


def render_pdf(
    data: ReportData, path: Path, settings: ReportSettings, *, version: int, token: str
) -> None:
    """Write the report PDF to ``path``. Same arguments, same bytes (reportlab invariant)."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.pdfbase.pdfmetrics import stringWidth
    from reportlab.pdfgen.canvas import Canvas
    from reportlab.platypus import (
        KeepTogether,
        Paragraph,
        SimpleDocTemplate,
        Spacer,
        Table,
        TableStyle,
    )

    regular, bold, italic = _report_fonts()
    red = colors.HexColor("#B00020")
    grey = colors.HexColor("#555555")
    light = colors.HexColor("#E8E8E8")
    width, height = A4
    margin = 15 * mm

    body = ParagraphStyle("body", fontName=regular, fontSize=9, leading=11.5)
    small = ParagraphStyle("small", parent=body, fontSize=7.5, leading=9.5, textColor=grey)
    comment = ParagraphStyle("comment", parent=body, fontName=italic, fontSize=8, leading=10)
    heading = ParagraphStyle("heading", parent=body, fontName=bold, fontSize=11, leading=14,
                             spaceBefore=6, spaceAfter=3)

    def para(text: str, style: ParagraphStyle = body) -> Paragraph:
        return Paragraph(escape(text).replace("\n", "<br/>"), style)

    class NumberedCanvas(Canvas):
        """Two passes on the canvas: keep each page, then write "Page x of y" on all."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                self.setFont(regular, 8)
                self.setFillColor(grey)
                self.drawRightString(width - margin, 10 * mm,
                                     f"Page {self._pageNumber} of {total}")
                super().showPage()
            super().save()

    title = "AMENDED LABORATORY REPORT" if version > 1 else "LABORATORY REPORT"

    def on_page(canvas: Canvas, _doc: Any) -> None:
        # Repeated on every page: who issued it, whose it is, which specimen and version.
        canvas.saveState()
        canvas.setFillColor(colors.black)
        canvas.setFont(bold, 13)
        canvas.drawString(margin, height - 14 * mm, settings.lab_name)
        canvas.setFont(regular, 8)
        contact = "   ".join(x for x in (settings.lab_address, settings.lab_phone) if x)
        canvas.drawString(margin, height - 18.5 * mm, contact)
        canvas.setFont(bold, 10)
        canvas.drawRightString(width - margin, height - 14 * mm, title)
        canvas.setFont(regular, 8)
        canvas.drawRightString(
            width - margin, height - 18.5 * mm, f"Specimen {data.specimen_id}   Version {version}"
        )
        canvas.drawRightString(
            width - margin, height - 22.5 * mm,
            f"Patient {data.patient_name}   ID {data.patient_id}",
        )
        canvas.setStrokeColor(colors.black)
        canvas.setLineWidth(0.8)
        canvas.line(margin, height - 25 * mm, width - margin, height - 25 * mm)
        canvas.setFillColor(grey)
        canvas.setFont(regular, 7)
        canvas.drawString(margin, 10 * mm, f"Verification: labrelay reports verify {token[:24]}...")
        canvas.restoreState()

    story: list[Any] = []

    # Demographics and specimen details beside the QR code.
    drawing = _QrFlowable(token, 34 * mm)
    details = [
        ["Patient", data.patient_name, "Specimen", data.specimen_id],
        ["Patient ID", data.patient_id, "Collected", data.collected_at or "not recorded"],
        ["Sex", SEX_NAMES.get(data.patient_sex, data.patient_sex),
         "Location", data.collection_location or "not recorded"],
        ["Birth date", data.birth_date or "not recorded",
         "Received", data.received_at or "not recorded"],
        ["Age", data.age or "unknown", "Report", f"version {version}"],
    ]
    details_table = Table(details, colWidths=[22 * mm, 50 * mm, 20 * mm, 50 * mm])
    details_table.setStyle(TableStyle([
        ("FONT", (0, 0), (-1, -1), regular, 8.5),
        ("FONT", (0, 0), (0, -1), bold, 8.5),
        ("FONT", (2, 0), (2, -1), bold, 8.5),
        ("FONT", (1, 0), (1, 0), bold, 9.5),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("TOPPADDING", (0, 0), (-1, -1), 1),
    ]))
    top = Table([[details_table, drawing]], colWidths=[144 * mm, 36 * mm])
    top.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                             ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
    story.append(top)
    if version > 1:
        story.append(para(
            f"This is version {version} of the report. It replaces all earlier versions.",
            ParagraphStyle("amended", parent=body, fontName=bold, textColor=red),
        ))

    columns = [50 * mm, 28 * mm, 26 * mm, 24 * mm, 34 * mm, 18 * mm]
    for group in data.panels:
        rows: list[list[Any]] = [["Test", "Result", "Flag", "Units", "Reference range", "Status"]]
        style: list[tuple[Any, ...]] = [
            ("FONT", (0, 0), (-1, -1), regular, 8.5),
            ("FONT", (0, 0), (-1, 0), bold, 8.5),
            ("BACKGROUND", (0, 0), (-1, 0), light),
            ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("TOPPADDING", (0, 0), (-1, -1), 1.5),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
        ]
        for line in group.results:
            row = len(rows)
            if line.is_critical:
                flag = f"{line.flag or '!'} CRITICAL"
            else:
                flag = line.flag if line.flag != "N" else ""
            status = {"C": "Corrected", "P": "Preliminary"}.get(line.status, "Final")
            # A plain string draws far faster than a Paragraph; wrap only what does not fit.
            name: Any = line.display_name
            if stringWidth(name, regular, 8.5) > columns[0] - 8:
                name = para(name)
            rows.append([name, line.value, flag, line.unit, line.reference_range, status])
            if line.is_critical:
                style += [("FONT", (1, row), (2, row), bold, 8.5),
                          ("TEXTCOLOR", (1, row), (2, row), red)]
            elif line.abnormal:
                style.append(("FONT", (1, row), (2, row), bold, 8.5))
            if line.corrected:
                style.append(("FONT", (5, row), (5, row), bold, 8.5))
            if line.comments:
                rows.append(["", para(line.comments, comment), "", "", "", ""])
                style.append(("SPAN", (1, len(rows) - 1), (-1, len(rows) - 1)))
        table = Table(rows, colWidths=columns, repeatRows=1)
        table.setStyle(TableStyle(style))
        story.append(Spacer(1, 3 * mm))
        story.append(para(group.name, heading))
        story.append(table)

    if data.not_done:
        story.append(Spacer(1, 2 * mm))
        story.append(para("Ordered but not done: " + ", ".join(data.not_done)))

    legend = (
        "Flags: H above / L below the reference range (bold); A abnormal. "
        "HH / LL CRITICAL (bold red): a value that needs immediate clinical attention. "
        "Corrected: replaces a value reported earlier."
    )
    closing: list[Any] = [Spacer(1, 4 * mm)]
    if data.notes:
        closing.append(para("Interpretation notes", heading))
        closing += [para(note) for note in data.notes]
    closing += [Spacer(1, 2 * mm), para(legend, small), Spacer(1, 6 * mm)]
    signatory = ", ".join(x for x in (settings.signatory_name, settings.signatory_title) if x)
    closing.append(para(f"Authorised by: {signatory or 'the laboratory'}",
                        ParagraphStyle("sig", parent=body, fontName=bold)))
    closing.append(para(
        "Electronically validated report; no signature required. Check it is genuine by "
        "scanning the QR code or with `labrelay reports verify`.", small))
    closing.append(para(f"Verification token: {token}", small))
    story.append(KeepTogether(closing))

    doc = SimpleDocTemplate(
        str(path),
        pagesize=A4,
        leftMargin=margin,
        rightMargin=margin,
        topMargin=30 * mm,
        bottomMargin=16 * mm,
        title=f"Laboratory report {data.specimen_id} v{version}",
        author=settings.lab_name,
        subject="Laboratory report",
        creator="labrelay",
        keywords=token,  # read back by token_in_pdf() for verification
        invariant=1,  # fixed dates and document id: same data, same bytes
    )
    doc.build(story, onFirstPage=on_page, onLaterPages=on_page, canvasmaker=NumberedCanvas)


# --------------------------------------------------------------------------- rendering


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_specimen_name(specimen_id: str) -> str:
    """A file-system-safe name for a specimen id (no separators, no dot-files, bounded)."""
    name = _UNSAFE.sub("_", specimen_id).strip(".") or "_"
    if name != specimen_id:
        # Two ids that sanitise alike must not share a folder.
        name = f"{name[:80]}_{hashlib.sha256(specimen_id.encode()).hexdigest()[:8]}"
    return name[:100]


def report_path(settings: ReportSettings, specimen_id: str, version: int) -> Path:
    safe = safe_specimen_name(specimen_id)
    return settings.output_dir / safe / f"{safe}-v{version}.pdf"


def _render_temp(
    data: ReportData, target: Path, settings: ReportSettings, version: int, token: str
) -> tuple[Path, str]:
    """Render into a temp file beside ``target`` (same file system) and fsync it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".render-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        render_pdf(data, tmp, settings, version=version, token=token)
        with tmp.open("rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp, digest


def _write_atomically(
    data: ReportData, target: Path, settings: ReportSettings, version: int, token: str
) -> str:
    """Render into a temp file beside the target, fsync, rename; return the sha256."""
    tmp, digest = _render_temp(data, target, settings, version, token)
    os.replace(tmp, target)  # readers see the old file or the whole new one, never half
    return digest


@dataclass(frozen=True, slots=True)
class PreparedPdf:
    """A PDF rendered ahead, outside the write transaction (see :func:`render_job`)."""

    content_hash: str
    version: int
    token: str
    temp_path: Path
    sha256: str

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()


@dataclass(frozen=True, slots=True)
class RenderPlan:
    """What a worker would write: read in one short transaction, drawn outside it."""

    data: ReportData
    content_hash: str
    version: int
    token: str
    path: Path

    def prepare(self, settings: ReportSettings) -> PreparedPdf:
        tmp, sha = _render_temp(self.data, self.path, settings, self.version, self.token)
        return PreparedPdf(self.content_hash, self.version, self.token, tmp, sha)


def plan_report(
    session: Session,
    sample_id: int,
    settings: ReportSettings,
    *,
    panels: Mapping[str, str] | None = None,
    display_names: Mapping[str, str] | None = None,
    now: datetime,
) -> RenderPlan | None:
    """Phase 1 of a worker render: the version that would be written, or None when nothing
    new would be (or the sample is not reportable: phase 2 says why). Drawing a PDF takes
    tens of milliseconds; holding the write transaction (on SQLite, the database write
    lock) for it would serialise every worker."""
    sample = session.get(Sample, sample_id)
    if sample is None or sample.state not in (SampleState.COMPLETED, SampleState.REPORTED):
        return None
    data = gather_report_data(session, sample.id, panels or dict(settings.test_panels),
                              display_names or dict(settings.test_names))
    digest = content_hash(data)
    latest = _latest_report(session, sample.id)
    if latest is not None and latest.content_hash == digest:
        return None
    version = latest.version + 1 if latest is not None else 1
    token = make_token(settings, sample.specimen_id, version, digest, now.date())
    return RenderPlan(data, digest, version, token,
                      report_path(settings, sample.specimen_id, version))


def _latest_report(session: Session, sample_id: int) -> Report | None:
    return session.scalar(
        select(Report).where(Report.sample_fk == sample_id).order_by(Report.version.desc()).limit(1)
    )


@dataclass(frozen=True, slots=True)
class RenderOutcome:
    report: Report
    created: bool


def render_report_outcome(
    session: Session,
    sample_id: int,
    settings: ReportSettings,
    *,
    panels: Mapping[str, str] | None = None,
    display_names: Mapping[str, str] | None = None,
    actor: str = "engine",
    force: bool = False,
    now: datetime | None = None,
    prepared: PreparedPdf | None = None,
) -> RenderOutcome:
    """Like :func:`render_report`, and says whether a new version was written.

    ``prepared`` (from :func:`prepare_report`) is used when it still matches the data and
    version seen now; otherwise the PDF is drawn again here. The caller discards it.
    """
    now = now or utcnow()
    query = select(Sample).where(Sample.id == sample_id)
    if session.get_bind().dialect.name == "postgresql":
        # Two workers rendering the same sample queue here instead of racing for a version.
        query = query.with_for_update()
    sample = session.scalar(query)
    if sample is None:
        raise ReportError(f"sample #{sample_id} does not exist; nothing to report")
    if sample.state not in (SampleState.COMPLETED, SampleState.REPORTED):
        raise ReportError(
            f"sample {sample.specimen_id} is {sample.state}: a report is rendered when the "
            "sample is COMPLETED (every ordered test final or cancelled)"
        )
    bound = log.bind(sample_id=sample.id)
    data = gather_report_data(session, sample.id, panels or dict(settings.test_panels),
                              display_names or dict(settings.test_names))
    digest = content_hash(data)
    latest = _latest_report(session, sample.id)

    if latest is not None and latest.content_hash == digest and not force:
        path = Path(latest.path)
        if not path.is_file():
            # The file was lost: the same version, token and data give the same bytes.
            sha = _write_atomically(data, path, settings, latest.version, latest.token)
            if sha != latest.sha256:
                raise ReportError(
                    f"report {sample.specimen_id} v{latest.version} was missing and could not "
                    "be restored byte for byte; render a new version with --force"
                )
            bound.warning("report.file.restored", version=latest.version)
        if sample.state == SampleState.COMPLETED:
            lifecycle.transition(session, sample, SampleState.REPORTED, actor=actor,
                                 note=f"report v{latest.version}", at=now)
        return RenderOutcome(latest, created=False)

    version = latest.version + 1 if latest is not None else 1
    token = make_token(settings, sample.specimen_id, version, digest, now.date())
    path = report_path(settings, sample.specimen_id, version)
    if (
        prepared is not None
        and prepared.content_hash == digest
        and prepared.version == version
        and prepared.token == token
        and prepared.temp_path.is_file()
    ):
        os.replace(prepared.temp_path, path)
        sha = prepared.sha256
    else:
        sha = _write_atomically(data, path, settings, version, token)
    report = Report(
        sample_fk=sample.id, version=version, path=str(path), sha256=sha,
        content_hash=digest, token=token, created_at=now,
    )
    session.add(report)
    session.flush()
    if latest is not None:
        latest.superseded_by_fk = report.id
    # COMPLETED -> REPORTED for the first report; REPORTED -> REPORTED (the lifecycle's
    # audited amendment move) for a new version of a report that already left.
    lifecycle.transition(
        session, sample, SampleState.REPORTED, actor=actor, at=now,
        note=f"amended report v{version}" if sample.state == SampleState.REPORTED
        else f"report v{version}",
    )
    session.add(AccessAudit(
        actor=actor,
        action="report.amended" if version > 1 else "report.rendered",
        object_type="report",
        object_id=f"{sample.specimen_id} v{version}",
        detail=f"sha256 {sha}" + (f"; supersedes v{latest.version}" if latest else ""),
        at=now,
    ))
    enqueue(session, "notify", f"notify:report_ready:{sample.id}:v{version}", {
        "kind": "report_ready",
        "sample_id": sample.id,
        "specimen_id": sample.specimen_id,
        "report_id": report.id,
        "version": version,
        "amended": version > 1,
        "critical": data.has_critical,
    })
    bound.info("report.rendered", version=version, results=data.result_count)
    return RenderOutcome(report, created=True)


def render_report(
    session: Session,
    sample_id: int,
    settings: ReportSettings,
    *,
    panels: Mapping[str, str] | None = None,
    display_names: Mapping[str, str] | None = None,
    actor: str = "engine",
    force: bool = False,
    now: datetime | None = None,
) -> Report:
    """Render the sample's report in the caller's transaction (idempotent, see module doc).

    Moves the sample COMPLETED -> REPORTED and enqueues a ``report_ready`` notification.
    ``force`` writes a new version even when the data did not change.
    """
    return render_report_outcome(
        session, sample_id, settings, panels=panels, display_names=display_names,
        actor=actor, force=force, now=now,
    ).report


def render_in_transactions(
    factory: sessionmaker[Session],
    sample_id: int,
    settings: ReportSettings,
    *,
    panels: Mapping[str, str] | None = None,
    display_names: Mapping[str, str] | None = None,
    actor: str = "engine",
) -> RenderOutcome:
    """Render with short transactions: read, draw the PDF with no transaction open, then
    write (checking again that the data did not change meanwhile)."""
    from lis_bridge.db import transaction

    now = utcnow()
    with transaction(factory) as session:
        plan = plan_report(session, sample_id, settings, panels=panels,
                           display_names=display_names, now=now)
    prepared = plan.prepare(settings) if plan is not None else None
    try:
        with transaction(factory) as session:
            return render_report_outcome(
                session, sample_id, settings, panels=panels, display_names=display_names,
                actor=actor, now=now, prepared=prepared,
            )
    finally:
        if prepared is not None:
            prepared.discard()


_worker_factories: dict[str, sessionmaker[Session]] = {}


def render_job(
    database_url: str,
    sample_id: int,
    settings: ReportSettings,
    panels: Mapping[str, str] | None = None,
    display_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Render in a worker process: its own engine (cached per process), short transactions.

    Top level and with picklable arguments, so a spawn/forkserver process pool can run it.
    Returns plain data: report_id, version, path, sha256, created (False = unchanged).
    """
    from lis_bridge.db import make_engine, session_factory

    factory = _worker_factories.get(database_url)
    if factory is None:
        factory = session_factory(make_engine(database_url, writer=True))
        _worker_factories[database_url] = factory
    outcome = render_in_transactions(factory, sample_id, settings, panels=panels,
                                     display_names=display_names)
    report = outcome.report
    return {
        "sample_id": sample_id,
        "report_id": report.id,
        "version": report.version,
        "path": report.path,
        "sha256": report.sha256,
        "created": outcome.created,
    }


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Verification:
    genuine: bool
    reason: str
    specimen_id: str | None = None
    version: int | None = None
    issued: str | None = None
    latest_version: int | None = None
    superseded_by_version: int | None = None
    file_checked: bool = False  # the PDF's sha256 matched the reports table

    @property
    def superseded(self) -> bool:
        return self.superseded_by_version is not None


def _refused(reason: str, claims: TokenClaims | None = None) -> Verification:
    return Verification(
        genuine=False,
        reason=reason,
        specimen_id=claims.specimen_id if claims else None,
        version=claims.version if claims else None,
        issued=claims.issued if claims else None,
    )


def verify(
    session: Session | None, settings: ReportSettings, pdf_or_token: bytes | str
) -> Verification:
    """Is this PDF (bytes) or token (text) a report this laboratory issued, and is it current?

    A PDF is genuine when its token's signature is right AND its sha256 is the one recorded
    for that specimen and version. A token alone is checked by signature (and against the
    database when a session is given). Without a database a PDF cannot be checked.
    """
    pdf: bytes | None = None
    if isinstance(pdf_or_token, bytes):
        if pdf_or_token.lstrip()[:5] == b"%PDF-":
            pdf = pdf_or_token
            token = token_in_pdf(pdf)
            if token is None:
                return _refused("no labrelay verification token found in this PDF")
        else:
            token = pdf_or_token.decode("ascii", errors="replace")
    else:
        token = pdf_or_token
    try:
        claims = parse_token(settings, token)
    except TokenError as exc:
        return _refused(f"refused: {exc}")

    if session is None:
        if pdf is not None:
            return _refused(
                "the token's signature is valid, but the file can only be checked against the "
                "laboratory database (give --database or --config)", claims)
        return Verification(
            genuine=True,
            reason="signature valid (no database: whether a newer version exists is unknown)",
            specimen_id=claims.specimen_id, version=claims.version, issued=claims.issued,
        )

    row = session.execute(
        select(Report, Sample)
        .join(Sample, Sample.id == Report.sample_fk)
        .where(Sample.specimen_id == claims.specimen_id, Report.version == claims.version)
    ).first()
    if row is None:
        return _refused(
            f"refused: no report {claims.specimen_id} v{claims.version} in the database", claims)
    report, sample = row
    if not hmac.compare_digest(report.token, token.strip()):
        return _refused("refused: the token does not match the one issued for this report",
                        claims)
    if pdf is not None:
        sha = hashlib.sha256(pdf).hexdigest()
        if not hmac.compare_digest(sha, report.sha256):
            return _refused(
                f"refused: this file was altered (its sha256 {sha[:16]}... is not the one "
                f"recorded for {claims.specimen_id} v{claims.version})", claims)
    latest = _latest_report(session, sample.id)
    latest_version = latest.version if latest is not None else claims.version
    superseded_by: int | None = None
    if report.superseded_by_fk is not None:
        newer = session.get(Report, report.superseded_by_fk)
        superseded_by = newer.version if newer is not None else latest_version
    what = f"{claims.specimen_id} version {claims.version} issued {claims.issued}"
    if superseded_by is not None:
        reason = (f"genuine: {what}, but SUPERSEDED by version {latest_version}; "
                  "use the latest version")
    else:
        reason = f"genuine: {what} (current version)"
    return Verification(
        genuine=True,
        reason=reason,
        specimen_id=claims.specimen_id,
        version=claims.version,
        issued=claims.issued,
        latest_version=latest_version,
        superseded_by_version=superseded_by,
        file_checked=pdf is not None,
    )
