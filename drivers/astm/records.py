"""ASTM E1394 / CLSI LIS2-A2 record codec.

Decoding keeps raw text next to decoded text: a :class:`Record` holds the record line
exactly as received (``raw``) and its fields still escaped; :meth:`Record.value`
splits repeats and components and resolves escape sequences on demand.

Delimiters come from the H record of each message (PROTOCOLS 47-49); records end with
CR, and stored files with LF or CRLF are tolerated (PROTOCOLS 46).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

__all__ = [
    "DEFAULT_DELIMITERS",
    "Delimiters",
    "Record",
    "check_hierarchy",
    "encode_field",
    "encode_header",
    "encode_message",
    "encode_record",
    "escape",
    "is_header_line",
    "parse_message",
    "split_messages",
    "split_record_lines",
    "unescape",
]

_RECORD_SPLIT = re.compile(rb"\r\n|\r|\n")
_RECORD_SPLIT_STR = re.compile(r"\r\n|\r|\n")
_HEX = re.compile(r"^[0-9A-Fa-f]*$")


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The four delimiters a message declares in its H record (PROTOCOLS 47)."""

    field: str = "|"
    repeat: str = "\\"
    component: str = "^"
    escape: str = "&"

    def __post_init__(self) -> None:
        chars = (self.field, self.repeat, self.component, self.escape)
        # PROTOCOLS 48: one character each, all different, never CR/LF.
        if any(len(c) != 1 for c in chars):
            raise ValueError(f"ASTM delimiters must be single characters, got {chars!r}")
        if len(set(chars)) != 4:
            raise ValueError(f"ASTM delimiters must all differ, got {''.join(chars)!r}")
        if any(c in "\r\n" or c.isalnum() for c in chars):
            raise ValueError(
                f"ASTM delimiters may not be CR, LF or alphanumeric, got {''.join(chars)!r}"
            )

    @property
    def header(self) -> str:
        """The ``H|\\^&`` prefix that declares these delimiters."""
        return f"H{self.field}{self.repeat}{self.component}{self.escape}"

    @classmethod
    def from_header(cls, line: str) -> tuple[Delimiters, str]:
        """Read the delimiters from an H record line; returns (delimiters, warning).

        A doubled character in the delimiter definition (``H|\\\\^&``, a copy artefact
        seen in corpus:abbott_architect_i1000sr__3 and horiba_yumizen_h550__1) is read
        once, with a warning, rather than failing the whole message.
        """
        if len(line) < 2 or line[0] not in "Hh":
            raise ValueError("an ASTM message must start with an H record")
        field_delim = line[1]
        end = line.find(field_delim, 2)
        spec = line[2:] if end < 0 else line[2:end]
        warning = ""
        if len(set(spec)) < len(spec):
            deduped = "".join(dict.fromkeys(spec))
            warning = f"H-2 delimiter definition {spec!r} repeats a character; read as {deduped!r}"
            spec = deduped
        if len(spec) < 3:
            raise ValueError(f"H-2 must declare repeat, component and escape delimiters: {spec!r}")
        return cls(field_delim, spec[0], spec[1], spec[2]), warning


DEFAULT_DELIMITERS = Delimiters()


