"""The fast lane's statements on PostgreSQL, in as few round trips as possible.

Each statement the writer sends to PostgreSQL is a round trip: the writer thread waits
while the server wakes, plans and answers. On a 2-core machine under load (the engine's
reactor, the server and the analyzers' connections all want a core) a round trip costs
0.2-0.5 ms whatever the statement does, and the fast lane sent about eighteen per group
commit. Here they are folded into two:

- :func:`read_stretch`: one ``execute`` with two prepared statements (planned once per
  connection). The first locks the samples named (``FOR UPDATE``, in id order, so two
  writers cannot deadlock). The second, run after the locks are held and so reading what
  is committed then, returns in one result set everything the fast lane checks: earlier
  copies of the messages (content hash, or interface + sender + control id), specimens
  with a message waiting, the samples with their ordered tests and result codes, and ids
  for the new raw messages from their sequence.
- :func:`write_stretch`: one ``execute`` with every INSERT and UPDATE (raw messages,
  their specimens, ordered-test statuses, sample moves, audit rows, render jobs), each a
  prepared statement taking its rows as one array per column, then the result rows by
  ``COPY``.

Values reach the server through psycopg2's own quoting (parameters, ``cursor.mogrify``
and, for the writes, ``adapt(value).getquoted()``), never by string formatting. The other
databases take the statements of :mod:`engine.ingest_bulk` and
:mod:`lis_bridge.results_bulk`, with the same outcome: the Hypothesis tests in
``tests/integration/test_ingest_bulk.py`` compare the fast lane with the one-at-a-time
path on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import psycopg2.extensions
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql

from lis_bridge.models import (
    JobStatus,
    MessageSpecimen,
    MessageStatus,
    OutboxJob,
    RawMessage,
    SampleEvent,
    utcnow,
)
from lis_bridge.results_bulk import (
    RESULT_COPY,
    BulkWrites,
    SampleFacts,
    result_copy_text,
    sample_facts,
)

_RAW = cast(Table, RawMessage.__table__)
_SPECIMENS = cast(Table, MessageSpecimen.__table__)
_EVENTS = cast(Table, SampleEvent.__table__)
_OUTBOX = cast(Table, OutboxJob.__table__)

# Every row of the read has these columns; each kind uses some of them:
#   C (earlier copy): t1 sha256, t2 interface, t3 sender, t4 control_id
#   W (specimen with a message waiting): t1 specimen_id
#   S (sample): a id, t1 specimen_id, t2 state, t3 location, t4 sex, d birth_date
#   T (ordered test): a sample_fk, b id, t1 test_code, t2 status
#   R (result row): a sample_fk, t1 test_code
#   N (a new raw message id): a id
_NULLS = {"a": "NULL::bigint", "b": "NULL::bigint", "t1": "NULL::text", "t2": "NULL::text",
          "t3": "NULL::text", "t4": "NULL::text", "d": "NULL::date"}


def _row(kind: str, **columns: str) -> str:
    values = {**_NULLS, **columns}
    return f"SELECT '{kind}'::text AS k, " + ", ".join(
        f"{values[name]} AS {name}" for name in _NULLS)


def _word(value: str) -> str:
    """One of our own status words as an SQL literal (never a value from outside)."""
    assert value.isalpha() and value.isupper(), value
    return f"'{value}'"


# The read is a prepared statement, planned once per connection: planning the whole
# UNION ALL for every batch cost ~2 ms, more than running it. Each lookup is a LATERAL
# subquery with OFFSET 0, which keeps it an index lookup per key whatever the table sizes
# and whatever the plan (generic or custom); a test reads the generic plan, the one used.
# Parameters: $1 content hashes, $2 the duplicate window's start, $3 $4 $5 interfaces,
# senders and control ids (parallel arrays), $6 specimen ids to check for a waiting
# message, $7 the samples' specimen ids, $8 how many raw message ids to draw.
_INBOUND = (f"r.direction = 'in' AND r.status <> {_word(MessageStatus.DUPLICATE)} "
            "AND r.received_at >= $2")
_COPY = "SELECT r.sha256, r.interface, r.sender, r.control_id FROM raw_messages r WHERE "
_COPY_COLUMNS = {"t1": "c.sha256::text", "t2": "c.interface::text", "t3": "c.sender::text",
                 "t4": "c.control_id::text"}
_READ_PARTS = (
    f"{_row('C', **_COPY_COLUMNS)} FROM unnest($1::text[]) AS d(sha) CROSS JOIN LATERAL "
    f"({_COPY} r.sha256 = d.sha AND {_INBOUND} OFFSET 0) AS c",
    f"{_row('C', **_COPY_COLUMNS)} FROM unnest($3::text[], $4::text[], $5::text[]) "
    f"AS u(i, s, n) CROSS JOIN LATERAL ({_COPY} r.interface = u.i AND r.sender = u.s "
    f"AND r.control_id = u.n AND {_INBOUND} OFFSET 0) AS c",
    f"{_row('W', t1='w.specimen_id::text')} FROM unnest($6::text[]) AS q(sp) CROSS JOIN "
    "LATERAL (SELECT m.specimen_id FROM message_specimens m JOIN raw_messages r "
    "ON r.id = m.message_fk WHERE m.specimen_id = q.sp AND r.direction = 'in' AND r.status IN "
    f"({_word(MessageStatus.HELD)}, {_word(MessageStatus.RECEIVED)}) OFFSET 0) AS w",
    _row("S", a="x.id", t1="x.specimen_id::text", t2="x.state::text",
         t3="x.location::text", t4="x.sex::text", d="x.birth_date")
    + " FROM unnest($7::text[]) AS q(sp) CROSS JOIN LATERAL (SELECT s.id, s.specimen_id, "
    "s.state, s.location, p.sex, p.birth_date FROM samples s LEFT JOIN patients p "
    "ON p.id = s.patient_fk WHERE s.specimen_id = q.sp OFFSET 0) AS x",
    _row("T", a="x.sample_fk", b="x.id", t1="x.test_code::text", t2="x.status::text")
    + " FROM unnest($7::text[]) AS q(sp) CROSS JOIN LATERAL (SELECT t.sample_fk, t.id, "
    "t.test_code, t.status FROM samples s JOIN ordered_tests t ON t.sample_fk = s.id "
    "WHERE s.specimen_id = q.sp OFFSET 0) AS x",
    _row("R", a="x.sample_fk", t1="x.test_code::text")
    + " FROM unnest($7::text[]) AS q(sp) CROSS JOIN LATERAL (SELECT v.sample_fk, "
    "v.test_code FROM samples s JOIN results v ON v.sample_fk = s.id "
    "WHERE s.specimen_id = q.sp OFFSET 0) AS x",
    _row("N", a=f"nextval(pg_get_serial_sequence('{_RAW.name}', 'id'))")
    + " FROM generate_series(1, $8)",
)
READ = "labrelay_fast_read"
LOCK = "labrelay_fast_lock"


@dataclass(frozen=True, slots=True)
class _Insert:
    """A prepared INSERT of many rows, each column's values as one array parameter."""

    name: str
    table: Table
    columns: tuple[str, ...]
    suffix: str = ""

    def prepare(self) -> str:
        # Strings go in as text[] and reach a varchar(n) column by assignment, which refuses
        # a value too long as the VALUES form did (a cast to varchar(n) would cut it short).
        dialect = postgresql.dialect()
        types = []
        for name in self.columns:
            compiled = self.table.c[name].type.compile(dialect=dialect)
            types.append("text" if compiled.startswith("VARCHAR") else compiled)
        params = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(types, start=1))
        names = ", ".join(f"c{n}" for n in range(1, len(self.columns) + 1))
        return (f"PREPARE {self.name} AS INSERT INTO {self.table.name} "
                f"({', '.join(self.columns)}) SELECT {names} FROM unnest({params}) "
                f"WITH ORDINALITY AS u({names}, n) ORDER BY n{self.suffix}")

    def execute(self, quote: _Quoter, rows: Sequence[dict[str, Any]]) -> bytes:
        """``EXECUTE`` for ``rows`` (dicts with exactly :attr:`columns`), in the order
        given (the ids the table draws follow it)."""
        if set(rows[0]) != set(self.columns):
            raise ValueError(f"{self.table.name} rows have columns {sorted(rows[0])}, "
                             f"the prepared insert {sorted(self.columns)}")
        return (f"EXECUTE {self.name} (".encode()
                + b", ".join(quote.array([row[name] for row in rows]) for name in self.columns)
                + b")")


