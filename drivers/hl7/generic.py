"""The generic HL7 v2 driver: ORU^R01 (v2.3-2.5.1), OUL^R22 (IHE LAW), queries, ACKs.

Vendor dialects are tolerated rather than special-cased where a rule covers them
(PROTOCOLS 92-99); what looks odd but is still readable becomes a ``warning``.

Options (all optional, per interface):

``specimen_id_order``
    Where to look for the specimen id, first non-empty wins. Default
    ``["OBR-3", "OBR-2", "SPM-2", "ORC-3", "SAC-3"]``. ``SEG-n`` means component 1 of field n;
    when that component holds subcomponents (SPM-2 EIP ``id&BARCODE``) the first non-empty one
    is used. HL7 nulls (``""``) count as empty. ``SAC-3`` (container id) is a last resort for
    senders that leave every other id null (corpus nihonkohden_mek9100__1).
``encoding``
    Character set override (a Python codec name); default: MSH-18.
``code_field``
    ``"auto"`` (default): OBX-3 component 1, or OBX-4 when OBX-3 is empty or a bare number
    and OBX-4 holds text (Mindray BS/CL, PROTOCOLS 94). ``"OBX-3"`` or ``"OBX-4"`` force one.

``sender`` is MSH-3 component 1, followed by ``|`` and MSH-4 component 1 when MSH-4 is not
empty (``BA400|Biosystems``); ``""`` when both are empty (Mindray).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from drivers.hl7.parser import (
    HL7Message,
    Segment,
    parse_hl7_datetime,
    parse_message,
    unescape,
)
from drivers.model import (
    NOT_PRODUCTION,
    AnalyzerMessage,
    MessageKind,
    Observation,
    QueryRequest,
    SpecimenResults,
)

__all__ = ["DEFAULT_SPECIMEN_ID_ORDER", "GenericHL7Driver"]

DEFAULT_SPECIMEN_ID_ORDER = ("OBR-3", "OBR-2", "SPM-2", "ORC-3", "SAC-3")

_FIELD_REF = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})$")
_BARE_NUMBER = re.compile(r"^\s*\d+\s*$")
_NULL = '""'

_QUERY_TYPES = frozenset({"QBP", "QRY", "VXQ"})
_ACK_TYPES = frozenset({"ACK", "MCF", "QCK"})
_ORDER_TYPES = frozenset({"OML", "ORM", "OLM"})
_RESULT_TYPES = frozenset({"ORU", "OUL"})


def _clean(value: str) -> str:
    """HL7 null ``""`` and surrounding blanks read as empty."""
    value = value.strip()
    return "" if value == _NULL else value


@dataclass(slots=True)
class _Group:
    """One order group (OBR with its ORC and OBX) and the specimen segments it belongs to."""

    specimen: dict[str, Segment]
    obr: Segment | None = None
    orc: Segment | None = None
    patient_id: str = ""
    observations: list[Segment] = field(default_factory=list)
    notes: dict[int, list[str]] = field(default_factory=dict)  # OBX position -> NTE-3 texts

    def get(self, name: str) -> Segment | None:
        if name == "OBR":
            return self.obr
        if name == "ORC":
            return self.orc
        return self.specimen.get(name)


class GenericHL7Driver:
    """Decode any ORU/OUL-shaped HL7 v2 message into an :class:`AnalyzerMessage`."""

    name = "hl7-generic"
    protocol = "hl7"

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        options = dict(options or {})
        order = options.pop("specimen_id_order", DEFAULT_SPECIMEN_ID_ORDER)
        if isinstance(order, str) or not isinstance(order, list | tuple):
            raise ValueError("specimen_id_order must be a list such as ['OBR-3', 'SPM-2']")
        refs: list[tuple[str, int]] = []
        for ref in order:
            match = _FIELD_REF.match(str(ref))
            if not match:
                raise ValueError(
                    f"specimen_id_order entry {ref!r} is not a field reference such as 'OBR-3'"
                )
            refs.append((match.group(1), int(match.group(2))))
        self.specimen_id_order: tuple[tuple[str, int], ...] = tuple(refs)
        encoding = options.pop("encoding", None)
        if encoding is not None and not isinstance(encoding, str):
            raise ValueError("encoding must be a codec name such as 'utf-8'")
        self.encoding: str | None = encoding or None
        code_field = str(options.pop("code_field", "auto"))
        if code_field not in ("auto", "OBX-3", "OBX-4"):
            raise ValueError("code_field must be 'auto', 'OBX-3' or 'OBX-4'")
        self.code_field = code_field
        if options:
            raise ValueError(
                f"unknown hl7-generic driver option(s): {', '.join(sorted(options))}; "
                "known: specimen_id_order, encoding, code_field"
            )

    # ------------------------------------------------------------------ entry points

    def detect(self, raw: bytes) -> bool:
        """True when ``raw`` starts with an MSH segment (after blanks / <VT>)."""
        head = raw[:64].lstrip(b" \t\r\n\x0b\x0c\x00")
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        return head.startswith(b"MSH") and len(head) > 3 and not chr(head[3]).isalnum()

    def parse(self, raw: bytes) -> HL7Message:
        """Tokenize with this interface's encoding override."""
        return parse_message(raw, self.encoding)

    def decode(self, raw: bytes) -> AnalyzerMessage:
        """Decode one message; raises :class:`HL7ParseError` when it cannot be read."""
        return self.decode_message(self.parse(raw))

    def decode_message(self, message: HL7Message) -> AnalyzerMessage:
        msh = message.msh
        warnings = list(message.warnings)
        msg_type = message.message_type
        trigger = message.trigger_event
        structure = message.message_structure
        message_type = "^".join(p for p in (msg_type, trigger, structure) if p)
        sender = msh.component(3, 1)
        facility = msh.component(4, 1)
        if facility:
            sender = f"{sender}|{facility}"
        sent_at = None
        if msh.raw(7):
            sent_at = parse_hl7_datetime(msh.component(7, 1))
            if sent_at is None:
                warnings.append(f"MSH-7 date/time {msh.raw(7)[:30]!r} is not readable")
        extra: dict[str, str] = {}
        if msh.raw(21):
            extra["profile"] = msh.raw(21)
        # PROTOCOLS 88: Mindray's MSH-16 result-type flag (0 patient, 1 calibration, 2 QC).
        mindray_flag = msh.field(16).strip()
        if mindray_flag in ("0", "1", "2"):
            extra["mindray_result_type"] = mindray_flag

        kind: MessageKind
        specimens: tuple[SpecimenResults, ...] = ()
        queries: tuple[QueryRequest, ...] = ()
        has_results = any(seg.name in ("OBX", "OBR", "SPM") for seg in message.segments)
        if msg_type in _ACK_TYPES:
            kind = MessageKind.ACK
            msa = message.segment("MSA")
            if msa is None:
                warnings.append(f"{msg_type} without an MSA segment")
            else:
                extra["ack_code"] = msa.field(1)
                extra["ack_control_id"] = msa.field(2)
                if msa.field(3):
                    extra["ack_text"] = msa.field(3)
        elif msg_type in _QUERY_TYPES and not message.segment("OBX"):
            kind = MessageKind.QUERY
            queries = self._queries(message, warnings)
        elif msg_type in _RESULT_TYPES or msg_type in _ORDER_TYPES or has_results:
            if msg_type not in _RESULT_TYPES and msg_type not in _ORDER_TYPES:
                warnings.append(
                    f"MSH-9 says {message_type} but the message carries OBR/OBX results; "
                    "read as results"
                )
            specimens = self._specimens(message, warnings)
            if msg_type in _ORDER_TYPES:
                kind = MessageKind.ORDERS
            elif mindray_flag in ("1", "2") or (specimens and all(s.is_qc for s in specimens)):
                # PROTOCOLS 88: calibration (1) and QC (2) results are not patient results
                kind = MessageKind.QC
            elif (processing := msh.component(11, 1).strip().upper()) in NOT_PRODUCTION:
                kind = MessageKind.OTHER
                warnings.append(f"MSH-11 {processing} ({NOT_PRODUCTION[processing]}): "
                                "results not applied to patients")
            else:
                kind = MessageKind.RESULTS
            if mindray_flag in ("1", "2"):
                specimens = tuple(_with_qc(s) for s in specimens)
            if kind is not MessageKind.ORDERS and not any(s.observations for s in specimens):
                warnings.append("no OBX observation in this message")
        else:
            kind = MessageKind.OTHER
        return AnalyzerMessage(
            protocol=self.protocol,
            kind=kind,
            sender=sender,
            control_id=message.control_id,
            specimens=specimens,
            queries=queries,
            message_type=message_type,
            version=message.version,
            sent_at=sent_at,
            warnings=tuple(warnings),
            extra=extra,
        )

    # ------------------------------------------------------------------ results

    def _specimens(self, message: HL7Message, warnings: list[str]) -> tuple[SpecimenResults, ...]:
        groups = _group(message)
        merged: dict[str, dict[str, object]] = {}
        order: list[str] = []
        for group in groups:
            specimen_id = self._specimen_id(group)
            observations = [self._observation(obx, warnings) for obx in group.observations]
            for position, texts in group.notes.items():
                obs = observations[position]
                observations[position] = replace(obs, comments=(*obs.comments, *texts))
            spm = group.specimen.get("SPM")
            is_qc = spm is not None and _is_qc_specimen(spm)
            ordered = group.obr.component(4, 1) if group.obr is not None else ""
            action = group.orc.field(1) if group.orc is not None else ""
            report_type = group.obr.field(25) if group.obr is not None else ""
            entry = merged.get(specimen_id)
            if entry is None:
                entry = {
                    "observations": [],
                    "ordered": [],
                    "qc": is_qc,
                    "patient": group.patient_id,
                    "action": action,
                    "report_type": report_type,
                }
                merged[specimen_id] = entry
                order.append(specimen_id)
            obs_list = entry["observations"]
            assert isinstance(obs_list, list)
            obs_list.extend(observations)
            ordered_list = entry["ordered"]
            assert isinstance(ordered_list, list)
            if ordered and ordered not in ordered_list:
                ordered_list.append(ordered)
            entry["qc"] = bool(entry["qc"]) or is_qc
        result = []
        for specimen_id in order:
            entry = merged[specimen_id]
            if not specimen_id and entry["observations"]:
                warnings.append(
                    "results without a specimen id (none of "
                    + ", ".join(f"{s}-{n}" for s, n in self.specimen_id_order)
                    + " is filled); they cannot be matched to a sample"
                )
            obs_list = entry["observations"]
            ordered_list = entry["ordered"]
            assert isinstance(obs_list, list) and isinstance(ordered_list, list)
            result.append(
                SpecimenResults(
                    specimen_id=specimen_id,
                    observations=tuple(obs_list),
                    patient_id_hint=str(entry["patient"]),
                    ordered_codes=tuple(ordered_list),
                    is_qc=bool(entry["qc"]),
                    action_code=str(entry["action"]),
                    report_type=str(entry["report_type"]),
                )
            )
        return tuple(result)

    def _specimen_id(self, group: _Group) -> str:
        for seg_name, number in self.specimen_id_order:
            seg = group.get(seg_name)
            if seg is None:
                continue
            seps = seg.seps
            first = seg.raw(number).split(seps.repetition, 1)[0].split(seps.component, 1)[0]
            # Split on the subcomponent separator before unescaping: ``\T\`` is a literal "&".
            for part in first.split(seps.subcomponent):
                value = _clean(unescape(part, seps) if seps.escape in part else part)
                if value:
                    return value
        return ""

    def _observation(self, obx: Segment, warnings: list[str]) -> Observation:
        """One OBX. Most OBX hold no repetition, escape or subcomponent and leave OBX-4
        empty: those are read here with one split per value (an ORU carries dozens of OBX,
        and Segment.component re-splits the field for each). Everything else goes the
        general way, :meth:`_observation_general`; both give the same Observation
        (tests/unit/test_hl7_decode_fast.py)."""
        fields = obx.fields
        if (
            self.code_field == "OBX-4"
            or (len(fields) > 4 and fields[4].strip())  # Mindray code or a sub-id
            or (len(fields) > 2 and fields[2].strip() == "SN")  # structured numeric
            or not obx.is_plain()
        ):
            return self._observation_general(obx, warnings)
        # Absent trailing fields read as empty, as Segment.raw gives them. OBX-12 onwards are
        # often left off; padding up to OBX-19 would cost more than the three look-ups below.
        count = len(fields)
        if count < 12:
            fields = fields + [""] * (12 - count)
        obx14 = fields[14] if count > 14 else ""
        obx18 = fields[18] if count > 18 else ""
        obx19 = fields[19] if count > 19 else ""
        comp = obx.seps.component
        # No escape, repetition or subcomponent: component c is the c-th piece of the field
        # split on the component separator, and a field is its raw text.
        obx3 = fields[3].split(comp, 2)
        code = obx3[0]
        if not code:
            warnings.append(f"OBX at segment {obx.index + 1} has no observation code")
        flag = fields[8].partition(comp)[0].strip()  # one repetition: one flag at most
        when = obx14.partition(comp)[0] or obx19.partition(comp)[0]
        # Positional, in Observation's field order: keyword arguments cost ~0.4 µs more per
        # OBX (10 µs for 25). test_hl7_decode_fast compares every field with the general way.
        return Observation(
            code.strip(),  # analyzer_code
            fields[5].rstrip(comp),  # value_text, trailing empty components dropped
            fields[6].partition(comp)[0].strip(),  # units
            fields[7].strip(),  # reference_range
            (flag,) if flag and flag != _NULL else (),  # flags, HL7 null dropped as _clean does
            fields[11].strip(),  # status
            parse_hl7_datetime(when) if when else None,  # observed_at: OBX-14, else OBX-19
            obx18.partition(comp)[0],  # equipment
            (),  # comments
            fields[2].strip(),  # value_type
            "",  # sub_id: OBX-4 is empty
            obx3[1] if len(obx3) > 1 else "",  # analyzer_name
        )

    def _observation_general(self, obx: Segment, warnings: list[str]) -> Observation:
        """One OBX, any content: escapes, repetitions, subcomponents, OBX-4 codes."""
        sub = obx.seps.subcomponent
        code = _first_sub(obx.component(3, 1), sub)
        obx4 = obx.field(4).strip()
        sub_id = obx4
        analyzer_name = obx.component(3, 2)
        mode = self.code_field
        if mode == "OBX-4" or (
            mode == "auto"
            and obx4
            and not _BARE_NUMBER.match(obx4)
            and (not code or _BARE_NUMBER.match(code))
        ):
            # PROTOCOLS 94: Mindray puts the test name in OBX-4 (not a sub-id).
            if not analyzer_name:
                analyzer_name = code
            code, sub_id = obx4, ""
        if not code:
            warnings.append(f"OBX at segment {obx.index + 1} has no observation code")
        flags = _flags(obx)
        # OBX-14 observation time; v2.5 LAW senders often leave it empty and fill OBX-19
        # (date/time of the analysis) instead (PROTOCOLS 99, corpus roche_cobas_pure__2).
        when = obx.component(14, 1) or obx.component(19, 1)
        observed_at = parse_hl7_datetime(when) if when else None
        return Observation(
            analyzer_code=code.strip(),
            value_text=_value_text(obx, sn=obx.field(2).strip() == "SN"),
            units=obx.component(6, 1).strip(),
            reference_range=obx.field(7).strip(),
            flags=flags,
            status=obx.field(11).strip(),
            observed_at=observed_at,
            equipment=obx.component(18, 1),
            value_type=obx.field(2).strip(),
            sub_id=sub_id,
            analyzer_name=analyzer_name,
        )

    # ------------------------------------------------------------------ queries

    def _queries(self, message: HL7Message, warnings: list[str]) -> tuple[QueryRequest, ...]:
        queries: list[QueryRequest] = []
        for qpd in message.segments_named("QPD"):
            query_name = qpd.component(1, 1)
            if query_name == "WOS_ALL":  # PROTOCOLS 97: query all
                queries.append(QueryRequest(specimen_ids=(), all_specimens=True))
                continue
            if query_name == "Z03" or message.trigger_event == "Z03":
                # PROTOCOLS 97: GeneXpert host query, QPD-3 patient, QPD-4 specimen.
                specimen = _clean(qpd.component(4, 1))
            else:
                specimen = _first_sub(_clean(qpd.component(3, 1)), qpd.seps.subcomponent)
            if specimen:
                queries.append(QueryRequest(specimen_ids=(specimen,)))
            else:
                warnings.append(f"QPD {query_name!r} names no specimen id")
        for qrd in message.segments_named("QRD"):
            # Old-style QRY^Q02 (Mindray): QRD-8 who-subject filter holds the sample id.
            subject = _clean(qrd.component(8, 1))
            if subject:
                queries.append(QueryRequest(specimen_ids=(subject,)))
                continue
            qrf = message.segment("QRF")
            start = qrf.field(2) if qrf is not None else ""
            stop = qrf.field(3) if qrf is not None else ""
            queries.append(
                QueryRequest(
                    specimen_ids=(),
                    all_specimens=True,
                    raw_range=f"{start}-{stop}" if start or stop else "",
                )
            )
        if not queries:
            warnings.append("query without a QPD or QRD segment")
        return tuple(queries)


