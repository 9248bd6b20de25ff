"""Store and apply a group commit's messages together: the pipeline's fast lane.

The writer (:mod:`engine.writer`) commits everything that queued while its last commit
ran. Run one message at a time, each costs about a dozen statements (duplicate check, raw
INSERT, specimen rows, held-message check, sample lock, result history, results, ordered
tests, sample moves, audit rows, render job, ACK code). :func:`ingest_bulk` runs the same
steps for all of them at once: one duplicate query, one held-message query, one read of
the samples, then one INSERT or UPDATE per table for the whole batch.

Only the plain case goes this way: a results message about one specimen, applied at
once, whose duplicate check finds nothing, whose specimen has no message waiting, every
code mapped, and whose sample takes the results without a hold or a special rule
(:func:`lis_bridge.results_bulk.plan`). Every other message, and any message the checks
are not sure about, goes through :func:`engine.pipeline.ingest` exactly as when it
arrives alone, in arrival order. So the durability rules hold unchanged: the outcome of
each message is what the one-at-a-time path would give, and it is committed before the
reply is built.

Order: messages are taken in arrival order. A stretch of fast-lane messages is cut
wherever a specimen, a content hash or an HL7 sender + control id repeats, so within
one stretch no two messages can affect each other; a message that must go the
one-at-a-time way ends the stretch before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, union_all
from sqlalchemy.orm import Session

from drivers.model import AnalyzerMessage, MessageKind, SpecimenResults
from engine.pipeline import (
    DUPLICATE_WINDOW,
    Decoded,
    IngestResult,
    InterfaceRuntime,
    _ranges_by_patient,
    _record_hl7_ack_code,
    _utcnow,
    age_years,
    decode_raw,
    hl7_ack_code,
    ingest,
)
from engine.writer import COMMIT_WITH_LAST_WRITE
from lis_bridge import bulk_pg, results_bulk
from lis_bridge.models import MessageSpecimen, MessageStatus, RawMessage
from lis_bridge.pg_connection import OneTripCursor

_RAW = cast(Table, RawMessage.__table__)
_SPECIMENS = cast(Table, MessageSpecimen.__table__)

# Anything stored earlier that this batch's messages may repeat (DESIGN rule 5); a match of
# any kind sends the message the one-at-a-time way, which decides what the match means.
# Index lookups joined by UNION ALL (ix_raw_messages_sha256, ix_raw_messages_dedupe): one
# query with OR made SQLite scan the whole table.
_COPY_COLUMNS = (_RAW.c.sha256, _RAW.c.interface, _RAW.c.sender, _RAW.c.control_id)
_INBOUND_SINCE = (
    _RAW.c.direction == "in",
    _RAW.c.status != MessageStatus.DUPLICATE,
    _RAW.c.received_at >= bindparam("since"),
)


def _copies(*criteria: Any) -> Any:
    return select(*_COPY_COLUMNS).where(*_INBOUND_SINCE, *criteria)


# Built once: constructing a statement per batch cost more than running it (0.45 ms).
_SAME_DIGESTS = _RAW.c.sha256.in_(bindparam("digests", expanding=True))
_SAME_CONTROL_IDS = (
    _RAW.c.interface == bindparam("interface"),
    _RAW.c.sender == bindparam("sender"),
    _RAW.c.control_id.in_(bindparam("control_ids", expanding=True)),
)
_COPIES_BY_DIGEST = _copies(_SAME_DIGESTS)
_COPIES_BY_DIGEST_OR_CONTROL_ID = union_all(_copies(_SAME_DIGESTS),
                                            _copies(*_SAME_CONTROL_IDS))
_COPIES_BY_CONTROL_ID = _copies(*_SAME_CONTROL_IDS)


def _earlier_copies(session: Session, digests: list[str],
                    senders: dict[tuple[str, str], list[str]], since: datetime) -> list[Any]:
    """Earlier inbound messages with one of these content hashes, or one of these control
    ids from this (interface, sender): index lookups whose cost does not grow with what an
    analyzer sent before (interface, sender and control id are all index conditions, on
    SQLite and PostgreSQL alike; checked with EXPLAIN). One query for the hashes and the
    first analyzer, one more per further analyzer in the batch."""
    conn = session.connection()
    groups = list(senders.items())
    if not groups:
        return list(conn.execute(_COPIES_BY_DIGEST, {"since": since, "digests": digests}))
    (interface, sender), control_ids = groups[0]
    rows = list(conn.execute(_COPIES_BY_DIGEST_OR_CONTROL_ID, {
        "since": since, "digests": digests, "interface": interface, "sender": sender,
        "control_ids": control_ids}))
    for (interface, sender), control_ids in groups[1:]:
        rows.extend(conn.execute(_COPIES_BY_CONTROL_ID, {
            "since": since, "interface": interface, "sender": sender,
            "control_ids": control_ids}))
    return rows


# Specimens with a message still HELD or not yet applied: later ones wait (DESIGN rule 4).
_WAITING_SPECIMENS = (
    select(_SPECIMENS.c.specimen_id)
    .join(_RAW, _RAW.c.id == _SPECIMENS.c.message_fk)
    .where(
        _SPECIMENS.c.specimen_id.in_(bindparam("specimen_ids", expanding=True)),
        _RAW.c.status.in_((MessageStatus.HELD, MessageStatus.RECEIVED)),
        _RAW.c.direction == "in",
    )
)
# Messages up to this size are decoded on the reactor as they arrive (a 25-result message
# is ~2 KB and takes ~0.2 ms); larger ones in the writer.
REACTOR_DECODE_LIMIT = 64 * 1024

_INSERT_RAW = insert(_RAW).returning(_RAW.c.id, _RAW.c.sha256)
_INSERT_SPECIMENS = insert(_SPECIMENS)


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One message as the pipeline hands it to the writer.

    ``decoded`` and ``mapped``: the driver's and the mapping's work, done on the reactor
    thread when the message arrived (:func:`prepare_item`), so the writer thread, which
    every message waits for, does not repeat it. Either may be None: then the writer
    does that work itself.
    """

    rt: InterfaceRuntime
    raw: bytes
    peer: str
    apply_now: bool
    decoded: Decoded | None = None
    mapped: Any = None  # engine.mapping.MappedSpecimen of the one patient specimen
    # results_bulk.result_own_rows(mapped.results): the PostgreSQL fast lane's COPY text
    copy_rows: tuple[str, ...] | None = None