class _Quoter:
    """Values as SQL literals, quoted by psycopg2 (``adapt(value).getquoted()``, as
    ``cursor.mogrify`` does), each distinct value once a batch: a batch's rows repeat
    their times, statuses, interfaces and states, and psycopg2 took ~2 µs for each
    timestamp and ~1 µs for each id of an array, 0.3 ms a batch in all."""

    def __init__(self, cursor: Any) -> None:
        self._connection = cursor.connection
        self._done: dict[tuple[type, Any], bytes] = {}

    def __call__(self, value: Any) -> bytes:
        kind = type(value)
        if kind is int:  # what psycopg2 writes for one: its digits, after a space if < 0
            return str(value).encode() if value >= 0 else b" " + str(value).encode()
        if value is None:
            return b"NULL"
        if isinstance(value, str):
            value, kind = str(value), str  # StrEnum members as the plain strings they stand for
        elif kind is bytes:
            return self._quote(value)  # a message: quoted once, never seen again
        key = (kind, value)
        done = self._done.get(key)
        if done is None:
            done = self._done[key] = self._quote(value)
        return done

    def _quote(self, value: Any) -> bytes:
        adapted = psycopg2.extensions.adapt(value)
        prepare = getattr(adapted, "prepare", None)
        if prepare is not None:
            prepare(self._connection)  # the connection's encoding and string rules
        return cast(bytes, adapted.getquoted())

    def array(self, values: Sequence[Any]) -> bytes:
        """``values`` as psycopg2 writes a list: ``ARRAY[...]``, or ``'{...}'`` when
        empty or all NULL (an ``ARRAY[NULL]`` would be text[], which no other type takes)."""
        if all(value is None for value in values):
            return b"'{" + b",".join([b"NULL"] * len(values)) + b"}'"
        return b"ARRAY[" + b",".join(map(self, values)) + b"]"


