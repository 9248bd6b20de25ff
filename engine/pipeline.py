"""The message path: store raw -> decode -> map -> apply -> reply (DESIGN.md).

Everything here that touches the database runs as a unit of work on the single writer
thread (:mod:`engine.writer`); the adapters call :class:`HL7Handler` / :class:`ASTMHandler`
on the reactor thread and get Deferreds back.

Durability rules (DESIGN.md) as they appear here:
1. the reply is built only after the unit that stored the raw bytes committed;
2. a storage failure gives no positive acknowledgement (HL7 AR / CR with a resend text,
   ASTM NAK of the completing frame);
3. content that cannot be applied is stored and HELD with a reason code;
4. while a specimen has a HELD message, later messages for it are held behind it;
5. duplicates (same sender + control id, or same bytes) are recorded and acknowledged
   again with the original's code, never applied twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import bindparam, literal, select, union_all
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from drivers.model import AnalyzerMessage, MessageKind
from drivers.registry import Driver
from engine.config import InterfaceConfig
from engine.errors import LabrelayError, StorageError
from engine.writer import DatabaseWriter
from lis_bridge.models import MessageSpecimen, MessageStatus, Patient, RawMessage, Sample

log = structlog.get_logger(__name__)

DUPLICATE_WINDOW = timedelta(days=2)

# Hold reasons the engine itself assigns (lis_bridge.results adds UNKNOWN_SPECIMEN etc.).
DECODE_ERROR = "DECODE_ERROR"
UNMAPPED_CODE = "UNMAPPED_CODE"
BEHIND_HELD = "BEHIND_HELD"
NO_MAPPING = "NO_MAPPING"
INTERNAL_ERROR = "INTERNAL_ERROR"
INCOMPLETE_MESSAGE = "INCOMPLETE_MESSAGE"


def _ends_with_l(text: bytes) -> bool:
    """True when the last record of an ASTM message is its L (terminator) record: ``L``
    alone (the Ortho VISION ends its messages so) or followed by a delimiter (PROTOCOLS
    55: the record type is case-insensitive), as the link layer and
    ``drivers.astm.records.split_messages`` take it."""
    last = text.rstrip(b"\r\n").replace(b"\n", b"\r").rsplit(b"\r", 1)[-1].lstrip()
    return last[:1] in (b"L", b"l") and not last[1:2].isalnum()


class _Hold(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class InterfaceRuntime:
    """What the pipeline needs to know about one interface."""

    config: InterfaceConfig
    driver: Driver
    mapping: Any | None = None  # engine.mapping.AnalyzerMapping
    capture: Any | None = None  # engine.capture.CaptureWriter
    mapping_sha256: str = ""  # of the mapping file's bytes as loaded

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class IngestResult:
    """What became of one message; the adapter builds its reply from it."""

    message_id: int
    status: str
    outcome: str  # accepted | held | rejected | duplicate | ack | unsupported
    hold_reason: str = ""
    hold_detail: str = ""
    kind: str = ""
    control_id: str = ""
    original_ack_code: str = ""
    original_status: str = ""  # a duplicate's: the status of the message it repeats
    outgoing: list[bytes] = field(default_factory=list)
    specimen_ids: tuple[str, ...] = ()
    # INFO lines (event, fields) the pipeline writes on the reactor once the unit has
    # committed: the bulk path's per-message lines, kept off the writer thread
    logs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------ units of work


@dataclass(frozen=True, slots=True)
class Decoded:
    """What the driver made of raw bytes: a message, or why there is none."""

    message: AnalyzerMessage | None
    reject_reason: str = ""
    error: str = ""


def decode_raw(rt: InterfaceRuntime, raw: bytes) -> Decoded:
    """Decode ``raw`` with the interface's driver; never raises for bad input."""
    try:
        message = rt.driver.decode(raw)
    except LabrelayError as exc:
        return Decoded(None, DECODE_ERROR, str(exc))
    except (ValueError, IndexError, KeyError, UnicodeError) as exc:  # a driver bug on odd input
        return Decoded(None, DECODE_ERROR, f"{type(exc).__name__}: {exc}")
    if b"\x00" in raw:
        # A NUL is never part of a result, and PostgreSQL refuses it in text: stored as
        # read, the message failed in the database, and its one-at-a-time retry too (it
        # was held as an internal error, or not stored at all when a specimen id held it).
        where = _nul_where(message)
        if where:
            return Decoded(None, DECODE_ERROR,
                           f"the message holds a NUL character (byte 0x00) in {where}: no "
                           "analyzer sends that in a result, so the analyzer or the line "
                           "corrupts data. Nothing was applied; the bytes are kept. Check "
                           "the line (cable, converter, baud rate) and have it resent")
    if rt.config.protocol == "astm" and not _ends_with_l(raw):
        # The sender ended the transfer (EOT, timeout) before the message's L record. Its
        # last record may be cut inside a field ("4." of "4.5"): nothing of it is applied.
        # It is kept and visible; LIS01-A2 obliges the sender to resend the whole message.
        return Decoded(None, INCOMPLETE_MESSAGE,
                       "the analyzer ended the transfer before this message's L record; "
                       "its last record may be cut short, so nothing was applied. The "
                       "analyzer resends it whole; if it does not, resend it from the "
                       "analyzer")
    return Decoded(message)


