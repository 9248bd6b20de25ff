"""Generic ASTM E1394 / LIS2-A2 driver: one H...L message -> :class:`AnalyzerMessage`.

Decisions (each can be overridden per interface through ``options``):

* **specimen id** (``specimen_id_fields``, default ``["O-3", "O-4"]``): the first of
  those fields that is not empty (PROTOCOLS 67: several analyzers only fill O-4).
  Within a field, ``specimen_id_component`` picks the component: an integer (1-based),
  or ``"auto"`` (default): the first non-empty component of the first repeat, except
  in Roche messages (H-11 ``RSUPL``/``TSREQ``/``TSDWN``...) whose O-3 is
  ``seq^specimen^...`` (corpus:roche_cobas_c311__1), where component 2 is used when
  it is set. Leading and trailing blanks are stripped (Roche and Sysmex pad ids to
  22 characters). A field may also be ``P-3``/``P-4``/``P-5`` for analyzers that put
  the sample id in the patient record (corpus:euroimmun_analyzer_i__1).
* **test code** (``test_code_component``): an integer, or ``"auto"`` (default):
  component 4 of the universal test id (PROTOCOLS 68) unless it is Mindray's one-letter
  result type (``1^CA125^^F``), else component 5 (Sysmex ``^^^^WBC``), else
  component 1, except that a purely numeric component 1 followed by a name in
  component 2 is a channel number and the name is used (Mindray ``1^ALT``, cobas u 411
  ``1^SG``). The code is kept as sent (Roche ``685/``) so mappings name it.
  ``Observation.sub_id`` carries the whole universal test id as sent, so a mapping can
  tell ARCHITECT F/I/P rows apart.
* **value**: ``value_text`` is component 1 of R-4 (``98.189848^^^^`` -> ``98.189848``;
  Cepheid ``^0.0`` -> ``''``); when R-4 has further non-empty components they are
  kept in ``Observation.comments`` as ``R-4 components: ...`` so nothing is dropped.
* **query specimen id**: Q-3 component 2, else 1, else 3 (corpus:snibe_maglumi_x8__1
  comp. 2, immucor_rvt__1 comp. 1, roche_cobas_c311__2 comp. 3; PROTOCOLS 71).
* **control id**: H-3 when set, else the H-14 timestamp, else ``""``.
* **sender**: H-5 component 1, stripped; when empty, H-9 if it holds a name (Atellica
  data manager).
* **patient id** (``patient_id_field``): a field name, or ``"auto"`` (default): the
  first non-empty of P-3, P-4, P-5 (PROTOCOLS 66). It is only a hint and never logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from drivers.astm.records import (
    DEFAULT_DELIMITERS,
    Delimiters,
    Record,
    encode_header,
    encode_message,
    encode_record,
    is_header_line,
    parse_message,
)
from drivers.model import (
    NOT_PRODUCTION,
    AnalyzerMessage,
    MessageKind,
    Observation,
    QueryRequest,
    SpecimenResults,
    parse_number,
)

__all__ = [
    "GenericASTMDriver",
    "OrderRequest",
    "build_no_orders_answer",
    "build_order_records",
    "build_query_answer",
    "parse_astm_datetime",
]

_ROCHE_H11 = {"RSUPL", "TSREQ", "TSDWN", "RSREQ", "TSUPL", "RSDWN"}
_FIELD_NAME = re.compile(r"^([A-Za-z])-(\d{1,2})$")
_DATETIME = re.compile(r"^(\d{8})(\d{2})?(\d{2})?(\d{2})?([+-]\d{4})?$")


def parse_astm_datetime(text: str) -> datetime | None:
    """``YYYYMMDD[HH[MM[SS]]][+HHMM]`` -> datetime; None when empty or not a date
    (PROTOCOLS 56; ``00000000000000`` from Roche calculated tests gives None)."""
    match = _DATETIME.match(text.strip())
    if not match:
        return None
    date, hh, mm, ss, tz = match.groups()
    try:
        value = datetime(
            int(date[:4]),
            int(date[4:6]),
            int(date[6:8]),
            int(hh or 0),
            int(mm or 0),
            int(ss or 0),
        )
    except ValueError:
        return None
    if tz:
        hours, minutes = int(tz[1:3]), int(tz[3:5])
        # Real offsets run from -12:00 to +14:00; a larger one (PostgreSQL refuses past
        # 15:59, Python past 23:59) or one that takes the moment out of years 1..9999 in
        # UTC (where it is stored) is a garbled stamp: no time, like an impossible date.
        if minutes > 59 or hours * 60 + minutes > 14 * 60:
            return None
        offset = timedelta(hours=hours, minutes=minutes)
        value = value.replace(tzinfo=timezone(offset if tz[0] == "+" else -offset))
        try:
            value.astimezone(UTC)
        except OverflowError:
            return None
    return value


def _field_ref(name: str) -> tuple[str, int]:
    match = _FIELD_NAME.match(name.strip())
    if not match:
        raise ValueError(f"field name must look like 'O-3', got {name!r}")
    return match.group(1).upper(), int(match.group(2))


@dataclass
class _SpecimenBuilder:
    specimen_id: str
    patient_id_hint: str
    ordered_codes: list[str] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    is_qc: bool = False
    action_code: str = ""
    report_type: str = ""

    def build(self) -> SpecimenResults:
        return SpecimenResults(
            specimen_id=self.specimen_id,
            observations=tuple(self.observations),
            patient_id_hint=self.patient_id_hint,
            ordered_codes=tuple(self.ordered_codes),
            is_qc=self.is_qc,
            action_code=self.action_code,
            report_type=self.report_type,
        )


# Mindray QC layout of O-12: level^name^lot^expiry^mean^?^SD^result
_MINDRAY_QC_COMPONENTS = 8


def _is_mindray_qc(rec: Record) -> bool:
    """True when O-12 holds Mindray's QC layout (a plain action code has one component),
    its last component a number."""
    for rep in range(len(rec.repeats(12))):
        comps = rec.components(12, rep)
        result = comps[7].strip() if len(comps) >= _MINDRAY_QC_COMPONENTS else ""
        if parse_number(result)[1] is not None:
            return True
    return False


class GenericASTMDriver:
    """Decodes any LIS2-A2 message; vendor drivers subclass and override hooks."""

    name = "astm-generic"
    protocol = "astm"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.specimen_id_fields: list[str] = list(opts.get("specimen_id_fields", ["O-3", "O-4"]))
        for name in self.specimen_id_fields:
            _field_ref(name)
        self.specimen_id_component: int | str = opts.get("specimen_id_component", "auto")
        self.test_code_component: int | str = opts.get("test_code_component", "auto")
        self.encoding: str = opts.get("encoding", "latin-1")
        self.patient_id_field: str = opts.get("patient_id_field", "auto")
        if self.patient_id_field != "auto":
            _field_ref(self.patient_id_field)

    # ---------------------------------------------------------------- detection

    @staticmethod
    def detect(raw: bytes) -> bool:
        """True when the text starts with an H record and a delimiter (``H|``)."""
        return is_header_line(raw.lstrip(b" \t\r\n")[:8])

    # ------------------------------------------------------------------ decoding

    def decode(self, raw: bytes) -> AnalyzerMessage:
        """Decode one H...L message. Raises ``ValueError`` when it has no H record."""
        records, warnings = parse_message(raw, self.encoding)
        header = records[0]
        roche = header.value(11, 1).strip().upper() in _ROCHE_H11
        sender = header.value(5, 1).strip()
        if not sender and re.search("[A-Za-z]", header.value(9, 1)):
            sender = header.value(9, 1).strip()  # Atellica data manager names itself in H-9
        sent_at = parse_astm_datetime(header.value(14, 1))
        control_id = header.text(3).strip() or header.field(14).strip()
        processing_id = header.value(12, 1).strip().upper()
        types = [r.type for r in records]

        specimens: list[_SpecimenBuilder] = []
        queries: list[QueryRequest] = []
        patient_hint = ""
        current: _SpecimenBuilder | None = None
        last_obs_index: int | None = None  # C records attach to the R before them
        last_type = ""
        has_results = False
        has_qc_marker = processing_id == "Q"
        for position, rec in enumerate(records, start=1):
            rtype = rec.type
            if rtype == "P":
                patient_hint = self._patient_id(rec)
                current = None
                last_obs_index = None
            elif rtype == "O" and processing_id == "QR" and _is_mindray_qc(rec):
                # Mindray QC result (H-12 QR): no R record; each repeat of O-12 is one
                # control level, level^name^lot^expiry^mean^?^SD^result (corpus:
                # mindray_bs240__4, mindray_cl2000i__4; the Mindray CL host manual).
                has_qc_marker = has_results = True
                specimens.extend(self._mindray_qc(rec, patient_hint))
                current = None
                last_obs_index = None
            elif rtype == "O":
                specimen_id = self._specimen_id(rec, roche, records, position)
                if not specimen_id:
                    warnings.append(
                        f"record {position}: no specimen id in {', '.join(self.specimen_id_fields)}"
                    )
                action = rec.value(12, 1).strip().upper()
                builder = self._find_or_add(specimens, specimen_id, patient_hint)
                builder.action_code = builder.action_code or action
                builder.report_type = rec.value(26, 1).strip().upper() or builder.report_type
                if action == "Q" or processing_id == "Q":
                    builder.is_qc = True
                    has_qc_marker = True
                for rep in range(len(rec.repeats(5))):
                    code = self._test_code(rec.components(5, rep))
                    if code and code not in builder.ordered_codes:
                        builder.ordered_codes.append(code)
                current = builder
                last_obs_index = None
            elif rtype == "R":
                has_results = True
                if current is None:
                    warnings.append(f"record {position}: R record outside an O record; kept")
                    current = self._find_or_add(specimens, "", patient_hint)
                current.observations.append(self._observation(rec))
                last_obs_index = len(current.observations) - 1
            elif rtype == "C":
                if last_type in ("R", "C") and current is not None and last_obs_index is not None:
                    text = _comment_text(rec)
                    if text:
                        obs = current.observations[last_obs_index]
                        current.observations[last_obs_index] = _with_comment(obs, text)
            elif rtype == "Q":
                queries.append(self._query(rec))
            elif rtype not in ("H", "L", "M", "S"):
                warnings.append(f"record {position}: record type {rec.fields[0]!r} ignored")
            if rtype != "M":  # M records sit anywhere; C after M still follows the R
                last_type = rtype

        terminator = records[-1].value(3, 1).strip().upper() if types[-1] == "L" else ""
        if queries and has_results:
            # Not what E1394 describes, but a message is taken whole: its results are
            # applied as in any results message, and its queries answered as well
            # (engine.pipeline), rather than the results dropped as part of a query.
            warnings.append(f"message carries {len(queries)} host query record(s) beside its "
                            "results: both are handled")
        if queries and not has_results:
            kind = MessageKind.QUERY
        elif set(types) <= {"H", "L", "C", "M"}:
            if terminator in ("", "N"):
                kind = MessageKind.KEEP_ALIVE  # PROTOCOLS 44
            else:
                kind = MessageKind.OTHER
                warnings.append(f"message has no records but H and L (L-3 {terminator!r})")
        elif has_qc_marker and all(b.is_qc for b in specimens):
            # QC only when every specimen is QC: one QC order in a message must never turn
            # the patient results beside it into "QC, ignored" (the pipeline skips QC
            # specimens one by one).
            kind = MessageKind.QC
        elif has_results and processing_id in NOT_PRODUCTION:
            kind = MessageKind.OTHER
            warnings.append(f"H-12 {processing_id} ({NOT_PRODUCTION[processing_id]}): "
                            "results not applied to patients")
        elif has_results:
            kind = MessageKind.RESULTS
        elif specimens:
            kind = MessageKind.ORDERS
        else:
            kind = MessageKind.OTHER
        return AnalyzerMessage(
            protocol="astm",
            kind=kind,
            sender=sender,
            control_id=control_id,
            specimens=tuple(s.build() for s in specimens),
            queries=tuple(queries),
            message_type=processing_id,
            version=header.value(13, 1).strip(),
            sent_at=sent_at,
            warnings=tuple(warnings),
            extra={
                "delimiters": header.field(1)[1:2] + header.field(2),
                "terminator": terminator,
                "receiver": header.value(10, 1).strip(),
                "h11": header.text(11).strip(),
            },
        )

    # ------------------------------------------------------------------- pieces

    @staticmethod
    def _find_or_add(
        specimens: list[_SpecimenBuilder], specimen_id: str, patient_hint: str
    ) -> _SpecimenBuilder:
        # Several O records for one specimen (MAGLUMI one test per O) are one specimen.
        for builder in specimens:
            if builder.specimen_id == specimen_id and builder.patient_id_hint == patient_hint:
                return builder
        builder = _SpecimenBuilder(specimen_id, patient_hint)
        specimens.append(builder)
        return builder

    def _patient_id(self, rec: Record) -> str:
        auto = self.patient_id_field == "auto"
        names = ["P-3", "P-4", "P-5"] if auto else [self.patient_id_field]
        for name in names:
            _, number = _field_ref(name)
            value = rec.value(number, 1).strip()
            if value:
                return value
        return ""

    def _specimen_id(self, rec: Record, roche: bool, records: list[Record], position: int) -> str:
        for name in self.specimen_id_fields:
            rtype, number = _field_ref(name)
            source = rec if rtype == "O" else _nearest_before(records, position, rtype)
            if source is None:
                continue
            comps = source.components(number, 0)
            value = self._pick_component(comps, roche and rtype == "O" and number == 3)
            if value:
                return value
        return ""

    def _pick_component(self, comps: list[str], roche_o3: bool) -> str:
        if isinstance(self.specimen_id_component, int):
            idx = self.specimen_id_component
            return comps[idx - 1].strip() if 0 < idx <= len(comps) else ""
        if roche_o3 and len(comps) >= 2:
            # Roche O-3 is the sample id alone (corpus roche_cobas_c311__3), or sequence
            # number ^ sample id ^ rack ^ position ... (roche_cobas_c311__1). In that second
            # form with the sample id empty, the sequence number is no specimen id: read as
            # one it could name another patient's sample. The next field is tried instead.
            if comps[1].strip():
                return comps[1].strip()
            if any(c.strip() for c in comps[2:]):
                return ""
        for comp in comps:
            if comp.strip():
                return comp.strip()
        return ""

    def _test_code(self, comps: list[str]) -> str:
        def comp(n: int) -> str:
            return comps[n - 1].strip() if 0 < n <= len(comps) else ""

        if isinstance(self.test_code_component, int):
            return comp(self.test_code_component)
        # Mindray writes code^name^^F: a one-letter component 4 after a code or name is
        # its result-type flag, not the test code (corpus:mindray_cl2000i__1).
        mindray_flag = len(comp(4)) == 1 and comp(4).isalpha() and bool(comp(1) or comp(2))
        if comp(4) and not mindray_flag:
            return comp(4)
        if comp(5):
            return comp(5)
        if comp(1).isdigit() and comp(2):
            return comp(2)
        return comp(1) or comp(2)

    def _mindray_qc(self, rec: Record, patient_hint: str) -> list[_SpecimenBuilder]:
        """One QC specimen per control level of a Mindray QC order record: named by its
        control and lot, its result under the order's test code (O-5)."""
        code = self._test_code(rec.components(5, 0))
        status = rec.value(26, 1).strip().upper()
        builders = []
        for rep in range(len(rec.repeats(12))):
            comps = [c.strip() for c in rec.components(12, rep)]
            if len(comps) < _MINDRAY_QC_COMPONENTS:
                continue
            level, name, lot, expiry, mean, _unknown, sd, result = comps[:8]
            control = " ".join(x for x in (name, "lot " + lot if lot else "") if x)
            builder = _SpecimenBuilder(f"QC {control}".strip(), patient_hint, is_qc=True,
                                       report_type=status)
            builder.ordered_codes.append(code)
            builder.observations.append(Observation(
                analyzer_code=code, value_text=result,
                reference_range=f"target {mean} SD {sd}" if mean or sd else "",
                status=status,
                comments=(f"QC level {level}, control {name}, lot {lot}, expires {expiry}",),
                sub_id=rec.text(12), analyzer_name=name))
            builders.append(builder)
        return builders

    def _observation(self, rec: Record) -> Observation:
        comps = rec.components(3, 0)
        code = self._test_code(comps)
        try:
            name_index = [c.strip() for c in comps].index(code) + 1
        except ValueError:
            name_index = len(comps)
        name = comps[name_index].strip() if name_index < len(comps) else ""
        value_comps = rec.components(4, 0)
        comments: tuple[str, ...] = ()
        if any(r.strip() for r in rec.repeats(4)[1:]):
            # More values than the first (R-4 repeats): the first is the result, and the
            # whole field stays beside it, as for components, rather than the rest lost.
            comments = ("R-4 repeats: " + rec.text(4),)
        elif any(c.strip() for c in value_comps[1:]):
            comments = ("R-4 components: " + rec.text(4),)
        flags = tuple(
            f for f in (rec.value(7, 1, rep).strip() for rep in range(len(rec.repeats(7)))) if f
        )
        return Observation(
            analyzer_code=code,
            value_text=value_comps[0],
            units=rec.value(5, 1).strip(),
            reference_range=rec.text(6).strip(),
            flags=flags,
            status=rec.value(9, 1).strip(),
            observed_at=parse_astm_datetime(rec.value(13, 1)),
            equipment=rec.value(14, 1).strip(),
            comments=comments,
            sub_id=rec.text(3),
            analyzer_name=name,
        )

    @staticmethod
    def _query(rec: Record) -> QueryRequest:
        raw_range = rec.text(3)
        all_specimens = raw_range.strip().upper() == "ALL"
        specimen_ids: list[str] = []
        for rep in range(len(rec.repeats(3))):
            comps = rec.components(3, rep)
            for index in (2, 1, 3):
                value = comps[index - 1].strip() if index <= len(comps) else ""
                if value and value.upper() != "ALL":
                    specimen_ids.append(value)
                    break
        tests: list[str] = []
        if rec.text(5).strip().upper() != "ALL":
            for rep in range(len(rec.repeats(5))):
                comps = rec.components(5, rep)
                code = next((c.strip() for c in reversed(comps[:4]) if c.strip()), "")
                if code:
                    tests.append(code)
        return QueryRequest(
            specimen_ids=tuple(specimen_ids),
            all_specimens=all_specimens,
            raw_range=raw_range,
            tests=tuple(tests),
        )