# The writes are prepared too: parsing, analysing and planning an INSERT ... VALUES of a
# batch's rows at every batch was a fifth of the server's time on this path (perf).
_STORE = _Insert("labrelay_fast_store", _RAW, (
    "id", "interface", "direction", "protocol", "peer", "sender", "control_id",
    "message_type", "payload", "sha256", "size", "received_at", "status", "hold_reason",
    "hold_detail", "duplicate_of_fk", "ack_code", "applied_at", "attempts"))
_LINK = _Insert("labrelay_fast_link", _SPECIMENS, ("message_fk", "specimen_id"))
_EVENT = _Insert("labrelay_fast_events", _EVENTS, (
    "sample_fk", "specimen_id", "from_state", "to_state", "location", "actor", "note", "at"))
_JOB = _Insert("labrelay_fast_jobs", _OUTBOX, (
    "kind", "dedupe_key", "payload", "status", "attempts", "next_attempt_at", "last_error",
    "created_at", "updated_at"), suffix=" ON CONFLICT (dedupe_key) DO NOTHING")
TEST_STATUS = "labrelay_fast_test_status"
MOVE = "labrelay_fast_move"
_PREPARE = (
    f"PREPARE {LOCK} (text[]) AS SELECT s.id FROM samples s WHERE s.specimen_id = ANY($1) "
    "ORDER BY s.id FOR UPDATE;\n"
    f"PREPARE {READ} (text[], timestamptz, text[], text[], text[], text[], text[], integer) "
    "AS " + "\nUNION ALL\n".join(_READ_PARTS) + ";\n"
    + "".join(insert.prepare() + ";\n" for insert in (_STORE, _LINK, _EVENT, _JOB))
    + f"PREPARE {TEST_STATUS} (text, bigint[]) AS UPDATE ordered_tests SET status = $1 "
    "WHERE id = ANY($2);\n"
    f"PREPARE {MOVE} (text, timestamptz, bigint[]) AS UPDATE samples SET state = $1, "
    "state_changed_at = $2 WHERE id = ANY($3);\n"
)
# PostgreSQL plans a prepared statement afresh at each execution for as long as it
# estimates a custom plan cheaper than the generic one, and it did so for the read at
# every batch: ~0.5 ms of planning in a 0.8 ms round trip (3-message batches, measured).
# The generic plan is an index lookup per key (tests/integration/test_ingest_bulk.py reads
# it), so the batch's transaction takes it from the first execution on. It is made once per
# connection, from the statistics of the moment: made while ``samples`` was small, the
# lock's plan read the whole table at every batch from then on (seen in the bench: two
# thousand rows read per batch, where a lab has millions). Sequential scans are off for
# the batch's transaction: every statement of the fast lane finds its rows by key.
_EXECUTE = ("SET LOCAL plan_cache_mode = force_generic_plan;\n"
            "SET LOCAL enable_seqscan = off;\n"
            f"EXECUTE {LOCK} (%(samples)s::text[]);\n"
            f"EXECUTE {READ} (%(digests)s::text[], %(since)s, %(interfaces)s::text[], "
            "%(senders)s::text[], %(control_ids)s::text[], %(waiting)s::text[], "
            "%(samples)s::text[], %(new_ids)s)")
_PREPARED = "labrelay_fast_lane_prepared"  # key in the pooled connection's info


@dataclass(slots=True)
class StretchFacts:
    """What :func:`read_stretch` found."""

    copies: list[tuple[str, str, str, str]] = field(default_factory=list)
    waiting: set[str] = field(default_factory=set)
    samples: dict[str, SampleFacts] = field(default_factory=dict)
    new_ids: list[int] = field(default_factory=list)  # ascending