def _nul_where(value: Any, path: str = "") -> str:
    """Where a NUL character sits in a decoded message (a field's path such as
    ``specimens[0].observations[3].value_text``), or "" when there is none. Walked only
    when the raw bytes hold a 0x00 (a UTF-16 message has them between its characters)."""
    if isinstance(value, str):
        return (path or "the text") if "\x00" in value else ""
    if isinstance(value, tuple):
        for n, item in enumerate(value):
            found = _nul_where(item, f"{path}[{n}]")
            if found:
                return found
        return ""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found = _nul_where(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
            if found:
                return found
    return ""


def ingest(
    session: Session,
    rt: InterfaceRuntime,
    raw: bytes,
    peer: str,
    *,
    apply_now: bool = True,
    now: datetime | None = None,
    decoded: Decoded | None = None,
) -> IngestResult:
    """Store ``raw`` and (unless ``apply_now`` is false) decode, map and apply it.

    ``decoded``: what :func:`decode_raw` already made of ``raw`` (saves decoding twice).
    """
    now = now or _utcnow()
    digest = hashlib.sha256(raw).hexdigest()
    decoded = decoded or decode_raw(rt, raw)
    message = decoded.message
    reject_reason, decode_error = decoded.reject_reason, decoded.error

    row = RawMessage(
        interface=rt.name,
        direction="in",
        protocol=rt.config.protocol,
        peer=peer[:100],
        sender=(message.sender if message else "")[:200],
        control_id=(message.control_id if message else "")[:100],
        message_type=(message.message_type if message else "")[:40],
        payload=raw,
        sha256=digest,
        size=len(raw),
        received_at=now,
        status=MessageStatus.RECEIVED,
    )
    original = _find_duplicate(session, rt, row, now) if message is not None else None
    if original is not None:
        original_id, original_ack, original_status = original
        row.status = MessageStatus.DUPLICATE
        row.duplicate_of_fk = original_id
        row.ack_code = original_ack
        session.add(row)
        session.flush()
        log.info("message.duplicate", interface=rt.name, message_id=row.id,
                 duplicate_of=original_id, control_id=row.control_id)
        return IngestResult(
            row.id, row.status, "duplicate", control_id=row.control_id,
            original_ack_code=original_ack, original_status=original_status,
            kind=message.kind if message else "",
        )
    # What is already known goes into the INSERT itself rather than a later UPDATE.
    if message is None:
        row.status = MessageStatus.REJECTED
        row.hold_reason = reject_reason
        row.hold_detail = decode_error[:2000]
    elif message.kind == MessageKind.ACK:
        row.status = MessageStatus.IGNORED
    else:
        for specimen_id in dict.fromkeys(message.specimen_ids):
            if specimen_id:
                row.specimens.append(MessageSpecimen(specimen_id=specimen_id[:64]))
        if apply_now:
            row.attempts = 1  # the attempt _apply makes below
            if message.kind == MessageKind.RESULTS:
                # Inserted as APPLIED, the outcome of nearly every message: this saves an
                # UPDATE per message. Nobody can see the row before this transaction commits,
                # and a hold rewrites it below (a failure rolls the whole unit back).
                row.status = MessageStatus.APPLIED
                row.applied_at = now
    session.add(row)
    session.flush()  # the row's id: results and the held-message order refer to it
    if message is None:
        log.warning("message.rejected", interface=rt.name, message_id=row.id,
                    reason=reject_reason, detail=decode_error[:300])
        return IngestResult(row.id, row.status, "rejected", reject_reason, decode_error)
    if message.kind == MessageKind.ACK:
        return IngestResult(row.id, row.status, "ack", kind=message.kind,
                            control_id=message.control_id)
    if not apply_now:
        return IngestResult(row.id, row.status, "accepted", kind=message.kind,
                            control_id=message.control_id, specimen_ids=message.specimen_ids)
    return _apply(session, rt, row, message, now)


_RAW = RawMessage
# Prepared once: building a statement costs more than running it (~70 µs against ~40 µs
# on SQLite), and this runs for every message.
_DUPLICATE_CANDIDATES = (
    _RAW.interface == bindparam("interface"),
    _RAW.direction == "in",
    _RAW.status != MessageStatus.DUPLICATE,
    _RAW.received_at >= bindparam("since"),
)


def _first_match(*criteria: Any, rank: int) -> Any:
    return (
        select(_RAW.id, _RAW.ack_code, literal(rank).label("rank"), _RAW.status)
        .where(*_DUPLICATE_CANDIDATES, *criteria)
        .order_by(_RAW.id)
        .limit(1)
        .subquery()
    )


_SAME_BYTES = select(_first_match(_RAW.sha256 == bindparam("sha256"), rank=1))
# HL7: the same sender + control id, else the same bytes, in one round trip: two index
# lookups (ix_raw_messages_dedupe, ix_raw_messages_sha256) joined by UNION ALL, the
# control-id match preferred as when they were two queries.
_EITHER = union_all(
    select(_first_match(_RAW.sender == bindparam("sender"),
                        _RAW.control_id == bindparam("control_id"), rank=0)),
    _SAME_BYTES,
).subquery()
_SAME_CONTROL_ID_OR_BYTES = select(_EITHER.c.id, _EITHER.c.ack_code, _EITHER.c.rank,
                                   _EITHER.c.status).order_by(_EITHER.c.rank).limit(1)


def _find_duplicate(
    session: Session, rt: InterfaceRuntime, row: RawMessage, now: datetime
) -> tuple[int, str, str] | None:
    """(id, ack code, status) of the message ``row`` repeats, or None."""
    params = {"interface": rt.name, "since": now - DUPLICATE_WINDOW, "sha256": row.sha256}
    # HL7 MSH-10 identifies a message; ASTM H-3 is rarely set and H-14 is only a timestamp,
    # so on ASTM only identical bytes count as the same message.
    if row.protocol == "hl7" and row.control_id:
        query = _SAME_CONTROL_ID_OR_BYTES
        params.update(sender=row.sender, control_id=row.control_id)
    else:
        query = _SAME_BYTES
    found = session.execute(query, params).first()
    if found is None:
        return None
    if row.protocol == "hl7" and row.control_id and found[2] == 0:
        # Same sender and MSH-10 but other bytes: a resend that only restamped MSH-7, or an
        # analyzer that reuses control ids (counters restart after a reboot). Only the
        # first is a duplicate; treating the second as one would drop real results.
        earlier = session.get(RawMessage, found[0])
        if earlier is not None and earlier.sha256 != row.sha256 and (
            _after_msh(earlier.payload) != _after_msh(row.payload)
        ):
            log.warning("hl7.control_id.reused", interface=rt.name, control_id=row.control_id,
                        earlier_message_id=earlier.id)
            same_bytes = session.execute(_SAME_BYTES, params).first()
            return ((same_bytes[0], same_bytes[1], same_bytes[3]) if same_bytes is not None
                    else None)
    return (found[0], found[1], found[3])


def _after_msh(payload: bytes) -> bytes:
    """The message without its MSH segment (whatever the segment terminator)."""
    cut = min((i for i in (payload.find(b"\r"), payload.find(b"\n")) if i >= 0),
              default=len(payload))
    return payload[cut:].lstrip(b"\r\n")


def apply_stored(
    session: Session,
    rt: InterfaceRuntime,
    row: RawMessage,
    message: AnalyzerMessage,
    *,
    now: datetime | None = None,
) -> IngestResult:
    """Apply a stored message; on any hold, nothing of it is written."""
    row.attempts += 1
    return _apply(session, rt, row, message, now or _utcnow())


def _apply(
    session: Session, rt: InterfaceRuntime, row: RawMessage, message: AnalyzerMessage,
    now: datetime,
) -> IngestResult:
    """:func:`apply_stored` once the attempt is counted. A message that carries host
    queries beside its results (an ASTM message with both Q and R records) has its results
    applied (or held) as any other, and its queries answered as well."""
    result = _apply_content(session, rt, row, message, now)
    if message.queries and message.kind != MessageKind.QUERY:
        result.outgoing = answer_query(session, rt, message)
    return result


def _apply_content(
    session: Session, rt: InterfaceRuntime, row: RawMessage, message: AnalyzerMessage,
    now: datetime,
) -> IngestResult:
    result = IngestResult(row.id, row.status, "accepted", kind=message.kind,
                          control_id=message.control_id, specimen_ids=message.specimen_ids)
    if message.kind == MessageKind.QUERY and rt.config.protocol == "hl7":
        # HL7 work-order queries (LAB-27 QBP^Q11, QRY^Q02, vendor QBPs) are not answered
        # with work orders yet (PROTOCOLS 95-97). A plain AA told the analyzer its query
        # was taken, and it waited for a worklist that never came. Stored, IGNORED, logged,
        # and refused (AR, so that the analyzer stops asking, PROTOCOLS 91).
        row.status = MessageStatus.IGNORED
        result.status, result.outcome = row.status, "unsupported"
        log.warning("hl7.query.unsupported", interface=rt.name, message_id=row.id,
                    message_type=message.message_type, control_id=message.control_id,
                    action="program the tests on the analyzer; labrelay does not answer "
                           "HL7 work-order queries")
        return result
    if message.kind == MessageKind.QUERY:
        result.outgoing = answer_query(session, rt, message)
        row.status = MessageStatus.ANSWERED
        row.applied_at = now
        result.status = row.status
        return result
    if message.kind != MessageKind.RESULTS:
        # keep-alive, QC, order acknowledgements, training: stored, nothing to apply
        # (PROTOCOLS 44)
        if message.kind == MessageKind.OTHER and message.specimens:
            # results in a training or debugging message (drivers.model.NOT_PRODUCTION)
            log.warning("message.not_applied", interface=rt.name, message_id=row.id,
                        reason="not a production message (training or debugging)",
                        control_id=message.control_id)
        row.status = MessageStatus.IGNORED
        result.status = row.status
        return result
    # apply_results writes nothing for a specimen it holds, so a message about one specimen
    # needs no savepoint. With several, an earlier specimen may be written before a later
    # one is held: the savepoint undoes it, so a held message leaves no results behind.
    several = sum(1 for s in message.specimens if not s.is_qc) > 1
    try:
        if several:
            with session.begin_nested():
                applied = _apply_results(session, rt, row, message, now)
        else:
            applied = _apply_results(session, rt, row, message, now)
    except _Hold as hold:
        row.status = MessageStatus.HELD
        row.applied_at = None
        row.hold_reason = hold.reason
        row.hold_detail = hold.detail[:2000]
        result.status, result.outcome = row.status, "held"
        result.hold_reason, result.hold_detail = hold.reason, hold.detail
        log.warning("message.held", interface=rt.name, message_id=row.id, reason=hold.reason,
                    control_id=message.control_id)
        _alert_held(session, rt, row, hold)
        return result
    row.status = MessageStatus.APPLIED
    row.hold_reason = ""
    row.hold_detail = ""
    row.applied_at = now
    result.status = row.status
    log.info("message.applied", interface=rt.name, message_id=row.id, result_count=applied,
             control_id=message.control_id)
    return result


def store_internal_error(
    session: Session, rt: InterfaceRuntime, raw: bytes, peer: str, error: str
) -> IngestResult:
    """Store a message that labrelay failed to process, HELD with INTERNAL_ERROR."""
    row = RawMessage(
        interface=rt.name, direction="in", protocol=rt.config.protocol, peer=peer[:100],
        payload=raw, sha256=hashlib.sha256(raw).hexdigest(), size=len(raw),
        status=MessageStatus.HELD, hold_reason=INTERNAL_ERROR,
        hold_detail=(f"labrelay could not process this message ({error}); the bytes are "
                     "kept. Report it with `labrelay messages show ID`; after a fix, "
                     "`labrelay messages reprocess ID`")[:2000],
        attempts=1,
    )
    # The specimens it names, as far as they can be read: later messages for them wait
    # behind this one (DESIGN rule 4) instead of overtaking it.
    with contextlib.suppress(Exception):
        for specimen_id in dict.fromkeys(rt.driver.decode(raw).specimen_ids):
            if specimen_id:
                row.specimens.append(MessageSpecimen(specimen_id=specimen_id[:64]))
    session.add(row)
    session.flush()
    hold = _Hold(INTERNAL_ERROR, row.hold_detail)
    _alert_held(session, rt, row, hold)
    result = IngestResult(row.id, row.status, "held", INTERNAL_ERROR, row.hold_detail)
    if rt.config.protocol == "hl7":
        _record_hl7_ack_code(session, rt, raw, result)
    return result


def hold_internal_error(
    session: Session, rt: InterfaceRuntime, message_id: int, error: str
) -> None:
    """A stored message whose later apply failed inside labrelay: HELD, with an alert."""
    row = session.get(RawMessage, message_id)
    if row is None or row.status != MessageStatus.RECEIVED:
        return
    row.status = MessageStatus.HELD
    row.hold_reason = INTERNAL_ERROR
    row.hold_detail = (f"labrelay could not apply this message ({error}); the bytes are "
                       "kept. After a fix, `labrelay messages reprocess ID`")[:2000]
    _alert_held(session, rt, row, _Hold(INTERNAL_ERROR, row.hold_detail))


def _alert_held(session: Session, rt: InterfaceRuntime, row: RawMessage, hold: _Hold) -> None:
    """A held message raises an engine alert in the same transaction (outbox): a misprinted
    barcode or a missing mapping must reach a person, not wait in a table."""
    from lis_bridge.outbox import enqueue

    specimens = ", ".join(s.specimen_id for s in row.specimens)[:200]
    enqueue(session, "notify", f"notify:held:{row.id}:{row.attempts}", {
        "kind": "engine_alert",
        "severity": "warning",
        "message": f"message #{row.id} on {rt.name} is held: {hold.reason}",
        "detail": hold.detail[:500],
        "interface": rt.name,
        "specimen_id": specimens,
    })


_EARLIER_HELD = (
    select(_RAW.id)
    .join(MessageSpecimen, MessageSpecimen.message_fk == _RAW.id)
    .where(
        MessageSpecimen.specimen_id == bindparam("specimen_id"),
        # HELD, or stored and not yet applied (after_commit policy): later results for the
        # same specimen never overtake them.
        _RAW.status.in_((MessageStatus.HELD, MessageStatus.RECEIVED)),
        _RAW.direction == "in",
        _RAW.id < bindparam("message_id"),
    )
    .order_by(_RAW.id)
    .limit(1)
)


def _apply_results(
    session: Session, rt: InterfaceRuntime, row: RawMessage, message: AnalyzerMessage,
    now: datetime,
) -> int:
    from lis_bridge.results import apply_results

    if rt.mapping is None:
        raise _Hold(NO_MAPPING, f"interface {rt.name} has no mapping file; add `mapping:` to "
                    "its configuration, then run `labrelay messages reprocess`")
    applied = 0
    specimens = [s for s in message.specimens if not s.is_qc]
    if not specimens:
        raise _Hold("NO_SPECIMEN", "the message names no specimen id; check the analyzer's "
                    "barcode reader and the driver's specimen id fields")
    for specimen in specimens:
        if not specimen.specimen_id:
            raise _Hold("NO_SPECIMEN", "a result group has no specimen id; check the barcode "
                        "and the driver's specimen id fields")
        blocker = session.scalar(
            # stored cut to the column's 64 characters, so looked up the same way
            _EARLIER_HELD, {"specimen_id": specimen.specimen_id[:64], "message_id": row.id}
        )
        if blocker is not None:
            raise _Hold(BEHIND_HELD, f"specimen {specimen.specimen_id} has an earlier held "
                        f"message #{blocker}; it is applied after that one is resolved "
                        "(`labrelay messages reprocess`)")
        sex, age = "U", None
        if _ranges_by_patient(rt.mapping):
            sex, age = _patient_hints(session, specimen.specimen_id, now)
        mapped = rt.mapping.map_specimen(specimen, sex=sex, age_years=age)
        if mapped.unmapped:
            codes = ", ".join(dict.fromkeys(u.code for u in mapped.unmapped))
            reasons = "; ".join(f"{u.code}: {u.reason}" for u in mapped.unmapped[:5])
            raise _Hold(UNMAPPED_CODE, f"unmapped analyzer codes: {codes}; {reasons}; add them to "
                        f"{_mapping_name(rt)} (`labrelay mapping set`), then `labrelay messages "
                        "reprocess`")
        if not mapped.results:
            continue
        outcome = apply_results(
            session,
            specimen.specimen_id,
            mapped.results,
            interface=rt.name,
            message_id=row.id,
            auto_receive=rt.config.auto_receive,
            accept_unordered=rt.config.accept_unordered,
            now=now,
        )
        if outcome.held:
            raise _Hold(outcome.reason, outcome.detail)
        applied += outcome.applied
    return applied


def _mapping_name(rt: InterfaceRuntime) -> str:
    path = rt.config.mapping
    return str(path) if path else "the interface's mapping"


_RANGES_BY_PATIENT: dict[int, tuple[Any, bool]] = {}


def _ranges_by_patient(mapping: Any) -> bool:
    """Whether any reference range or critical limit in ``mapping`` depends on sex or age.

    Only then does mapping need the patient's sex and age: most mappings give one range per
    test (or take the analyzer's), and the query is skipped. Remembered per mapping object.
    """
    known = _RANGES_BY_PATIENT.get(id(mapping))
    if known is not None and known[0] is mapping:
        return known[1]
    answer = any(test.by_patient for test in mapping.tests)
    if len(_RANGES_BY_PATIENT) > 64:  # mappings reloaded many times: forget the old ones
        _RANGES_BY_PATIENT.clear()
    _RANGES_BY_PATIENT[id(mapping)] = (mapping, answer)
    return answer


_PATIENT_HINTS = (
    select(Patient.sex, Patient.birth_date)
    .join(Sample, Sample.patient_fk == Patient.id)
    .where(Sample.specimen_id == bindparam("specimen_id"))
)


def _patient_hints(session: Session, specimen_id: str, now: datetime) -> tuple[str, float | None]:
    found = session.execute(_PATIENT_HINTS, {"specimen_id": specimen_id}).first()
    if found is None:
        return "U", None
    sex, birth = found
    return sex or "U", age_years(birth, now)


def age_years(birth: Any, now: datetime) -> float | None:
    """The patient's age in years on ``now``'s date, for age-dependent reference ranges."""
    return (now.date() - birth).days / 365.25 if birth else None


def answer_query(session: Session, rt: InterfaceRuntime, message: AnalyzerMessage) -> list[bytes]:
    """Worklists for a host query (ASTM Q records), in analyzer vocabulary (PROTOCOLS 71-73)."""
    if rt.config.protocol != "astm":
        return []
    from drivers.astm.generic import OrderRequest, build_query_answer
    from lis_bridge.queries import ordered_test_codes

    orders: list[OrderRequest] = []
    component = int(rt.config.driver_options.get("order_test_code_component", 4))
    for query in message.queries:
        for specimen_id in query.specimen_ids:
            codes = ordered_test_codes(session, specimen_id)
            analyzer_codes = (
                rt.mapping.analyzer_codes_for(codes) if codes and rt.mapping is not None else []
            )
            # The id is logged only when it names a sample the LIS knows: some analyzers
            # put the patient id where others put the specimen id (LIS2 Q-3).
            log.info("astm.query.answered", interface=rt.name,
                     sample_id=specimen_id if codes else "(not a known sample)",
                     tests=len(analyzer_codes))
            if analyzer_codes:
                orders.append(OrderRequest(specimen_id=specimen_id,
                                           test_codes=tuple(analyzer_codes),
                                           test_code_component=component))
    # One answer per query message; `L|1|I` when there is nothing to do (PROTOCOLS 73).
    stamp = _utcnow().strftime("%Y%m%d%H%M%S")
    return [build_query_answer(orders, analyzer_id=message.sender, timestamp=stamp,
                               encoding=rt.config.encoding or "latin-1")]


def build_order_download(
    session: Session, rt: InterfaceRuntime, specimen_ids: list[str]
) -> tuple[bytes | None, dict[str, Any]]:
    """The H P O... L message that downloads these samples' pending tests, stored as an
    outbound message; and a summary saying which samples had nothing to send and why."""
    from drivers.astm.generic import OrderRequest, build_order_records
    from lis_bridge.queries import ordered_test_codes

    orders: list[OrderRequest] = []
    skipped: dict[str, str] = {}
    for specimen_id in dict.fromkeys(specimen_ids):
        codes = ordered_test_codes(session, specimen_id)
        if codes is None:
            skipped[specimen_id] = "not in the LIS"
            continue
        analyzer_codes = rt.mapping.analyzer_codes_for(codes) if rt.mapping is not None else []
        if not analyzer_codes:
            skipped[specimen_id] = "no pending test this analyzer performs"
            continue
        orders.append(OrderRequest(specimen_id=specimen_id, test_codes=tuple(analyzer_codes)))
    summary: dict[str, Any] = {"queued": [o.specimen_id for o in orders], "skipped": skipped}
    if not orders:
        return None, summary
    stamp = _utcnow().strftime("%Y%m%d%H%M%S")
    text = build_order_records(orders, timestamp=stamp,
                               encoding=rt.config.encoding or "latin-1")
    row = RawMessage(interface=rt.name, direction="out", protocol="astm", peer="",
                     message_type="ORDERS", payload=text,
                     sha256=hashlib.sha256(text).hexdigest(), size=len(text),
                     status=MessageStatus.QUEUED)
    session.add(row)
    session.flush()
    summary["message_id"] = row.id
    log.info("astm.orders.queued", interface=rt.name, samples=len(orders), message_id=row.id)
    return text, summary


def reprocess(
    session: Session, rt: InterfaceRuntime, message_id: int, *, now: datetime | None = None
) -> IngestResult:
    """Apply a HELD (or RECEIVED) message again, e.g. after the mapping or the LIS was fixed.

    The message's row is locked first (PostgreSQL): of two writers reprocessing the same
    message at once, the second waits, then finds it APPLIED and refuses, so a message is
    never applied twice."""
    row = session.get(RawMessage, message_id, with_for_update=True, populate_existing=True)
    if row is None:
        raise LabrelayError(f"message #{message_id} does not exist")
    if row.status not in (MessageStatus.HELD, MessageStatus.RECEIVED):
        raise LabrelayError(f"message #{message_id} is {row.status}, only HELD or RECEIVED "
                            "messages can be reprocessed")
    message = rt.driver.decode(row.payload)
    return apply_stored(session, rt, row, message, now=now)


def _apply_if_received(session: Session, rt: InterfaceRuntime,
                       message_id: int) -> IngestResult | None:
    status = session.execute(select(RawMessage.status).where(
        RawMessage.id == message_id).with_for_update()).scalar()
    if status != MessageStatus.RECEIVED:
        return None
    return reprocess(session, rt, message_id)


def apply_later(writer: Any, rt: InterfaceRuntime, message_id: int) -> Deferred[Any]:
    """Have ``writer`` (an :class:`engine.writer.DatabaseWriter`) apply a message stored
    with the after_commit policy, once it has been answered. If the database fails, the
    message stays RECEIVED and is applied at the next start (``engine.resumed``); a fault in
    labrelay holds it with INTERNAL_ERROR and an alert. A message no longer RECEIVED when
    its turn comes (queued twice: after its answer and by a resume) is left as it is.
    Fires when that is done."""
    d = writer.submit(lambda s: _apply_if_received(s, rt, message_id))

    def failed(failure: Failure) -> Deferred[Any] | None:
        kind = getattr(failure.type, "__name__", "Exception")
        log.error("message.apply.failed", interface=rt.name, message_id=message_id,
                  error_type=kind)
        if failure.check(StorageError):
            return None  # stays RECEIVED: applied at the next start (engine.resumed)
        error = f"{kind}: {failure.getErrorMessage()}"[:300]
        held = writer.submit(lambda s: hold_internal_error(s, rt, message_id, error))
        held.addErrback(lambda f: log.error(
            "message.hold.failed", interface=rt.name, message_id=message_id,
            error_type=getattr(f.type, "__name__", "Exception"),
            action="it stays RECEIVED and is applied at the next start"))
        return held

    d.addErrback(failed)
    return d


UNAPPLIED_BATCH = 10_000


def unapplied_messages(session: Session) -> list[tuple[int, str]]:
    """(id, interface) of inbound messages stored but not applied (after_commit policy;
    the process that would have applied them stopped first), oldest first, at most
    ``UNAPPLIED_BATCH`` of them."""
    return list(session.execute(
        select(RawMessage.id, RawMessage.interface)
        .where(RawMessage.status == MessageStatus.RECEIVED, RawMessage.direction == "in")
        .order_by(RawMessage.id).limit(UNAPPLIED_BATCH)
    ).tuples())


# ------------------------------------------------------------------ handlers (reactor thread)


@dataclass
class PipelineStats:
    received: int = 0
    applied: int = 0
    held: int = 0
    rejected: int = 0
    duplicates: int = 0
    storage_failures: int = 0
    last_latency_ms: float = 0.0


class Pipeline:
    """Joins the adapters to the writer; one per engine."""

    def __init__(
        self,
        writer: DatabaseWriter,
        interfaces: dict[str, InterfaceRuntime],
        *,
        node_name: str = "labrelay",
        clock: Callable[[], datetime] = _utcnow,
        ingest: Any = None,
    ) -> None:
        self.writer = writer
        # engine.ingest_process.IngestProcess: inbound messages go there when set
        self.ingest = ingest
        self.interfaces = interfaces
        self.node_name = node_name
        self.clock = clock
        self.stats: dict[str, PipelineStats] = {name: PipelineStats() for name in interfaces}

    def submit(self, interface: str, raw: bytes, peer: str) -> Deferred[IngestResult]:
        from engine.ingest_bulk import ingest_bulk, ingest_one, prepare_item

        rt = self.interfaces[interface]
        apply_now = rt.config.ack_policy == "after_apply"
        started = time.perf_counter()
        stats = self.stats[interface]
        stats.received += 1
        d: Deferred[IngestResult]
        if self.ingest is not None:
            # stored, decoded, mapped and applied by the ingest process (same code)
            d = self.ingest.submit(interface, raw, peer, apply_now)
        else:
            item = prepare_item(rt, raw, peer, apply_now)
            # Alone, or (bulk) together with the messages queued beside it: same outcome.
            d = self.writer.submit(lambda session: ingest_one(session, item),
                                   bulk=ingest_bulk, item=item)

        def done(result: IngestResult) -> IngestResult:
            stats.last_latency_ms = (time.perf_counter() - started) * 1000
            for event, fields in result.logs:
                log.info(event, **fields)
            if result.outcome == "held":
                stats.held += 1
            elif result.outcome == "rejected":
                stats.rejected += 1
            elif result.outcome == "duplicate":
                stats.duplicates += 1
            elif result.status == MessageStatus.APPLIED:
                stats.applied += 1
            if not apply_now and result.status == MessageStatus.RECEIVED:
                self.apply_later(rt, result.message_id)
            return result

        def failed(failure: Failure) -> Failure | Deferred[IngestResult]:
            if failure.check(StorageError):
                stats.storage_failures += 1
                log.error("message.not_stored", interface=interface, peer=peer,
                          error=failure.getErrorMessage()[:300])
                return failure
            # A fault in labrelay itself while decoding or applying (the unit was rolled
            # back): keep the bytes, hold them, raise an alert, answer AE; never loop on it.
            kind = getattr(failure.type, "__name__", "Exception")
            error = f"{kind}: {failure.getErrorMessage()}"[:300]
            log.error("message.internal_error", interface=interface, peer=peer, error_type=kind)
            kept = self.writer.submit(lambda s: store_internal_error(s, rt, raw, peer, error))
            kept.addCallback(done)
            return kept

        d.addCallbacks(done, failed)
        return d

    def apply_later(self, rt: InterfaceRuntime, message_id: int) -> None:
        apply_later(self.writer, rt, message_id)

    def ack_control_id(self, message_id: int | None) -> str:
        suffix = str(message_id) if message_id is not None else str(int(time.time() * 1000))
        return f"LR{suffix}"


class HL7Handler:
    """MLLP adapter callback: store, apply per policy, answer with the HL7 ACK."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def message_received(self, raw: bytes, peer: str, interface: str) -> Deferred[Any]:
        d: Deferred[Any] = self.pipeline.submit(interface, raw, peer)
        d.addCallbacks(
            lambda result: self._ack(raw, interface, result),
            lambda failure: self._storage_failed(raw, interface, failure),
        )
        return d

    def _ack(self, raw: bytes, interface: str, result: IngestResult) -> bytes | list[bytes] | None:
        from drivers.hl7.ack import AckError, ack_plan, build_ack, build_reject_ack, is_ack
        from drivers.hl7.parser import HL7ParseError, parse_message

        if (result.outcome == "ack" or result.kind == MessageKind.ACK
                or (result.outcome == "rejected" and is_ack(raw))):
            # PROTOCOLS 89: never acknowledge an ACK, nor its resend (a duplicate), nor
            # one that could not be decoded
            return None
        now = self.pipeline.clock()
        control_id = self.pipeline.ack_control_id(result.message_id)
        rt = self.pipeline.interfaces[interface]
        try:
            # An accepted message was decoded whole already (in the ingest process): its
            # MSH is all the ACK needs, read in ~10 µs instead of the whole message's ~50.
            # Any other outcome reads it all, so that a block the driver refused (two
            # messages in one, say) gets the lenient reject ACK as before.
            parsed = parse_message(raw, encoding=rt.config.encoding,
                                   header_only=result.outcome == "accepted")
        except HL7ParseError:
            return build_reject_ack(
                raw, control_id, now,
                text=f"message could not be read ({result.hold_detail[:150]}); kept as "
                     f"message #{result.message_id}",
            )
        msh15, msh16 = parsed.msh.field(15), parsed.msh.field(16)
        errors: list[AckError] = []
        text = ""
        outcome = ack_outcome(result, rt.config.held_ack)
        if result.outcome == "duplicate":
            text = "duplicate of an earlier message; not applied again"
        elif result.outcome == "held":
            text = f"stored as message #{result.message_id} and held: {result.hold_reason}"
            errors.append(AckError(code=_err_code(result.hold_reason), severity="E",
                                   message=f"{result.hold_reason}: {result.hold_detail[:400]}"))
        elif result.outcome == "rejected":
            text = f"message could not be decoded; kept as message #{result.message_id}"
            errors.append(AckError(code=207, message=result.hold_detail[:400]))
        elif result.outcome == "unsupported":
            # HL7 table 0357: 200 unsupported message type
            text = (f"work-order queries are not answered by this LIS interface; kept as "
                    f"message #{result.message_id}")
            errors.append(AckError(code=200, message="labrelay does not answer HL7 work-order "
                                   "queries: program the tests on the analyzer"))
        codes = ack_plan(msh15, msh16, outcome)
        if not codes:
            return None
        # Enhanced mode may ask for an accept ACK and an application ACK: both go, in order.
        acks = [
            build_ack(parsed, code, f"{control_id}{suffix}", now, text=text, errors=errors)
            for code, suffix in zip(codes, ("", "A"), strict=False)
        ]
        return acks[0] if len(acks) == 1 else acks

    def _storage_failed(self, raw: bytes, interface: str, failure: Failure) -> bytes | None:
        from drivers.hl7.ack import (
            AckError,
            Outcome,
            ack_plan,
            build_ack,
            build_reject_ack,
            is_ack,
        )
        from drivers.hl7.parser import HL7ParseError, parse_message

        failure.trap(StorageError, LabrelayError)
        if is_ack(raw):
            return None  # PROTOCOLS 89: an ACK is not answered, stored or not
        now = self.pipeline.clock()
        control_id = self.pipeline.ack_control_id(None)
        text = "not stored: the LIS database is unavailable; resend this message later"
        rt = self.pipeline.interfaces[interface]
        try:
            parsed = parse_message(raw, encoding=rt.config.encoding)
        except HL7ParseError:
            return build_reject_ack(raw, control_id, now, text=text)
        codes = ack_plan(parsed.msh.field(15), parsed.msh.field(16), Outcome.REJECTED)
        if not codes:
            return None
        return build_ack(parsed, codes[0], control_id, now, text=text,
                         errors=[AckError(code=207, message=text)])


def ack_outcome(result: IngestResult, held_ack: str) -> Any:
    """What the HL7 ACK reports for ``result`` (a drivers.hl7.ack.Outcome)."""
    from drivers.hl7.ack import Outcome

    if result.outcome == "duplicate":
        # What became of the original, not its ACK code: in enhanced mode that may be a
        # commit ACK (CA) or nothing, and a resend of a held message must not get AA
        # (PROTOCOLS 88).
        if result.original_status == MessageStatus.HELD:
            return Outcome.ACCEPTED if held_ack == "AA" else Outcome.APPLICATION_ERROR
        if result.original_status == MessageStatus.REJECTED:
            return Outcome.REJECTED
        # An original stored and answered AR was refused as unsupported (an HL7
        # work-order query): its resend is refused alike.
        return {"AE": Outcome.APPLICATION_ERROR, "AR": Outcome.APPLICATION_REJECTED}.get(
            result.original_ack_code, Outcome.ACCEPTED)
    if result.outcome == "held":
        return Outcome.ACCEPTED if held_ack == "AA" else Outcome.APPLICATION_ERROR
    if result.outcome == "rejected":
        return Outcome.REJECTED
    if result.outcome == "unsupported":
        return Outcome.APPLICATION_REJECTED
    return Outcome.ACCEPTED


def _record_hl7_ack_code(session: Session, rt: InterfaceRuntime, raw: bytes,
                         result: IngestResult) -> None:
    """Store the code the ACK will carry, in the unit that stored the message: a duplicate
    is answered with it later, and no second commit is spent per message."""
    if result.outcome in ("duplicate", "ack"):
        return
    code = hl7_ack_code(rt, raw, result)
    row = session.get(RawMessage, result.message_id)  # in the identity map: no query
    if row is not None:
        row.ack_code = code


def hl7_ack_code(rt: InterfaceRuntime, raw: bytes, result: IngestResult) -> str:
    """The code the last ACK for ``result`` will carry ("" when none is sent)."""
    from drivers.hl7.ack import ack_plan
    from drivers.hl7.parser import HL7ParseError, parse_message

    try:
        msh = parse_message(raw, encoding=rt.config.encoding, header_only=True).msh
    except HL7ParseError:
        return "AR"
    codes = ack_plan(msh.field(15), msh.field(16), ack_outcome(result, rt.config.held_ack))
    return codes[-1] if codes else ""


def _err_code(reason: str) -> int:
    # HL7 table 0357: 204 unknown key identifier (unknown specimen), 207 application error.
    return 204 if reason == "UNKNOWN_SPECIMEN" else 207


class ASTMHandler:
    """ASTM adapter callback: the completing frame is ACKed once this Deferred fires."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def message_received(self, text: bytes, peer: str, interface: str) -> Deferred[list[bytes]]:
        d: Deferred[Any] = self.pipeline.submit(interface, text, peer)

        def replies(result: IngestResult) -> list[bytes]:
            if result.outgoing:
                self._store_outgoing(interface, peer, result.outgoing)
            return result.outgoing

        d.addCallback(replies)
        return d

    def _store_outgoing(self, interface: str, peer: str, messages: list[bytes]) -> None:
        def work(session: Session) -> None:
            for payload in messages:
                session.add(RawMessage(
                    interface=interface, direction="out", protocol="astm", peer=peer[:100],
                    payload=payload, sha256=hashlib.sha256(payload).hexdigest(),
                    size=len(payload), status=MessageStatus.SENT,
                ))

        self.pipeline.writer.submit(work).addErrback(
            lambda f: log.error("astm.outgoing.not_stored", interface=interface,
                                error=f.getErrorMessage()[:200]))


def load_runtime(config: InterfaceConfig) -> InterfaceRuntime:
    """Driver and mapping for one interface (raises ConfigError / MappingError)."""
    from drivers.registry import create_driver

    options = dict(config.driver_options)
    if config.encoding and "encoding" not in options:
        options["encoding"] = config.encoding
    driver = create_driver(config.driver, config.protocol, options)
    mapping, digest = None, ""
    if config.mapping is not None:
        from engine.mapping import load_mapping_file

        mapping, digest = load_mapping_file(Path(config.mapping))
    return InterfaceRuntime(config=config, driver=driver, mapping=mapping,
                            mapping_sha256=digest)


def reload_mappings(runtimes: dict[str, InterfaceRuntime],
                    configs: Sequence[InterfaceConfig] = ()) -> dict[str, dict[str, Any]]:
    """Read every interface's mapping file again (``labrelay mapping reload``, SIGHUP).

    Each interface whose file is valid gets a new :class:`InterfaceRuntime` in
    ``runtimes``: a message already taken keeps the mapping it started with, the next one
    gets the new one. An interface whose file is not valid keeps the mapping it had, and
    its entry says why. Transports, drivers and the rest of the configuration are not
    re-read (a restart does that). An enabled interface of ``configs`` with no runtime
    (it could not start, e.g. for a mapping file with a mistake) is loaded afresh and,
    if it loads, added with ``started: true`` for the caller to start. Returns, per
    interface: ``reloaded``, ``changed``, ``tests``, ``sha256`` and, when it was not
    reloaded, ``error``.
    """
    from dataclasses import replace

    from engine.mapping import load_mapping_file

    outcome: dict[str, dict[str, Any]] = {}
    for config in configs:
        if not config.enabled or config.name in runtimes:
            continue
        try:
            added = load_runtime(config)
        except LabrelayError as exc:
            log.error("mapping.reload.failed", interface=config.name, reason=str(exc)[:1000],
                      action="the interface stays down")
            outcome[config.name] = {"reloaded": False, "changed": False, "tests": 0,
                                    "sha256": "", "error": str(exc)[:2000]}
            continue
        runtimes[config.name] = added
        tests = len(added.mapping.tests) if added.mapping is not None else 0
        log.info("mapping.reloaded", interface=config.name, mapping=str(config.mapping),
                 tests=tests, sha256=added.mapping_sha256[:16], changed=True, started=True)
        outcome[config.name] = {"reloaded": True, "changed": True, "tests": tests,
                                "sha256": added.mapping_sha256, "started": True}
    for name, rt in list(runtimes.items()):
        if name in outcome:
            continue
        if rt.config.mapping is None:
            outcome[name] = {"reloaded": False, "changed": False, "tests": 0, "sha256": "",
                             "detail": "no mapping configured"}
            continue
        path = Path(rt.config.mapping)
        try:
            mapping, digest = load_mapping_file(path)
        except LabrelayError as exc:
            log.error("mapping.reload.failed", interface=name, mapping=str(path),
                      reason=str(exc)[:1000], action="still using the mapping loaded before")
            outcome[name] = {"reloaded": False, "changed": False,
                             "tests": len(rt.mapping.tests) if rt.mapping else 0,
                             "sha256": rt.mapping_sha256, "error": str(exc)[:2000]}
            continue
        changed = digest != rt.mapping_sha256
        runtimes[name] = replace(rt, mapping=mapping, mapping_sha256=digest)
        log.info("mapping.reloaded", interface=name, mapping=str(path), tests=len(mapping.tests),
                 sha256=digest[:16], changed=changed)
        outcome[name] = {"reloaded": True, "changed": changed, "tests": len(mapping.tests),
                         "sha256": digest}
    return outcome