def prepare_item(rt: InterfaceRuntime, raw: bytes, peer: str, apply_now: bool, *,
                 copy_rows: bool = False) -> BulkItem:
    """A :class:`BulkItem` with the message decoded and, where the mapping needs nothing
    from the database (no reference range by sex or age), mapped; with ``copy_rows``,
    its results also written as the PostgreSQL fast lane's COPY text. Never raises: a
    failure here is left for the writer, whose unit then stores the message and holds it
    with INTERNAL_ERROR as for any fault (Pipeline.submit). A message larger than
    ``REACTOR_DECODE_LIMIT`` is left whole for the writer: decoding it here would hold up
    every other analyzer's replies meanwhile."""
    if len(raw) > REACTOR_DECODE_LIMIT:
        return BulkItem(rt, raw, peer, apply_now)
    try:
        decoded = decode_raw(rt, raw)
    except Exception:  # noqa: BLE001 - decoded again in the writer's unit, which handles it
        return BulkItem(rt, raw, peer, apply_now)
    mapped = None
    message = decoded.message
    if (message is not None and message.kind == MessageKind.RESULTS and apply_now
            and rt.mapping is not None and not _ranges_by_patient(rt.mapping)):
        patients = [s for s in message.specimens if not s.is_qc]
        if len(patients) == 1:
            try:
                mapped = rt.mapping.map_specimen(patients[0])
            except Exception:  # noqa: BLE001 - mapped again in the writer
                mapped = None
    rows = None
    if copy_rows and mapped is not None and not mapped.unmapped:
        try:
            rows = results_bulk.result_own_rows(mapped.results)
        except Exception:  # noqa: BLE001 - written by the writer, which handles it
            rows = None
    return BulkItem(rt, raw, peer, apply_now, decoded, mapped, rows)


@dataclass(slots=True)
class _Prepared:
    index: int
    item: BulkItem
    decoded: Decoded
    digest: str
    specimen: SpecimenResults | None = None  # set when the message may take the fast lane
    keys: frozenset[Hashable] = frozenset()
    plan: results_bulk.BulkPlan | None = None

    @property
    def message(self) -> AnalyzerMessage:
        assert self.decoded.message is not None
        return self.decoded.message