_QC_SPECIMEN_TYPE = re.compile(r"^(QC\d*|CONTROL)$", re.IGNORECASE)


def _is_qc_specimen(spm: Segment) -> bool:
    """PROTOCOLS 99: SPM-11 role ``Q`` marks a control. Also read as QC: an SPM-2 EIP whose
    type is ``CONTROL`` (Roche) and a specimen type such as ``QC3`` (Siemens CentraLink)."""
    if spm.component(11, 1).strip().upper() == "Q":
        return True
    if spm.component(2, 1, sub=2).strip().upper() == "CONTROL":
        return True
    return bool(_QC_SPECIMEN_TYPE.match(spm.component(4, 1).strip()))


def _flags(obx: Segment) -> tuple[str, ...]:
    """OBX-8 repetitions, component 1 of each, HL7 nulls dropped (PROTOCOLS 94)."""
    raw = obx.raw(8)
    if not raw:
        return ()
    seps = obx.seps
    flags = []
    for rep in raw.split(seps.repetition):
        flag = _clean(rep.split(seps.component, 1)[0])
        if flag:
            flags.append(unescape(flag, seps) if seps.escape in flag else flag)
    return tuple(flags)


def _first_sub(value: str, sub: str) -> str:
    if sub not in value:
        return value
    return next((p for p in value.split(sub) if p.strip()), "")