def _nearest_before(records: list[Record], position: int, rtype: str) -> Record | None:
    for rec in reversed(records[: position - 1]):
        if rec.type == rtype:
            return rec
    return None


def _comment_text(rec: Record) -> str:
    parts = [c.strip() for rep in range(len(rec.repeats(4))) for c in rec.components(4, rep)]
    return " ".join(p for p in parts if p)


def _with_comment(obs: Observation, text: str) -> Observation:
    return Observation(
        analyzer_code=obs.analyzer_code,
        value_text=obs.value_text,
        units=obs.units,
        reference_range=obs.reference_range,
        flags=obs.flags,
        status=obs.status,
        observed_at=obs.observed_at,
        equipment=obs.equipment,
        comments=(*obs.comments, text),
        value_type=obs.value_type,
        sub_id=obs.sub_id,
        analyzer_name=obs.analyzer_name,
    )


# --------------------------------------------------------------------- encoders


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """One specimen's work for the analyzer (no patient names needed)."""

    specimen_id: str
    test_codes: tuple[str, ...]
    priority: str = "R"  # O-6: S stat, A asap, R routine (PROTOCOLS 67)
    patient_id: str = ""  # P-3 hint, optional
    action_code: str = "N"  # O-12: N new, A add
    specimen_type: str = ""  # O-16
    test_code_component: int = 4  # where the analyzer expects its code (Sysmex: 5)