def read_stretch(cursor: Any, info: dict[str, Any], *, digests: Sequence[str],
                 senders: dict[tuple[str, str], list[str]], since: datetime,
                 waiting: Sequence[str], samples: Sequence[str], new_ids: int) -> StretchFacts:
    """Lock the ``samples`` (specimen ids) and read, in one round trip, what the fast lane
    checks (see the module text). ``cursor``: a psycopg2 cursor in the writer's open
    transaction; ``info``: the pooled connection's ``info`` (cleared when the connection
    closes), which remembers that the statements are prepared on it."""
    triples = [(interface, sender, control_id)
               for (interface, sender), control_ids in senders.items()
               for control_id in control_ids]
    params: dict[str, Any] = {
        "digests": list(digests), "since": since,
        "interfaces": [t[0] for t in triples], "senders": [t[1] for t in triples],
        "control_ids": [t[2] for t in triples], "waiting": list(waiting),
        "samples": list(dict.fromkeys(samples)), "new_ids": new_ids,
    }
    prepare = "" if info.get(_PREPARED) else _PREPARE
    try:
        cursor.execute(prepare + _EXECUTE, params)
    except Exception:
        info.pop(_PREPARED, None)  # prepared or not, find out afresh on the next batch
        raise
    info[_PREPARED] = True
    facts = StretchFacts()
    sample_rows: list[tuple[Any, ...]] = []
    test_rows: list[tuple[Any, ...]] = []
    code_rows: list[tuple[Any, ...]] = []
    for kind, a, b, t1, t2, t3, t4, d in cursor.fetchall():
        if kind == "C":
            facts.copies.append((t1, t2, t3, t4))
        elif kind == "W":
            facts.waiting.add(t1)
        elif kind == "S":
            sample_rows.append((a, t1, t2, t3, t4, d))
        elif kind == "T":
            test_rows.append((a, t1, b, t2))
        elif kind == "R":
            code_rows.append((a, t1))
        else:
            facts.new_ids.append(a)
    facts.samples = sample_facts(sorted(sample_rows), test_rows, code_rows)
    facts.new_ids.sort()
    return facts


def write_stretch(cursor: Any, raw_rows: Sequence[dict[str, Any]],
                  specimen_rows: Sequence[dict[str, Any]], writes: BulkWrites, *,
                  commit: bool = False) -> None:
    """Write the fast lane's rows in one query string: ``raw_rows`` (with their ids),
    ``specimen_rows`` and ``writes``, then the result rows by COPY. In the caller's
    transaction; with ``commit``, the string ends with COMMIT (the cursor's connection must
    then be a :class:`lis_bridge.pg_connection.OneTripConnection`, whose ``commit()``
    finds nothing left to do)."""
    quote = _Quoter(cursor)
    statements = [_STORE.execute(quote, raw_rows)]
    if specimen_rows:
        statements.append(_LINK.execute(quote, specimen_rows))
    for status, ids in writes.test_ids.items():
        statements.append(f"EXECUTE {TEST_STATUS} (".encode() + quote(status) + b", "
                          + quote.array(ids) + b")")
    for state, ids in writes.moves.items():
        statements.append(f"EXECUTE {MOVE} (".encode() + quote(state) + b", "
                          + quote(writes.when) + b", " + quote.array(ids) + b")")
    if writes.events:
        statements.append(_EVENT.execute(quote, writes.events))
    if writes.jobs:
        # as lis_bridge.results._enqueue_jobs writes them
        now = utcnow()
        statements.append(_JOB.execute(quote, [
            {"kind": kind, "dedupe_key": key, "payload": json.dumps(payload, sort_keys=True),
             "status": JobStatus.PENDING, "attempts": 0, "next_attempt_at": now,
             "last_error": "", "created_at": now, "updated_at": now}
            for kind, key, payload in writes.jobs]))
    if writes.result_groups:
        statements.append(RESULT_COPY.encode())
    if commit:
        statements.append(b"COMMIT")
    query = b";\n".join(statements)
    if writes.result_groups:
        # The COPY data follows the statements before it in the same exchange; libpq then
        # reads the outcome of every statement after it, the COMMIT's included. The data
        # goes in one piece: psycopg2 reads it from the file object in pieces of ``size``
        # characters, and takes the interpreter back for each.
        data = result_copy_text(writes)
        cursor.copy_expert(query, io.StringIO(data), max(len(data), 8192))
    else:
        cursor.execute(query)
    if commit and cursor.connection.in_transaction():
        raise RuntimeError("the fast lane's COMMIT did not end the transaction")


__all__ = ["StretchFacts", "read_stretch", "write_stretch"]