def ingest_one(session: Session, item: BulkItem, *, now: datetime | None = None,
               decoded: Decoded | None = None) -> IngestResult:
    """One message, one at a time: store, apply per policy, record its HL7 ACK code."""
    result = ingest(session, item.rt, item.raw, item.peer, apply_now=item.apply_now, now=now,
                    decoded=decoded or item.decoded)
    if item.rt.config.protocol == "hl7":
        _record_hl7_ack_code(session, item.rt, item.raw, result)
    return result


def ingest_bulk(session: Session, items: list[BulkItem]) -> list[IngestResult]:
    """:func:`ingest_one` for each item, in order, with the plain ones written together."""
    now = _utcnow()
    results: list[IngestResult | None] = [None] * len(items)
    stretch: list[_Prepared] = []
    taken: set[Hashable] = set()
    for index, item in enumerate(items):
        p = _prepare(index, item)
        if p.specimen is None:
            _run_stretch(session, stretch, results, now)
            stretch, taken = [], set()
            results[index] = ingest_one(session, item, now=now, decoded=p.decoded)
            continue
        if taken & p.keys:
            _run_stretch(session, stretch, results, now)
            stretch, taken = [], set()
        stretch.append(p)
        taken |= p.keys
    # The last write of the batch may carry its COMMIT (PostgreSQL: one round trip less),
    # when nothing waits to be flushed after it.
    _run_stretch(session, stretch, results, now,
                 commit=bool(session.info.get(COMMIT_WITH_LAST_WRITE))
                 and not (session.new or session.dirty or session.deleted))
    done: list[IngestResult] = []
    for result in results:
        assert result is not None
        done.append(result)
    return done


def _prepare(index: int, item: BulkItem) -> _Prepared:
    decoded = item.decoded or decode_raw(item.rt, item.raw)
    p = _Prepared(index, item, decoded, hashlib.sha256(item.raw).hexdigest())
    message = decoded.message
    if (message is None or message.kind != MessageKind.RESULTS or not item.apply_now
            or item.rt.mapping is None or message.queries):
        return p
    patients = [s for s in message.specimens if not s.is_qc]
    if len(patients) != 1 or not patients[0].specimen_id:
        return p
    keys: set[Hashable] = {("sha", p.digest)}
    keys.update(("specimen", s[:64]) for s in message.specimen_ids if s)
    if item.rt.config.protocol == "hl7" and message.control_id:
        keys.add(("control", item.rt.name, message.sender[:200], message.control_id[:100]))
    p.specimen = patients[0]
    p.keys = frozenset(keys)
    return p


def _run_stretch(session: Session, stretch: list[_Prepared],
                 results: list[IngestResult | None], now: datetime, *,
                 commit: bool = False) -> None:
    """Write ``stretch``. ``commit``: nothing is written after it in this transaction, so
    the PostgreSQL fast lane may commit with its write."""
    if not stretch:
        return
    conn = session.connection()
    if conn.dialect.driver == "psycopg2":
        pg_fast = _run_stretch_pg(conn, session, stretch, results, now, commit=commit)
        if pg_fast is None:
            return
        fast = pg_fast
    else:
        fast = _without_earlier_copies(stretch, _earlier_copies(
            session, [p.digest for p in stretch], _senders(stretch), now - DUPLICATE_WINDOW))
        fast = _without_waiting_specimens(session, fast)
        fast = _planned(session, fast, now, results_bulk.load_samples(
            session, [cast(SpecimenResults, p.specimen).specimen_id for p in fast]))
    fast_ids = {id(p) for p in fast}
    # In arrival order: the fast ones together, each other one alone where it arrived. The
    # checks above stay true meanwhile: no two messages of a stretch share a specimen, a
    # content hash or a control id, so writing one cannot change what another was told.
    segment: list[_Prepared] = []
    for p in stretch:
        if id(p) in fast_ids:
            segment.append(p)
            continue
        if segment:
            _write(session, segment, now, results)
            segment = []
        results[p.index] = ingest_one(session, p.item, now=now, decoded=p.decoded)
    if segment:
        _write(session, segment, now, results)