def _value_text(obx: Segment, sn: bool = False) -> str:
    """OBX-5 as sent, unescaped, with trailing empty components dropped (``4.53^`` -> ``4.53``,
    ``NOT DETECTED^`` -> ``NOT DETECTED``); repetitions stay joined by the repetition
    separator. With ``sn`` (OBX-2 ``SN``) each repetition is read by :func:`_sn_text`."""
    raw = obx.raw(5)
    if not raw:
        return ""
    seps = obx.seps
    reps = []
    for rep in raw.split(seps.repetition):
        comps = rep.split(seps.component)
        if sn:
            reps.append(_sn_text(_unescape_parts(comps, obx)))
            continue
        while len(comps) > 1 and not comps[-1]:
            comps.pop()
        reps.append(seps.component.join(_unescape_parts(comps, obx)))
    return seps.repetition.join(reps)


def _sn_text(parts: list[str]) -> str:
    """A structured numeric (PROTOCOLS 93), ``comparator^num1[^separator^num2]``, as the text
    the mapping reads: ``>^25`` -> ``>25``, ``^30`` and ``=^30`` -> ``30``, a ratio ``^1^:^40``
    -> ``1:40``, a range ``^2^-^5`` -> ``2-5`` (text, not a number)."""
    parts = [p.strip() for p in parts]
    if parts[0] == "=":
        parts[0] = ""
    return "".join(parts)