def _header_record(
    analyzer_id: str, lis_id: str, delims: Delimiters, timestamp: str, processing_id: str
) -> str:
    # H-3 control id, H-4 password, H-5 sender (us), H-10 receiver (the analyzer),
    # H-12 processing id, H-13 version, H-14 date/time (PROTOCOLS 65)
    fields: list[str] = ["", "", lis_id, "", "", "", "", analyzer_id, "", processing_id]
    fields += ["LIS2-A2", timestamp]
    return encode_header(fields, delims)


def build_order_records(
    orders: list[OrderRequest],
    *,
    analyzer_id: str = "",
    lis_id: str = "LIS",
    delimiters: Delimiters = DEFAULT_DELIMITERS,
    timestamp: str = "",
    answering_query: bool = False,
    encoding: str = "latin-1",
) -> bytes:
    """H P O ... L message text (records joined by CR) that downloads orders.

    O-5 lists every test as a repeat (``^^^code\\^^^code2``), O-12 is the order's
    action code, O-26 is ``Q`` when answering a host query and ``O`` otherwise
    (PROTOCOLS 67). ``timestamp`` (H-14) is given by the caller: no clock here.
    """
    if not orders:
        return build_no_orders_answer(
            analyzer_id=analyzer_id, lis_id=lis_id, delimiters=delimiters, timestamp=timestamp
        )
    records = [_header_record(analyzer_id, lis_id, delimiters, timestamp, "P")]
    for p_seq, order in enumerate(orders, start=1):
        if not order.test_codes:
            raise ValueError(f"order for specimen {order.specimen_id!r} has no test codes")
        records.append(encode_record("P", [str(p_seq), "", order.patient_id], delimiters))
        tests = [
            tuple([""] * (order.test_code_component - 1) + [code]) for code in order.test_codes
        ]
        o_fields: list[str | tuple[str, ...] | list[tuple[str, ...]]] = [""] * 25
        o_fields[0] = "1"  # O-2 sequence
        o_fields[1] = order.specimen_id  # O-3
        o_fields[3] = tests  # O-5
        o_fields[4] = order.priority  # O-6
        o_fields[10] = order.action_code  # O-12
        o_fields[14] = order.specimen_type  # O-16
        o_fields[24] = "Q" if answering_query else "O"  # O-26
        records.append(encode_record("O", o_fields, delimiters))
    records.append(encode_record("L", ["1", "N"], delimiters))
    return encode_message(records, encoding)


def build_query_answer(
    orders: list[OrderRequest],
    *,
    analyzer_id: str = "",
    lis_id: str = "LIS",
    delimiters: Delimiters = DEFAULT_DELIMITERS,
    timestamp: str = "",
    encoding: str = "latin-1",
) -> bytes:
    """Answer a host query: the orders found, or ``L|1|I`` when there are none
    (PROTOCOLS 72-73)."""
    return build_order_records(
        orders,
        analyzer_id=analyzer_id,
        lis_id=lis_id,
        delimiters=delimiters,
        timestamp=timestamp,
        answering_query=True,
        encoding=encoding,
    )


def build_no_orders_answer(
    *,
    analyzer_id: str = "",
    lis_id: str = "LIS",
    delimiters: Delimiters = DEFAULT_DELIMITERS,
    timestamp: str = "",
) -> bytes:
    """``H ... L|1|I``: no information for the last query (PROTOCOLS 73)."""
    records = [
        _header_record(analyzer_id, lis_id, delimiters, timestamp, "P"),
        encode_record("L", ["1", "I"], delimiters),
    ]
    return encode_message(records)