def _run_stretch_pg(conn: Any, session: Session, stretch: list[_Prepared],
                    results: list[IngestResult | None], now: datetime, *,
                    commit: bool = False) -> list[_Prepared] | None:
    """The stretch on PostgreSQL: every check in one round trip (:mod:`lis_bridge.bulk_pg`)
    and, when every message takes the fast lane (the usual case), every write, the COPY of
    the results and (``commit``, on the writer's one-trip connection) the COMMIT in one
    more; then None. Otherwise nothing is written and the
    messages that may take the fast lane are returned, for the caller to write the
    stretch in arrival order."""
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        facts = bulk_pg.read_stretch(
            cursor, conn.connection.info, digests=[p.digest for p in stretch],
            senders=_senders(stretch), since=now - DUPLICATE_WINDOW,
            waiting=_specimen_keys(stretch),
            samples=[cast(SpecimenResults, p.specimen).specimen_id for p in stretch],
            new_ids=len(stretch))
        fast = _not_waiting(_without_earlier_copies(stretch, facts.copies), facts.waiting)
        fast = _planned(session, fast, now, facts.samples)
        if len(fast) < len(stretch):
            # The ids drawn stay unused (a sequence may have gaps), so that the raw
            # messages' ids keep their arrival order: each one-at-a-time message between
            # the fast ones takes its id as it is written.
            return fast
        ids = facts.new_ids[:len(fast)]
        raw_rows = _rows(fast, now, results, ids)
        specimen_rows, by_interface = _link(
            fast, results, {p.digest: ident for p, ident in zip(fast, ids, strict=True)})
        writes = results_bulk.plan_writes_many(by_interface, now=now)
        bulk_pg.write_stretch(cursor, raw_rows, specimen_rows, writes,
                              commit=commit and isinstance(cursor, OneTripCursor))
    finally:
        cursor.close()
    _log_lines(fast, results, writes.moved)
    return None


def _senders(stretch: list[_Prepared]) -> dict[tuple[str, str], list[str]]:
    """HL7 control ids of the stretch, by (interface, sender)."""
    senders: dict[tuple[str, str], list[str]] = {}
    for p in stretch:
        if p.item.rt.config.protocol == "hl7" and p.message.control_id:
            senders.setdefault((p.item.rt.name, p.message.sender[:200]), []).append(
                p.message.control_id[:100])
    return senders


def _without_earlier_copies(stretch: list[_Prepared], copies: Any) -> list[_Prepared]:
    """``stretch`` without the messages that repeat one of ``copies``: rows (sha256,
    interface, sender, control id) of earlier inbound messages."""
    digests: set[str] = set()
    known: set[tuple[str, str, str]] = set()
    for digest, interface, sender, control_id in copies:
        digests.add(digest)
        known.add((interface, sender, control_id))
    if not digests:
        return stretch
    return [
        p for p in stretch
        if p.digest not in digests and (p.item.rt.name, p.message.sender[:200],
                                        p.message.control_id[:100]) not in known
    ]


def _without_waiting_specimens(session: Session, stretch: list[_Prepared]) -> list[_Prepared]:
    if not stretch:
        return stretch
    waiting = set(session.connection().execute(
        _WAITING_SPECIMENS, {"specimen_ids": _specimen_keys(stretch)}).scalars())
    return _not_waiting(stretch, waiting)


def _specimen_keys(stretch: list[_Prepared]) -> list[str]:
    """The specimen ids the stretch's messages name, as message_specimens stores them."""
    return [s[:64] for p in stretch for s in p.message.specimen_ids if s]


def _not_waiting(stretch: list[_Prepared], waiting: set[str]) -> list[_Prepared]:
    """``stretch`` without the messages naming a specimen that has a message waiting."""
    if not waiting:
        return stretch
    return [p for p in stretch if not any(s[:64] in waiting for s in p.message.specimen_ids)]