def _unescape_parts(parts: list[str], seg: Segment) -> list[str]:
    esc = seg.seps.escape
    return [unescape(p, seg.seps) if esc in p else p for p in parts]


def _with_qc(specimen: SpecimenResults) -> SpecimenResults:
    if specimen.is_qc:
        return specimen
    return SpecimenResults(
        specimen_id=specimen.specimen_id,
        observations=specimen.observations,
        patient_id_hint=specimen.patient_id_hint,
        ordered_codes=specimen.ordered_codes,
        is_qc=True,
        action_code=specimen.action_code,
        report_type=specimen.report_type,
    )


def _group(message: HL7Message) -> list[_Group]:
    """Walk the segments into order groups, for both layouts (PROTOCOLS 92, 98).

    * ORU^R01: [PID] then per order [ORC] OBR {OBX} [SPM...]: an SPM that arrives while the
      current group has no specimen yet belongs to that group.
    * OUL^R22: SPM [SAC] then OBR [ORC] [TQ1] {OBX} ...: an SPM that arrives when the current
      group already has one opens a new specimen context for the OBRs that follow.
    * An ORC belongs to the OBR that follows it (ORU order), except that an ORC after an OBR
      with no OBX yet belongs to that OBR (LAW order) unless it is followed by an OBR that has
      no ORC of its own after it (:func:`_orc_before_obr`).
    * OBX with no OBR (BioSystems BA200: MSH + OBX only) opens an implicit group.
    * NTE after an OBX (past its TCD/SID) comments that OBX (PROTOCOLS 92, 98); NTE anywhere
      else (patient, order) is not kept: the model has no place for it.
    """
    groups: list[_Group] = []
    specimen: dict[str, Segment] = {}
    patient_id = ""
    current: _Group | None = None
    pending_orc: Segment | None = None
    noted: tuple[_Group, int] | None = None  # the group and position of the OBX an NTE follows
    segments = message.segments
    for index, seg in enumerate(segments):
        name = seg.name
        if name == "NTE":
            text = _note_text(seg)
            if noted is not None and text:
                noted[0].notes.setdefault(noted[1], []).append(text)
            continue
        if name in ("TCD", "SID"):
            continue
        noted = None
        if name == "OBX":
            if current is None:
                current = _Group(specimen=specimen, patient_id=patient_id)
                groups.append(current)
            current.observations.append(seg)
            noted = (current, len(current.observations) - 1)
        elif name == "OBR":
            current = _Group(specimen=specimen, patient_id=patient_id, obr=seg, orc=pending_orc)
            pending_orc = None
            groups.append(current)
        elif name == "ORC":
            if (
                current is not None
                and current.orc is None
                and current.obr is not None
                and not (current.observations)
                and not _orc_before_obr(segments, index)
            ):
                current.orc = seg
            else:
                pending_orc = seg
        elif name == "SPM":
            if current is not None and "SPM" not in current.specimen and current.obr is not None:
                # ORU layout: SPM closes the order group it follows.
                current.specimen = {**current.specimen, "SPM": seg}
            else:
                specimen = {"SPM": seg}
                current = None
        elif name == "SAC":
            # The first container of the current specimen (SAC-3 container id).
            target = current.specimen if current is not None else specimen
            target.setdefault("SAC", seg)
        elif name == "PID":
            patient_id = _clean(seg.component(3, 1)) or _clean(seg.component(2, 1))
            specimen = {}
            current = None
    return groups


def _orc_before_obr(segments: list[Segment], index: int) -> bool:
    """True when the ORC at ``index`` is followed (past TQ1/TQ2) by an OBR with no ORC right
    after it: that ORC opens the next order (ORU order, PROTOCOLS 92) rather than closing
    the OBR before it (LAW order, PROTOCOLS 98: each OBR followed by its own ORC)."""
    after = index + 1
    while after < len(segments) and segments[after].name in ("TQ1", "TQ2"):
        after += 1
    if after >= len(segments) or segments[after].name != "OBR":
        return False
    return after + 1 >= len(segments) or segments[after + 1].name != "ORC"


def _note_text(nte: Segment) -> str:
    """NTE-3: its non-empty components joined by a blank (Cepheid sends ``Notes^^notes for
    OBM``), one line per repetition."""
    lines = (
        " ".join(c.strip() for c in nte.components(3, rep) if c.strip())
        for rep in range(1, len(nte.repetitions(3)) + 1)
    )
    return "\n".join(line for line in lines if line)
