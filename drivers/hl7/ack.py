"""HL7 acknowledgements built from the original's MSH alone (PROTOCOLS 83-90).

Nothing here reads a clock or invents a control id: both are passed in, so the same input
always gives the same bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from drivers.hl7.parser import (
    DEFAULT_SEPARATORS,
    MESSAGE_CODE,
    HL7Message,
    HL7ParseError,
    Segment,
    Separators,
    escape,
    parse_message,
)

__all__ = [
    "ACK_MESSAGE_TYPES",
    "ACK_TABLE_0155",
    "AckError",
    "AckMode",
    "Outcome",
    "ack_mode",
    "ack_plan",
    "build_ack",
    "build_reject_ack",
    "format_hl7_timestamp",
    "is_ack",
]

# PROTOCOLS 88: table 0155 accept / application acknowledgment conditions.
ACK_TABLE_0155 = frozenset({"AL", "NE", "ER", "SU"})
# PROTOCOLS 89: message types that are themselves acknowledgements (never answered).
ACK_MESSAGE_TYPES = frozenset({"ACK", "MCF", "QCK"})

# Table 0357 texts for the error codes an engine sends.
_TABLE_0357 = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


class Outcome(enum.StrEnum):
    """What became of a received message."""

    ACCEPTED = "accepted"  # stored and applied
    APPLICATION_ERROR = "application_error"  # stored, but held (unknown sample, unmapped code)
    # stored, but not something this receiver does (an HL7 work-order query): the sender
    # must not send it again
    APPLICATION_REJECTED = "application_rejected"
    REJECTED = "rejected"  # not stored: storage down, or unreadable


class AckMode(enum.StrEnum):
    ORIGINAL = "original"
    ENHANCED = "enhanced"


@dataclass(frozen=True, slots=True)
class AckError:
    """One ERR segment (v2.5 layout): ERR-2 location, ERR-3 code (table 0357), ERR-4 severity,
    ERR-8 user message an operator can act on."""

    code: int = 207
    message: str = ""
    severity: str = "E"  # E error, W warning, I information
    segment: str = ""  # ERR-2.1, e.g. "OBX"
    sequence: int | None = None  # ERR-2.2, 1-based occurrence of that segment
    field_number: int | None = None  # ERR-2.3

    @property
    def code_text(self) -> str:
        return _TABLE_0357.get(self.code, "")


def _table_0155(value: str) -> str:
    """PROTOCOLS 88: a value outside table 0155 (Mindray BS's 0/1/2 result flag) is "not set"."""
    value = value.strip().upper()
    return value if value in ACK_TABLE_0155 else ""


def ack_mode(msh15: str, msh16: str) -> AckMode:
    """PROTOCOLS 87: original mode when MSH-15 and MSH-16 are both empty (or not table 0155)."""
    if _table_0155(msh15) or _table_0155(msh16):
        return AckMode.ENHANCED
    return AckMode.ORIGINAL


def _wanted(condition: str, error: bool) -> bool:
    # PROTOCOLS 88: AL always, NE never, ER only on error, SU only on success. An empty field in
    # enhanced mode is read as AL: answering is safer than leaving the sender waiting [derived].
    if condition in ("", "AL"):
        return True
    if condition == "NE":
        return False
    if condition == "ER":
        return error
    return not error  # SU


# The application ACK's code for each outcome of a stored message.
_APPLICATION_CODE = {Outcome.ACCEPTED: "AA", Outcome.APPLICATION_ERROR: "AE",
                     Outcome.APPLICATION_REJECTED: "AR"}


def ack_plan(msh15: str, msh16: str, outcome: Outcome) -> list[str]:
    """The MSA-1 codes to send, in order, for a message with this MSH-15/16 and ``outcome``.

    Original mode (PROTOCOLS 84, 87): one application ACK, ``AA`` / ``AE`` / ``AR``.
    Enhanced mode: an accept ACK (``CA``, or ``CR`` when the message was not stored) when
    MSH-15 asks for it, then an application ACK (``AA`` / ``AE``, ``AR`` for a message
    stored but refused as not supported) when MSH-16 asks for it. A
    message that was not stored gets no application ACK (it was never processed), except
    when MSH-15 suppresses the commit reject: then ``AR`` is sent if MSH-16 allows it, so the
    sender is told to resend (DESIGN rule 2).
    """
    outcome = Outcome(outcome)
    if ack_mode(msh15, msh16) is AckMode.ORIGINAL:
        return ["AR" if outcome is Outcome.REJECTED else _APPLICATION_CODE[outcome]]
    accept_condition = _table_0155(msh15)
    app_condition = _table_0155(msh16)
    codes: list[str] = []
    if outcome is Outcome.REJECTED:
        if _wanted(accept_condition, error=True):
            codes.append("CR")
        elif _wanted(app_condition, error=True):
            codes.append("AR")
        return codes
    if _wanted(accept_condition, error=False):
        codes.append("CA")
    if _wanted(app_condition, error=outcome is not Outcome.ACCEPTED):
        codes.append(_APPLICATION_CODE[outcome])
    return codes


def is_ack(message: HL7Message | bytes) -> bool:
    """PROTOCOLS 89: True when the message is itself an acknowledgement (never answer it)."""
    if isinstance(message, bytes):
        raw = message
        try:
            message = parse_message(raw, header_only=True)
        except HL7ParseError:
            # Unreadable MSH: look for ACK in the raw header so a broken ACK is not answered,
            # with the field and component separators the header itself declares.
            start = raw.find(b"MSH")
            if start < 0 or len(raw) < start + 5:
                return False
            field_sep, component_sep = raw[start + 3:start + 4], raw[start + 4:start + 5]
            head = raw[start:].split(b"\r", 1)[0].split(b"\n", 1)[0]
            return any(
                part.split(component_sep, 1)[0].strip() in (b"ACK", b"MCF", b"QCK")
                for part in head.split(field_sep)[7:11]
            )
    return message.message_type in ACK_MESSAGE_TYPES


def format_hl7_timestamp(moment: datetime) -> str:
    """``YYYYMMDDHHMMSS`` plus ``+ZZZZ`` when the datetime is timezone-aware."""
    text = moment.strftime("%Y%m%d%H%M%S")
    if moment.tzinfo is not None:
        text += moment.strftime("%z")
    return text


def _timestamp(value: datetime | str) -> str:
    return format_hl7_timestamp(value) if isinstance(value, datetime) else value


def _err_segment(error: AckError, seps: Separators) -> str:
    c, f = seps.component, seps.field
    location = ""
    if error.segment:
        parts = [
            escape(error.segment, seps),
            "" if error.sequence is None else str(error.sequence),
            "" if error.field_number is None else str(error.field_number),
        ]
        location = c.join(parts).rstrip(c)
    code = c.join([str(error.code), escape(error.code_text, seps), "HL70357"])
    severity = error.severity if error.severity in ("E", "W", "I") else "E"
    return f"ERR{f}{f}{location}{f}{code}{f}{severity}{f}{f}{f}{f}{escape(error.message, seps)}"


def build_ack(
    original: HL7Message | Segment,
    code: str,
    control_id: str,
    timestamp: datetime | str,
    *,
    text: str = "",
    errors: Sequence[AckError] = (),
    encoding: str | None = None,
) -> bytes:
    """Build the ACK for ``original`` (PROTOCOLS 83-86).

    ``original`` may be the parsed message or only its MSH segment. The ACK uses the
    original's separators, so fields copied from it need no re-escaping; sender and
    receiver are swapped, MSH-9 is ``ACK^<trigger>^ACK``, MSH-11/12 and MSH-18 are copied,
    MSA-2 echoes the original MSH-10 and MSA-3 carries ``text`` (read by v2.3 analyzers such
    as Mindray). Each :class:`AckError` becomes an ERR segment. Returns bytes without MLLP
    framing, segments ended by CR, encoded like the original.
    """
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise ValueError(f"MSA-1 code {code!r} is not one of table 0008 (AA AE AR CA CE CR)")
    if isinstance(original, HL7Message):
        msh = original.msh
        codec = encoding or original.encoding
    else:
        msh = original
        codec = encoding or "utf-8"
    seps = msh.seps
    f = seps.field
    trigger = msh.component(9, 2)
    msh_fields = [
        "MSH",
        seps.encoding_characters,
        msh.raw(5),
        msh.raw(6),
        msh.raw(3),
        msh.raw(4),
        escape(_timestamp(timestamp), seps),
        "",
        seps.component.join(["ACK", escape(trigger, seps), "ACK"]),
        escape(control_id, seps),
        msh.raw(11),
        msh.raw(12),
    ]
    msh18 = msh.raw(18)
    if msh18:
        msh_fields.extend(["", "", "", "", "", msh18])
    segments = [
        f.join(msh_fields),
        f.join(["MSA", code, msh.raw(10), escape(text, seps)]).rstrip(f),
    ]
    segments.extend(_err_segment(error, seps) for error in errors)
    return ("\r".join(segments) + "\r").encode(codec, errors="replace")


_MAX_CONTROL_ID = 199  # MSH-10 is ST(199) in HL7 2.5


def _echoable(msh9: str, msh10: str, seps: Separators) -> bool:
    """Whether a broken message's MSH-10 can be echoed in MSA-2 as it is: the field
    before it is a message type (so nothing before it is shifted), and it is a plain value
    (printable, no delimiter: written back byte for byte, nothing to escape)."""
    return (bool(MESSAGE_CODE.match(msh9.split(seps.component)[0]))
            and 0 < len(msh10) <= _MAX_CONTROL_ID and msh10.isprintable()
            and not any(c in msh10 for c in (seps.component, seps.repetition, seps.escape,
                                              seps.subcomponent, seps.field)))


def build_reject_ack(
    raw: bytes,
    control_id: str,
    timestamp: datetime | str,
    *,
    text: str,
    error_code: int = 207,
) -> bytes | None:
    """Best-effort ``AR`` for a message too broken to parse (PROTOCOLS 83, 89).

    The reader of the MSH is lenient here: separators and MSH-3..6/11/12 are taken where they
    can be found. MSA-2 echoes MSH-10 (PROTOCOLS 85: how the sender matches the answer to
    its message; one it cannot match it resends, PROTOCOLS 91) when the MSH is whole up to
    there: MSH-9 holds a message type where it should, and MSH-10 is a plain value. A
    sender whose MSH lost a field (MSH-7 missing, corpus hmis_lis_rsp_to_ba400__1) has its
    control id one field early, and then MSA-2 is left empty. Returns None
    when there is no MSH at all, or when the broken message is itself an ACK (never answer
    an ACK): the adapter then sends nothing and logs.
    """
    idx = raw.find(b"MSH")
    if idx < 0 or len(raw) < idx + 8:
        return None
    if is_ack(raw[idx:]):
        return None
    head = raw[idx:]
    for terminator in (b"\r", b"\n"):
        cut = head.find(terminator)
        if cut >= 0:
            head = head[:cut]
    line = head.decode("latin-1")
    fsep = line[3]
    seps = DEFAULT_SEPARATORS
    if not fsep.isalnum() and fsep not in " \t":
        enc = line.split(fsep)[1] if len(line.split(fsep)) > 1 else ""
        if len(enc) >= 4 and len(set(enc[:4])) == 4 and fsep not in enc[:4]:
            seps = Separators(
                field=fsep,
                component=enc[0],
                repetition=enc[1],
                escape=enc[2],
                subcomponent=enc[3],
            )
    else:
        fsep = "|"
    if seps.field != fsep:
        seps = DEFAULT_SEPARATORS
        fsep = "|"
    parts = line.split(fsep)
    parts.insert(1, fsep)

    def part(n: int) -> str:
        return parts[n] if n < len(parts) else ""

    version = part(12) if part(12)[:2] == "2." else "2.5"
    echoed = part(10) if _echoable(part(9), part(10), seps) else ""
    trigger = part(9).split(seps.component)[1] if seps.component in part(9) else ""
    segments = [
        fsep.join(
            [
                "MSH",
                seps.encoding_characters,
                part(5),
                part(6),
                part(3),
                part(4),
                escape(_timestamp(timestamp), seps),
                "",
                seps.component.join(["ACK", escape(trigger, seps), "ACK"]),
                escape(control_id, seps),
                "P",
                escape(version, seps),
            ]
        ),
        fsep.join(["MSA", "AR", echoed, escape(text, seps)]),
        _err_segment(AckError(code=error_code, message=text), seps),
    ]
    return ("\r".join(segments) + "\r").encode("latin-1", errors="replace")