def _planned(session: Session, stretch: list[_Prepared], now: datetime,
             facts: dict[str, results_bulk.SampleFacts]) -> list[_Prepared]:
    """The messages of ``stretch`` whose results :func:`results_bulk.plan` writes plainly
    (``facts``: the samples, by specimen id), each with its ``plan`` set."""
    fast: list[_Prepared] = []
    for p in stretch:
        specimen = cast(SpecimenResults, p.specimen)
        known = facts.get(specimen.specimen_id)
        if known is None:
            continue  # an unknown specimen: held, the one-at-a-time way
        mapping = p.item.rt.mapping
        assert mapping is not None  # _prepare sends a message without a mapping elsewhere
        mapped = p.item.mapped
        if mapped is None or mapped.specimen_id != specimen.specimen_id:
            sex, age = "U", None
            if _ranges_by_patient(mapping):
                sex, age = known.sex, age_years(known.birth_date, now)
            mapped = mapping.map_specimen(specimen, sex=sex, age_years=age)
        if mapped.unmapped or not mapped.results:
            continue
        p.plan = results_bulk.plan(known, mapped.results)
        if p.plan is not None:
            if mapped is p.item.mapped:
                p.plan.copy_rows = p.item.copy_rows
            fast.append(p)
    return fast


def _rows(fast: list[_Prepared], now: datetime, results: list[IngestResult | None],
          ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The raw message rows of ``fast`` (with ``ids``, in order, when given); the outcome
    of each message goes into ``results``."""
    rows = []
    for n, p in enumerate(fast):
        message, rt = p.message, p.item.rt
        outcome = IngestResult(0, MessageStatus.APPLIED, "accepted", kind=message.kind,
                               control_id=message.control_id,
                               specimen_ids=message.specimen_ids)
        results[p.index] = outcome
        ack_code = hl7_ack_code(rt, p.item.raw, outcome) if rt.config.protocol == "hl7" else ""
        row = {
            "interface": rt.name, "direction": "in", "protocol": rt.config.protocol,
            "peer": p.item.peer[:100], "sender": message.sender[:200],
            "control_id": message.control_id[:100], "message_type": message.message_type[:40],
            "payload": p.item.raw, "sha256": p.digest, "size": len(p.item.raw),
            "received_at": now, "status": MessageStatus.APPLIED, "hold_reason": "",
            "hold_detail": "", "duplicate_of_fk": None, "ack_code": ack_code,
            "applied_at": now, "attempts": 1,
        }
        rows.append({"id": ids[n], **row} if ids is not None else row)
    return rows


def _link(fast: list[_Prepared], results: list[IngestResult | None], ids: dict[str, int],
          ) -> tuple[list[dict[str, Any]], dict[str, list[results_bulk.BulkPlan]]]:
    """Each message's raw id (``ids`` by content hash) into its outcome and plan; its
    specimen rows, and the plans by interface."""
    specimen_rows: list[dict[str, Any]] = []
    by_interface: dict[str, list[results_bulk.BulkPlan]] = {}
    for p in fast:
        message_id = ids[p.digest]
        written = results[p.index]
        assert written is not None and p.plan is not None
        written.message_id = message_id
        p.plan.message_id = message_id
        specimen_rows.extend({"message_fk": message_id, "specimen_id": s[:64]}
                             for s in dict.fromkeys(p.message.specimen_ids) if s)
        by_interface.setdefault(p.item.rt.name, []).append(p.plan)
    return specimen_rows, by_interface


def _log_lines(fast: list[_Prepared], results: list[IngestResult | None],
               moved: dict[str, dict[str, Any]]) -> None:
    """Logged by the pipeline on the reactor after the commit (IngestResult.logs), in the
    order the one-at-a-time path writes them: the sample's move, then the message."""
    for p in fast:
        assert p.plan is not None
        written = results[p.index]
        assert written is not None
        move = moved.get(p.plan.facts.specimen_id)
        if move is not None:
            written.logs.append(("lis.sample.transition", move))
        written.logs.append(("message.applied", {
            "interface": p.item.rt.name, "message_id": written.message_id,
            "result_count": len(p.plan.results), "control_id": p.message.control_id}))


def _write(session: Session, fast: list[_Prepared], now: datetime,
           results: list[IngestResult | None]) -> None:
    rows = _rows(fast, now, results)
    conn = session.connection()
    ids = {digest: ident for ident, digest in conn.execute(_INSERT_RAW, rows)}
    specimen_rows, by_interface = _link(fast, results, ids)
    conn.execute(_INSERT_SPECIMENS, specimen_rows)
    moved: dict[str, dict[str, Any]] = {}
    for interface, plans in by_interface.items():
        moved.update(results_bulk.write_many(session, plans, interface=interface, now=now))
    _log_lines(fast, results, moved)


__all__ = ["BulkItem", "ingest_bulk", "ingest_one", "prepare_item"]