def unescape(text: str, delims: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Resolve LIS2-A2 escape sequences (PROTOCOLS 50-51).

    ``&F& &S& &R& &E&`` give the delimiters back, ``&Xhhhh&`` gives the bytes (read as
    Latin-1), ``&H&``/``&N&`` (highlighting) are dropped, ``&Z..&`` and anything
    unrecognised or unterminated is kept verbatim. Sequences never nest.
    """
    esc = delims.escape
    if esc not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != esc:
            out.append(ch)
            i += 1
            continue
        end = text.find(esc, i + 1)
        if end < 0:
            out.append(text[i:])
            break
        body = text[i + 1 : end]
        replacement: str | None
        if body == "F":
            replacement = delims.field
        elif body == "S":
            replacement = delims.component
        elif body == "R":
            replacement = delims.repeat
        elif body == "E":
            replacement = delims.escape
        elif body in ("H", "N"):
            replacement = ""
        elif (body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1 and _HEX.match(body[1:])
              and "00" not in _pairs(body[1:])):
            # (a NUL has no place in a value, and PostgreSQL refuses it: kept as sent)
            replacement = bytes.fromhex(body[1:]).decode("latin-1")
        else:
            replacement = None
        if replacement is None:
            # Not a sequence we know: keep the escape character literally and go on
            # scanning after it, so a stray '&' in free text survives unchanged.
            out.append(ch)
            i += 1
            continue
        out.append(replacement)
        i = end + 1
    return "".join(out)


def escape(text: str, delims: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape a component value so it survives any delimiter (PROTOCOLS 50).

    CR, LF and the other characters LIS01-A2 forbids in text (PROTOCOLS 37, 45) are
    written as ``&Xhh&`` so the encoded record never breaks the link layer.
    """
    out: list[str] = []
    for ch in text:
        if ch == delims.escape:
            out.append(f"{delims.escape}E{delims.escape}")
        elif ch == delims.field:
            out.append(f"{delims.escape}F{delims.escape}")
        elif ch == delims.component:
            out.append(f"{delims.escape}S{delims.escape}")
        elif ch == delims.repeat:
            out.append(f"{delims.escape}R{delims.escape}")
        elif (ord(ch) < 0x20 and ch not in "\t\x07\x0b\x0c") or ord(ch) in (0x7F, 0xFF):
            out.append(f"{delims.escape}X{ord(ch):02X}{delims.escape}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Record:
    """One record: ``fields[0]`` is the type (as sent), ``fields[n-1]`` is field n."""

    raw: str
    fields: tuple[str, ...]
    delimiters: Delimiters
    # Record type, upper-cased (PROTOCOLS 55: case-insensitive). Worked out once: a decode
    # asks for it several times per record.
    type: str = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rtype = self.fields[0].strip().upper()[:1] if self.fields else ""
        object.__setattr__(self, "type", rtype)

    @property
    def sequence(self) -> str:
        return self.field(2)

    def field(self, number: int) -> str:
        """Field ``number`` (1-based, as in ``R-4``), still escaped; '' when absent."""
        # PROTOCOLS 52: trailing empty fields may be left out.
        return self.fields[number - 1] if 0 < number <= len(self.fields) else ""

    def repeats(self, number: int) -> list[str]:
        raw = self.field(number)
        if number == 2 and self.type == "H":
            return [raw]  # PROTOCOLS 49: H-2 is the delimiter definition itself
        return raw.split(self.delimiters.repeat)

    def components(self, number: int, repeat: int = 0) -> list[str]:
        """Components of one repeat of a field, each unescaped."""
        raw = self.fields[number - 1] if 0 < number <= len(self.fields) else ""
        if number == 2 and self.type == "H":
            return [raw] if repeat == 0 else [""]  # PROTOCOLS 49, as in repeats()
        delims = self.delimiters
        reps = raw.split(delims.repeat)
        if repeat >= len(reps):
            return [""]
        parts = reps[repeat].split(delims.component)
        if delims.escape not in reps[repeat]:
            return parts  # nothing to unescape: the common case, spared a call per component
        return [unescape(c, delims) for c in parts]

    def value(self, number: int, component: int = 1, repeat: int = 0) -> str:
        """One component (1-based) of one repeat of a field, unescaped; '' when absent."""
        raw = self.fields[number - 1] if 0 < number <= len(self.fields) else ""
        delims = self.delimiters
        if (repeat == 0 and delims.repeat not in raw and delims.component not in raw
                and delims.escape not in raw and not (number == 2 and self.type == "H")):
            # a plain field (most are): it is its own first component, there is no other
            return raw if component == 1 else ""
        comps = self.components(number, repeat)
        return comps[component - 1] if 0 < component <= len(comps) else ""

    def text(self, number: int) -> str:
        """The whole field unescaped, delimiters kept (for display of free text)."""
        return unescape(self.field(number), self.delimiters)


def split_record_lines(text: bytes) -> list[bytes]:
    """Split on CR, LF or CRLF; empty lines are dropped (PROTOCOLS 46)."""
    return [line for line in _RECORD_SPLIT.split(text) if line.strip(b" \t\x00")]


def is_header_line(line: bytes | str) -> bool:
    """True when a line looks like an H record: ``H`` then a non-alphanumeric delimiter."""
    if isinstance(line, bytes):
        line = line.decode("latin-1")
    line = line.lstrip(" \t")
    return len(line) >= 5 and line[0] in "Hh" and not line[1].isalnum() and line[1] not in " \r\n"


def split_messages(text: bytes) -> list[bytes]:
    """Split a session's joined text into H...L messages (PROTOCOLS 59).

    Records are re-joined with CR. A new H record starts a new message even when the
    previous one had no L record (corpus:mindray_cl8000i__1, abbott_m2000rt__1); text
    before the first H record is returned as its own chunk so nothing is lost.
    """
    messages: list[bytes] = []
    current: list[bytes] = []
    field_delim = b"|"
    for line in split_record_lines(text):
        stripped = line.lstrip(b" \t")
        if is_header_line(stripped):
            if current:
                messages.append(b"\r".join(current) + b"\r")
            current = [stripped]
            field_delim = stripped[1:2]
            continue
        current.append(line)
        if stripped[:1] in (b"L", b"l") and (len(stripped) == 1 or stripped[1:2] == field_delim):
            messages.append(b"\r".join(current) + b"\r")
            current = []
    if current:
        messages.append(b"\r".join(current) + b"\r")
    return messages


def parse_message(text: bytes | str, encoding: str = "latin-1") -> tuple[list[Record], list[str]]:
    """Parse one H...L message into records; returns (records, warnings).

    Raises ``ValueError`` when the text does not start with an H record, since the
    delimiters are then unknown.
    """
    decoded = text.decode(encoding, errors="replace") if isinstance(text, bytes) else text
    lines = [ln for ln in _RECORD_SPLIT_STR.split(decoded) if ln.strip(" \t\x00")]
    if not lines:
        raise ValueError("empty ASTM message")
    first = lines[0].lstrip(" \t")
    if not is_header_line(first):
        raise ValueError(f"an ASTM message must start with an H record, got {first[:1]!r}")
    delims, warning = Delimiters.from_header(first)
    warnings = [warning] if warning else []
    records: list[Record] = []
    for index, line in enumerate(lines):
        if index == 0:
            line = first
        fields = line.split(delims.field)
        records.append(Record(raw=line, fields=tuple(fields), delimiters=delims))
    warnings.extend(check_hierarchy(records))
    return records, warnings


# PROTOCOLS 58: hierarchy levels. C and M take the level below their parent.
_LEVEL = {"H": 0, "P": 1, "Q": 1, "S": 1, "O": 2, "R": 3, "L": 0}


def check_hierarchy(records: Sequence[Record]) -> list[str]:
    """Warnings (never rejections) for hierarchy and sequence deviations (PROTOCOLS 60-63)."""
    warnings: list[str] = []
    if not records:
        return warnings
    if records[0].type != "H":
        warnings.append("message does not start with an H record")
    if records[-1].type != "L":
        warnings.append("message does not end with an L record")
    # expected next sequence number per record type, reset by a higher-level record
    expected: dict[str, int] = {}
    seen_p = seen_o = False
    for position, rec in enumerate(records, start=1):
        rtype = rec.type
        if rtype in ("C", "M"):
            if position > 1 and records[position - 2].type == "L":
                warnings.append(f"record {position}: {rtype} record follows L")
            continue
        level = _LEVEL.get(rtype)
        if level is None:
            warnings.append(f"record {position}: unknown record type {rec.fields[0][:1]!r}")
            continue
        if rtype == "O" and not seen_p:
            warnings.append(f"record {position}: O record without a preceding P record")
        if rtype == "R" and not seen_o:
            warnings.append(f"record {position}: R record without a preceding O record")
        if rtype == "P":
            seen_p, seen_o = True, False
        elif rtype == "O":
            seen_o = True
        if rtype in ("H", "L"):
            expected.clear()
            continue
        # a record of this level restarts the numbering of every lower level
        for other, other_level in _LEVEL.items():
            if other_level > level:
                expected.pop(other, None)
        want = expected.get(rtype, 1)
        seq = rec.sequence.strip()
        if seq != str(want):
            warnings.append(
                f"record {position}: {rtype} sequence number {seq or '(empty)'!r}, "
                f"expected {want} (PROTOCOLS 63)"
            )
        try:
            expected[rtype] = int(seq) + 1
        except ValueError:
            expected[rtype] = want + 1
    return warnings


# ---------------------------------------------------------------------------- encoder

FieldValue = str | tuple[str, ...] | list[tuple[str, ...]]
"""A field to encode: plain text, a tuple of components, or a list of repeats."""


def encode_field(value: FieldValue, delims: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Encode one field, escaping every component (PROTOCOLS 50)."""
    if isinstance(value, str):
        return escape(value, delims)
    if isinstance(value, tuple):
        return delims.component.join(escape(c, delims) for c in value)
    return delims.repeat.join(
        delims.component.join(escape(c, delims) for c in rep) for rep in value
    )


def encode_record(
    record_type: str, fields: Sequence[FieldValue], delims: Delimiters = DEFAULT_DELIMITERS
) -> str:
    """Build one record (without its CR): ``fields[0]`` is field 2 (the sequence number).

    Trailing empty fields are dropped (PROTOCOLS 52).
    """
    if len(record_type) != 1 or not record_type.isalpha() or record_type.upper() == "H":
        raise ValueError(f"record type must be one letter other than H, got {record_type!r}")
    encoded = [encode_field(f, delims) for f in fields]
    while encoded and encoded[-1] == "":
        encoded.pop()
    return delims.field.join([record_type, *encoded])


def encode_header(fields: Sequence[FieldValue], delims: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Build an H record: ``fields[0]`` is H-3 (message control id)."""
    encoded = [encode_field(f, delims) for f in fields]
    while encoded and encoded[-1] == "":
        encoded.pop()
    head = delims.header
    return delims.field.join([head, *encoded]) if encoded else head


def encode_message(records: Iterable[str], encoding: str = "latin-1") -> bytes:
    """Join records with CR (record terminator, PROTOCOLS 46) in the interface encoding."""
    return "".join(r + "\r" for r in records).encode(encoding)


def _pairs(hex_digits: str) -> list[str]:
    """``"0D0A"`` -> ``["0D", "0A"]``: the bytes a hex escape names."""
    return [hex_digits[i:i + 2] for i in range(0, len(hex_digits), 2)]
