"""A lean HL7 v2 tokenizer (PROTOCOLS 79-82).

Segments and fields are split eagerly with ``str.split`` (fast, in C); components,
subcomponents and repetitions are split only when a value is read, and escape sequences are
undone only then (PROTOCOLS 81). The character set is read from MSH-18 in the raw bytes
(ASCII-safe) before the message is decoded, unless the interface overrides it (PROTOCOLS 82).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from engine.errors import RemoteProtocolError

__all__ = [
    "MESSAGE_CODE",
    "HL7Message",
    "HL7ParseError",
    "Segment",
    "Separators",
    "charset_codec",
    "escape",
    "parse_hl7_datetime",
    "parse_message",
    "split_messages",
    "unescape",
]


class HL7ParseError(RemoteProtocolError):
    """The bytes are not an HL7 v2 message we can read; the text says what and where."""

    def __init__(self, reason: str, *, segment_index: int | None = None, field: str = "") -> None:
        where = []
        if segment_index is not None:
            where.append(f"segment {segment_index + 1}")
        if field:
            where.append(field)
        text = f"{reason} ({', '.join(where)})" if where else reason
        super().__init__(text)
        self.reason = reason
        self.segment_index = segment_index
        self.field = field


@dataclass(frozen=True, slots=True)
class Separators:
    """The delimiters of one message: MSH-1 and the characters of MSH-2 (PROTOCOLS 80)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""
    # the codec the message's bytes were decoded with (MSH-18, or the interface's
    # override): the bytes of a \Xhh..\ escape are text in that character set
    codec: str = ""

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it should be written back."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_SEPARATORS = Separators()


# --------------------------------------------------------------------------- escapes

_HIGHLIGHT_AND_FORMAT_DROPPED = frozenset({"H", "N", ".fi", ".nf"})


def unescape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Undo HL7 escape sequences (PROTOCOLS 81).

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` give the separators back, ``\\Xhh..\\`` the bytes they name
    (text in the message's character set, ``seps.codec``; where that is not known or the
    bytes do not fit it, UTF-8 if valid, else Latin-1; kept as sent when they include a
    NUL, which no value holds and PostgreSQL refuses), ``\\.br\\`` and ``\\.sp\\`` a line
    break; highlighting (``\\H\\``/``\\N\\``) and the other formatting commands are
    dropped; anything unknown (such as a local ``\\Z..\\``) is kept as sent so no
    information is lost.
    """
    esc = seps.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    pos = 0
    length = len(value)
    while pos < length:
        start = value.find(esc, pos)
        if start < 0:
            out.append(value[pos:])
            break
        stop = value.find(esc, start + 1)
        if stop < 0:  # unterminated: keep as sent
            out.append(value[pos:])
            break
        out.append(value[pos:start])
        code = value[start + 1 : stop]
        out.append(_unescape_one(code, seps, value[start : stop + 1]))
        pos = stop + 1
    return "".join(out)


def _unescape_one(code: str, seps: Separators, literal: str) -> str:
    simple = {
        "F": seps.field,
        "S": seps.component,
        "T": seps.subcomponent,
        "R": seps.repetition,
        "E": seps.escape,
        "P": seps.truncation or literal,
    }
    if code in simple:
        return simple[code]
    if code in (".br", ".sp") or code.startswith(".sp"):
        return "\n"
    if code in _HIGHLIGHT_AND_FORMAT_DROPPED or code[:3] in (".in", ".ti", ".sk", ".ce"):
        return ""
    if code[:1] == "X" and len(code) > 1 and len(code) % 2 == 1:
        try:
            data = bytes.fromhex(code[1:])
        except ValueError:
            return literal
        if 0 in data:
            return literal
        if seps.codec:
            # PROTOCOLS 81-82: the bytes are text in the message's character set
            try:
                return data.decode(seps.codec)
            except (UnicodeDecodeError, LookupError):
                pass  # not text in that set after all: read as below
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    if code[:1] in ("C", "M"):  # character set switches: the decoder already handled them
        return ""
    return literal


def escape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Escape text for an HL7 field: delimiters become escape sequences, line breaks
    ``\\.br\\``, other control characters are dropped (they could break MLLP framing)."""
    out: list[str] = []
    table = {
        seps.escape: f"{seps.escape}E{seps.escape}",
        seps.field: f"{seps.escape}F{seps.escape}",
        seps.component: f"{seps.escape}S{seps.escape}",
        seps.subcomponent: f"{seps.escape}T{seps.escape}",
        seps.repetition: f"{seps.escape}R{seps.escape}",
    }
    if seps.truncation:
        table[seps.truncation] = f"{seps.escape}P{seps.escape}"
    text = value.replace("\r\n", "\n")
    for char in text:
        mapped = table.get(char)
        if mapped is not None:
            out.append(mapped)
        elif char in "\r\n":
            out.append(f"{seps.escape}.br{seps.escape}")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            continue
        else:
            out.append(char)
    return "".join(out)


# --------------------------------------------------------------------------- segments


class Segment:
    """One segment. Field numbers follow HL7: ``field(1)`` is the first field after the name;
    for MSH, ``field(1)`` is the field separator itself and ``field(2)`` the encoding
    characters (PROTOCOLS 80), neither split nor unescaped."""

    __slots__ = ("fields", "index", "name", "plain", "seps")

    def __init__(
        self,
        name: str,
        fields: list[str],
        seps: Separators,
        index: int,
        plain: bool | None = None,
    ) -> None:
        self.name = name
        self.fields = fields  # fields[0] is the name; fields[n] is field n
        self.seps = seps
        self.index = index
        # What is_plain() answers; None until known (parse_message knows it for most).
        self.plain = plain

    def __repr__(self) -> str:
        return f"<Segment {self.name} #{self.index + 1} ({len(self.fields) - 1} fields)>"

    def __len__(self) -> int:
        return len(self.fields) - 1

    def is_plain(self) -> bool:
        """True when no field holds a repetition, escape or subcomponent character. Then
        ``component(n, c)`` is simply component ``c`` of ``raw(n).split(component separator)``
        and ``field(n)`` is ``raw(n)``, so hot paths may split once instead. Always False for
        MSH, whose MSH-1 and MSH-2 are read differently. Worked out once: the fields are not
        changed after parsing."""
        plain = self.plain
        if plain is None:
            seps = self.seps
            text = seps.field.join(self.fields)
            plain = self.plain = self.name != "MSH" and not (
                seps.repetition in text or seps.escape in text or seps.subcomponent in text
            )
        return plain

    def raw(self, n: int) -> str:
        """Field ``n`` exactly as sent (all repetitions, separators and escapes); "" if absent."""
        fields = self.fields
        return fields[n] if 0 < n < len(fields) else ""

    def repetitions(self, n: int) -> list[str]:
        """The raw repetitions of field ``n`` (``[]`` when empty)."""
        value = self.raw(n)
        if not value:
            return []
        if self.name == "MSH" and n <= 2:
            return [value]
        return value.split(self.seps.repetition)

    def field(self, n: int, rep: int = 1) -> str:
        """Repetition ``rep`` (1-based) of field ``n``, unescaped. For a field with components
        this keeps the component separators; read structured fields with :meth:`component`."""
        value = self.raw(n)
        if not value or (self.name == "MSH" and n <= 2):
            return value
        seps = self.seps
        if seps.repetition in value:
            parts = value.split(seps.repetition)
            value = parts[rep - 1] if rep <= len(parts) else ""
        elif rep != 1:
            return ""
        return unescape(value, seps) if seps.escape in value else value

    def component(self, n: int, c: int = 1, rep: int = 1, sub: int | None = None) -> str:
        """Component ``c`` (1-based) of repetition ``rep`` of field ``n``, unescaped; with
        ``sub``, that subcomponent of the component."""
        value = self.raw(n)
        if not value or (self.name == "MSH" and n <= 2):
            return value if c == 1 and sub in (None, 1) else ""
        seps = self.seps
        if seps.repetition in value:
            parts = value.split(seps.repetition)
            value = parts[rep - 1] if rep <= len(parts) else ""
        elif rep != 1:
            return ""
        if seps.component in value:
            comps = value.split(seps.component)
            value = comps[c - 1] if c <= len(comps) else ""
        elif c != 1:
            return ""
        if sub is not None:
            if seps.subcomponent in value:
                subs = value.split(seps.subcomponent)
                value = subs[sub - 1] if sub <= len(subs) else ""
            elif sub != 1:
                return ""
        return unescape(value, seps) if seps.escape in value else value

    def components(self, n: int, rep: int = 1) -> list[str]:
        """All components of repetition ``rep`` of field ``n``, unescaped."""
        value = self.raw(n)
        seps = self.seps
        if seps.repetition in value:
            parts = value.split(seps.repetition)
            value = parts[rep - 1] if rep <= len(parts) else ""
        elif rep != 1:
            return []
        if not value:
            return []
        return [unescape(c, seps) for c in value.split(seps.component)]


# --------------------------------------------------------------------------- messages


@dataclass(slots=True)
class HL7Message:
    """A tokenized HL7 v2 message."""

    raw: bytes
    text: str
    encoding: str
    separators: Separators
    segments: list[Segment]
    warnings: list[str] = field(default_factory=list)

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def segment(self, name: str) -> Segment | None:
        """The first segment called ``name``, or None."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        return None

    def segments_named(self, name: str) -> list[Segment]:
        return [seg for seg in self.segments if seg.name == name]

    @property
    def message_type(self) -> str:
        """MSH-9.1, e.g. ``ORU``."""
        return self.msh.component(9, 1)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``R01``."""
        return self.msh.component(9, 2)

    @property
    def message_structure(self) -> str:
        """MSH-9.3, e.g. ``OUL_R22`` ("" when the sender leaves it out)."""
        return self.msh.component(9, 3)

    @property
    def control_id(self) -> str:
        """MSH-10."""
        return self.msh.field(10)

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. ``2.5.1``."""
        return self.msh.component(12, 1)


# Table 0211 names (and the non-standard ones real analyzers send, PROTOCOLS 82) -> Python codecs.
_CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "ISO IR14": "iso2022_jp",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "ISO IR100": "latin-1",
    "ISO IR101": "iso8859_2",
    "ISO IR109": "iso8859_3",
    "ISO IR110": "iso8859_4",
    "ISO IR144": "iso8859_5",
    "ISO IR127": "iso8859_6",
    "ISO IR126": "iso8859_7",
    "ISO IR138": "iso8859_8",
    "ISO IR148": "iso8859_9",
    "8859/1": "latin-1",
    "8859/2": "iso8859_2",
    "8859/3": "iso8859_3",
    "8859/4": "iso8859_4",
    "8859/5": "iso8859_5",
    "8859/6": "iso8859_6",
    "8859/7": "iso8859_7",
    "8859/8": "iso8859_8",
    "8859/9": "iso8859_9",
    "8859/15": "iso8859_15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


def charset_codec(msh18: str) -> str | None:
    """The Python codec for an MSH-18 value (all repetitions considered), None if unknown.

    ``~ISO IR87`` (empty default plus JIS X 0208, corpus nihonkohden_mek9100__1) selects
    ISO-2022-JP, which reads plain ASCII unchanged and follows the JIS escape sequences.
    """
    reps = [r.strip().upper() for r in msh18.split("~")]
    codecs = [_CHARSETS.get(r) for r in reps if r]
    if not codecs:
        return None
    for codec in codecs:
        if codec and codec.startswith("iso2022"):
            return codec
    return codecs[0]


_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
# a message code or trigger event: MSH-9 components 1 and 2 (ORU, R01)
MESSAGE_CODE = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_VERSION = re.compile(r"^\d\.\d+(?:\.\d+)?$")


def _msh_field_bytes(raw: bytes, start: int, sep: int, number: int) -> bytes:
    """MSH-``number`` from the raw bytes (ASCII-safe read done before decoding)."""
    line_end = len(raw)
    for terminator in (b"\r", b"\n"):
        idx = raw.find(terminator, start)
        if 0 <= idx < line_end:
            line_end = idx
    parts = raw[start:line_end].split(bytes((sep,)))
    # parts[0] = b"MSH", parts[1] = MSH-2, parts[n-1] = MSH-n
    return parts[number - 1] if number - 1 < len(parts) else b""


def _decode(raw: bytes, start: int, override: str | None, warnings: list[str]) -> tuple[str, str]:
    declared = ""
    if override:
        codec = override
    else:
        msh18 = _msh_field_bytes(raw, start, raw[start + 3], 18).decode("ascii", "replace")
        declared = msh18
        found = charset_codec(msh18) if msh18 else None
        if msh18 and found is None:
            warnings.append(
                f"MSH-18 character set {msh18!r} is not known; decoded as UTF-8. Set the "
                "interface's encoding if text looks wrong"
            )
        codec = found or "utf-8"
    body = raw[start:]
    try:
        return body.decode(codec), codec
    except LookupError as exc:
        raise HL7ParseError(
            f"character set {codec!r} is not a known encoding; fix the interface's encoding "
            "setting",
            segment_index=0,
            field="MSH-18",
        ) from exc
    except UnicodeDecodeError as exc:
        said = f"MSH-18 says {declared!r}" if not override else f"the interface says {codec!r}"
        for fallback in ("utf-8", "cp1252", "latin-1"):
            if fallback == codec:
                continue
            try:
                text = body.decode(fallback)
            except UnicodeDecodeError:
                continue
            warnings.append(
                f"{said} but byte 0x{body[exc.start]:02X} at offset {start + exc.start} does "
                f"not fit it; decoded as {fallback}. Check the analyzer's character set"
            )
            return text, fallback
        raise AssertionError("latin-1 decodes every byte") from exc  # pragma: no cover


def _find_msh(raw: bytes) -> int:
    """Offset of the leading MSH, skipping whitespace, NUL, <VT> and a BOM."""
    pos = 0
    if raw.startswith(b"\xef\xbb\xbf"):
        pos = 3
    length = len(raw)
    while pos < length and raw[pos] in b" \t\r\n\x0b\x0c\x00":
        pos += 1
    return pos


def _separators(fsep: str, msh2: str, codec: str = "") -> Separators:
    """The Separators of MSH-1 ``fsep`` and MSH-2 ``msh2``, for text decoded with
    ``codec``. Cached: nearly every message uses the same few, and Separators is
    immutable. Only MSH-2 of the usual length is kept, so a sender cannot fill memory with
    long ones (and codecs are the few :func:`_decode` chooses from)."""
    if len(msh2) <= 5:
        return _cached_separators(fsep, msh2, codec)
    return _make_separators(fsep, msh2, codec)


def _make_separators(fsep: str, msh2: str, codec: str = "") -> Separators:
    if len(msh2) < 1:
        raise HL7ParseError("MSH-2 encoding characters are missing", segment_index=0, field="MSH-2")
    chars = list(msh2[:5])
    defaults = ["^", "~", "\\", "&"]
    while len(chars) < 4:
        chars.append(defaults[len(chars)])
    if len(set(chars)) != len(chars) or any(c.isalnum() or c.isspace() for c in chars):
        raise HL7ParseError(
            f"MSH-2 encoding characters {msh2!r} are not four distinct punctuation characters",
            segment_index=0,
            field="MSH-2",
        )
    return Separators(
        field=fsep,
        component=chars[0],
        repetition=chars[1],
        escape=chars[2],
        subcomponent=chars[3],
        truncation=chars[4] if len(chars) > 4 else "",
        codec=codec,
    )


_cached_separators = lru_cache(maxsize=64)(_make_separators)


def parse_message(
    raw: bytes, encoding: str | None = None, *, header_only: bool = False
) -> HL7Message:
    """Tokenize one HL7 v2 message.

    ``encoding`` overrides MSH-18 (per interface). ``header_only`` stops after MSH (enough to
    build an ACK, fast). Raises :class:`HL7ParseError` saying what is wrong and where when
    the bytes are not an HL7 message: no MSH first, bad encoding characters, an MSH-9 that is
    not a message type (fields shifted), or an MSH-12 that is not a version.
    """
    start = _find_msh(raw)
    if raw[start : start + 3] != b"MSH" or len(raw) < start + 8:
        preview = raw[start : start + 3].decode("ascii", "replace")
        raise HL7ParseError(
            f"message does not start with an MSH segment (starts with {preview!r}); the sender "
            "did not send HL7 v2, or the stream is out of step",
            segment_index=0,
        )
    sep_byte = raw[start + 3]
    if sep_byte in b"\r\n" or chr(sep_byte).isalnum():
        raise HL7ParseError(
            f"MSH-1 field separator {chr(sep_byte)!r} is not usable", segment_index=0, field="MSH-1"
        )
    warnings: list[str] = []
    text, codec = _decode(raw, start, encoding, warnings)
    fsep = text[3]
    # PROTOCOLS 79: CR is the terminator; LF and CRLF senders are read the same way.
    text_norm = text.replace("\r\n", "\r").replace("\n", "\r") if "\n" in text else text
    lines = text_norm.split("\r", 1) if header_only else text_norm.split("\r")
    if header_only:
        lines = lines[:1]
    msh_fields = lines[0].split(fsep)
    seps = _separators(fsep, msh_fields[1] if len(msh_fields) > 1 else "", codec)
    msh_fields.insert(1, fsep)  # PROTOCOLS 80: MSH-1 is the separator itself
    segments = [Segment("MSH", msh_fields, seps, 0)]
    # Most messages have no repetition, escape or subcomponent after MSH-2: then one scan
    # tells each segment it is plain (Segment.is_plain); otherwise each finds out if asked.
    after_msh = len(lines[0])
    plain = not any(
        text_norm.find(char, after_msh) >= 0
        for char in (seps.repetition, seps.escape, seps.subcomponent)
    )
    known_names: set[str] = set()  # names already checked: most repeat (25 OBX)
    for number, line in enumerate(lines[1:], start=2):
        if not line or line.isspace():
            continue
        fields = line.split(fsep)
        name = fields[0]
        if name not in known_names:
            if len(name) != 3 or not _SEGMENT_NAME.match(name):
                stripped = name.strip().strip("\x1c\x0b")
                if not stripped and len(fields) == 1:
                    continue
                if len(fields) > 1:
                    # A segment whose name is damaged (``OBx``, `` OBX``, ``0BX``): dropping
                    # it would apply the rest and answer AA with a result lost. Refuse the
                    # message so that the sender resends it.
                    raise HL7ParseError(
                        f"line {number} has fields but {name[:12]!r} is not a segment name "
                        "(three characters, an uppercase letter then uppercase letters or "
                        "digits): the segment is damaged"
                    )
                # Text with no field separator (a heading printed with the message, corpus
                # mindray_polish_site__1) holds no value: ignored with a warning.
                warnings.append(
                    f"line {number} does not start with a segment name "
                    f"({stripped[:12]!r}...); it was ignored"
                )
                continue
            known_names.add(name)
        if name == "MSH":
            # Two messages in one block would mix one message's results into the other's
            # specimen and ACK only the first: refuse rather than guess.
            raise HL7ParseError(
                "a second MSH segment was found: the block holds more than one message. The "
                "sender must send one message per MLLP block (a file is split with "
                "split_messages)",
                segment_index=len(segments),
                field="MSH",
            )
        segments.append(Segment(name, fields, seps, len(segments), plain or None))
    message = HL7Message(raw, text, codec, seps, segments, warnings)
    _check_header(message)
    return message


def _check_header(message: HL7Message) -> None:
    msh = message.msh
    msg_type = msh.component(9, 1)
    if not MESSAGE_CODE.match(msg_type):
        hint = ""
        for n in (7, 8, 10, 11):
            if MESSAGE_CODE.match(msh.component(n, 1)) and msh.component(n, 2):
                hint = (
                    f"; MSH-{n} holds {msh.raw(n)!r}, so a field is "
                    f"{'missing' if n < 9 else 'extra'} before it (the sender's MSH is "
                    "shifted, e.g. MSH-7 date/time left out)"
                )
                break
        shown = msh.raw(9)[:20]
        raise HL7ParseError(
            f"MSH-9 message type {shown!r} is not an HL7 message type such as ORU^R01{hint}. "
            "The sender must fix its MSH segment",
            segment_index=0,
            field="MSH-9",
        )
    version = msh.component(12, 1)
    if not version:
        message.warnings.append("MSH-12 version is empty; read as HL7 2.x")
    elif not _VERSION.match(version):
        raise HL7ParseError(
            f"MSH-12 version {version[:20]!r} is not an HL7 version such as 2.5.1; the "
            "sender's MSH fields are probably shifted",
            segment_index=0,
            field="MSH-12",
        )


_SPLIT_AT_MSH = re.compile(rb"(?:^|\r\n|\r|\n)[\x0b\x0c\x00 \t]*(?=MSH)")


def split_messages(data: bytes) -> list[bytes]:
    """Split a file holding one or many messages at each line that starts with ``MSH``.

    Segment ends may be CR, LF or CRLF; blank lines, a leading ``<VT>`` and a trailing
    ``<FS>`` per message are dropped. Each message is returned as found (not normalised).
    """
    starts = [m.end() for m in _SPLIT_AT_MSH.finditer(data)]
    messages: list[bytes] = []
    for i, begin in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[begin:end].rstrip(b"\r\n\x0b\x0c\x1c\x00 \t")
        if chunk:
            messages.append(chunk)
    return messages


# --------------------------------------------------------------------------- dates

_DTM = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?\s*([+-]\d{4})?$"
)


def parse_hl7_datetime(value: str) -> datetime | None:
    """Read an HL7 DTM/TS (``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+-ZZZZ]``); None when unreadable.

    With an offset the result is timezone-aware; without one it is naive (analyzer local time).
    Cached: the observations of one message, and of the messages around it, mostly carry
    the same few times, and a datetime is immutable. Only values of a timestamp's length
    are kept (4,096 at most), so a sender cannot fill memory with long ones.
    """
    if len(value) > _DTM_CACHE_LENGTH:
        return _parse_hl7_datetime(value)
    return _cached_hl7_datetime(value)


_DTM_CACHE_LENGTH = 40  # YYYYMMDDHHMMSS.SSSS+ZZZZ is 24


def _parse_hl7_datetime(value: str) -> datetime | None:
    match = _DTM.match(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        tz = None
        if offset:
            sign = -1 if offset[0] == "-" else 1
            delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
            tz = timezone(sign * delta)
        return datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((frac or "0").ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


_cached_hl7_datetime = lru_cache(maxsize=4096)(_parse_hl7_datetime)
