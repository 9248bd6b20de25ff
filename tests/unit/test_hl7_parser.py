"""HL7 v2 tokenizer (PROTOCOLS 79-82)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.hl7.parser import (
    HL7ParseError,
    Separators,
    charset_codec,
    escape,
    parse_hl7_datetime,
    parse_message,
    split_messages,
    unescape,
)
from engine.errors import RemoteProtocolError

ORU = (
    "MSH|^~\\&|ANALYZER|LAB|LIS|HOSP|20240102030405||ORU^R01^ORU_R01|C123|P|2.5.1\r"
    "PID|1||P1^^^LAB^MR\r"
    "OBR|1|ORD1|SPEC1|GLU^Glucose^L\r"
    "OBX|1|NM|GLU^Glucose^L||5.4|mmol/L^^UCUM|3.9-6.1|N~A|||F|||20240102030000\r"
)


def test_msh_numbering_counts_msh1() -> None:
    # PROTOCOLS 80: MSH-1 is the field separator, MSH-2 the encoding characters.
    msg = parse_message(ORU.encode())
    msh = msg.msh
    assert msh.field(1) == "|"
    assert msh.field(2) == "^~\\&"
    assert msh.field(3) == "ANALYZER"
    assert msh.field(7) == "20240102030405"
    assert msh.raw(9) == "ORU^R01^ORU_R01"
    assert msg.message_type == "ORU"
    assert msg.trigger_event == "R01"
    assert msg.message_structure == "ORU_R01"
    assert msg.control_id == "C123"
    assert msg.version == "2.5.1"


def test_msh2_is_not_split_or_unescaped() -> None:
    msh = parse_message(ORU.encode()).msh
    assert msh.component(2, 1) == "^~\\&"
    assert msh.repetitions(2) == ["^~\\&"]


def test_fields_components_repetitions() -> None:
    msg = parse_message(ORU.encode())
    obx = msg.segment("OBX")
    assert obx is not None
    assert obx.field(3) == "GLU^Glucose^L"
    assert obx.component(3, 2) == "Glucose"
    assert obx.component(3, 9) == ""
    assert obx.component(6, 3) == "UCUM"
    assert obx.repetitions(8) == ["N", "A"]
    assert obx.field(8, rep=2) == "A"
    assert obx.component(8, 1, rep=3) == ""
    assert obx.field(99) == ""
    assert [s.name for s in msg.segments] == ["MSH", "PID", "OBR", "OBX"]
    assert [s.index for s in msg.segments_named("OBX")] == [3]
    assert msg.segment("SPM") is None


def test_subcomponents() -> None:
    raw = ORU.replace("SPEC1", "SPEC1&BARCODE").encode()
    obr = parse_message(raw).segment("OBR")
    assert obr is not None
    assert obr.component(3, 1, sub=1) == "SPEC1"
    assert obr.component(3, 1, sub=2) == "BARCODE"
    assert obr.component(3, 1, sub=3) == ""


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_segment_terminators(terminator: str) -> None:
    # PROTOCOLS 79: CR, and tolerantly LF and CRLF.
    raw = ORU.replace("\r", terminator).encode()
    msg = parse_message(raw)
    assert [s.name for s in msg.segments] == ["MSH", "PID", "OBR", "OBX"]
    assert msg.segment("OBX") is not None


def test_mixed_terminators_and_blank_lines() -> None:
    raw = ORU.replace("\rPID", "\r\n\r\nPID").replace("\rOBX", "\nOBX").encode()
    assert [s.name for s in parse_message(raw).segments] == ["MSH", "PID", "OBR", "OBX"]


def test_custom_separators() -> None:
    # PROTOCOLS 80: delimiters come from MSH-1/MSH-2, not fixed.
    raw = b"MSH#$*@%#A#B#C#D#2024##ORU$R01#9#P#2.4\rOBX#1#NM#X$Y##1*2#u\r"
    msg = parse_message(raw)
    assert msg.separators == Separators("#", "$", "*", "@", "%", codec="utf-8")
    obx = msg.segment("OBX")
    assert obx is not None
    assert obx.component(3, 2) == "Y"
    assert obx.repetitions(5) == ["1", "2"]
    assert msg.message_type == "ORU"


def test_truncation_character_v27() -> None:
    # PROTOCOLS 80: a 5th encoding character (truncation, v2.7).
    msg = parse_message(b"MSH|^~\\&#|A|B|C|D|2024||ORU^R01|1|P|2.7\r")
    assert msg.separators.truncation == "#"
    assert msg.msh.field(2) == "^~\\&#"


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b", "a^b"),
        ("a\\T\\b", "a&b"),
        ("a\\R\\b", "a~b"),
        ("a\\E\\b", "a\\b"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("\\H\\bold\\N\\", "bold"),
        ("\\X41\\", "A"),
        ("\\XC3A9\\", "é"),
        ("\\Zlocal\\", "\\Zlocal\\"),
        ("unterminated \\F", "unterminated \\F"),
        ("plain", "plain"),
    ],
)
def test_unescape(escaped: str, plain: str) -> None:
    # PROTOCOLS 81: escape sequences.
    assert unescape(escaped) == plain


def test_unescape_only_when_value_read() -> None:
    raw = ORU.replace("|3.9-6.1|", "|ref \\T\\ \\S\\ x|").encode()
    obx = parse_message(raw).segment("OBX")
    assert obx is not None
    assert "\\T\\" in obx.raw(7)
    assert obx.field(7) == "ref & ^ x"


@given(st.text(max_size=60))
def test_escape_round_trip(text: str) -> None:
    # Hypothesis: what escape() writes, unescape() reads back (control characters dropped,
    # line breaks kept).
    expected = "".join(
        c for c in text.replace("\r\n", "\n").replace("\r", "\n") if c == "\n" or ord(c) >= 0x20
    ).replace("\x7f", "")
    escaped = escape(text)
    assert not set(escaped) & set("|^~&\r\n")
    assert unescape(escaped) == expected


@pytest.mark.parametrize(
    ("msh18", "codec"),
    [
        ("ASCII", "ascii"),
        ("8859/1", "latin-1"),
        ("UNICODE UTF-8", "utf-8"),
        ("UNICODE", "utf-8"),
        ("~ISO IR87", "iso2022_jp"),
        ("", None),
        ("KLINGON", None),
    ],
)
def test_charset_table(msh18: str, codec: str | None) -> None:
    # PROTOCOLS 82: the MSH-18 values seen in real analyzer traffic.
    assert charset_codec(msh18) == codec


def test_decodes_by_msh18() -> None:
    # PROTOCOLS 82: MSH-18 read from the raw bytes first, then the message is decoded.
    text = ORU.replace("2.5.1\r", "2.5.1||||||8859/1\r").replace("Glucose^L||", "Glucosé^L||")
    msg = parse_message(text.encode("latin-1"))
    assert msg.encoding == "latin-1"
    obx = msg.segment("OBX")
    assert obx is not None and obx.component(3, 2) == "Glucosé"
    assert msg.warnings == []


def test_utf8_msh18() -> None:
    text = ORU.replace("2.5.1\r", "2.5.1||||||UNICODE UTF-8\r").replace("ANALYZER", "cobas® pro")
    msg = parse_message(text.encode("utf-8"))
    assert msg.msh.field(3) == "cobas® pro"


def test_encoding_override_wins() -> None:
    # PROTOCOLS 82: per-interface override.
    text = ORU.replace("2.5.1\r", "2.5.1||||||ASCII\r").replace("ANALYZER", "Zürich")
    msg = parse_message(text.encode("latin-1"), encoding="latin-1")
    assert msg.msh.field(3) == "Zürich"
    assert msg.warnings == []


def test_declared_ascii_but_utf8_bytes_warns_and_reads() -> None:
    text = ORU.replace("2.5.1\r", "2.5.1||||||ASCII\r").replace("ANALYZER", "cobas® pro")
    msg = parse_message(text.encode("utf-8"))
    assert msg.msh.field(3) == "cobas® pro"
    assert any("MSH-18 says 'ASCII'" in w for w in msg.warnings)


def test_iso_ir87_japanese() -> None:
    text = ORU.replace("2.5.1\r", "2.5.1||||||~ISO IR87\r").replace("Glucose^L||", "血糖^L||")
    msg = parse_message(text.encode("iso2022_jp"))
    obx = msg.segment("OBX")
    assert obx is not None and obx.component(3, 2) == "血糖"


def test_header_only() -> None:
    msg = parse_message(ORU.encode(), header_only=True)
    assert [s.name for s in msg.segments] == ["MSH"]
    assert msg.control_id == "C123"


def test_leading_vt_and_whitespace_skipped() -> None:
    assert parse_message(b"\x0b\r\n" + ORU.encode()).control_id == "C123"


def test_not_hl7_is_refused_with_reason() -> None:
    with pytest.raises(HL7ParseError) as info:
        parse_message(b"H|\\^&|||cobas\rL|1\r")
    assert isinstance(info.value, RemoteProtocolError)
    assert "does not start with an MSH segment" in str(info.value)
    assert info.value.segment_index == 0


def test_bad_encoding_characters() -> None:
    with pytest.raises(HL7ParseError) as info:
        parse_message(b"MSH|^^^^|A|B|C|D|2024||ORU^R01|1|P|2.5\r")
    assert info.value.field == "MSH-2"


def test_shifted_msh_is_refused_and_explained() -> None:
    # corpus hmis_lis_rsp_to_ba400__1: MSH-7 missing, MSH-9 lands in MSH-8.
    raw = b"MSH|^~\\&|oHIMS|OPD|Lab|sample id||RSP^K11^RSP_K11|7e3f:2023|P|2.5.1\nMSA|AA|x\n"
    with pytest.raises(HL7ParseError) as info:
        parse_message(raw)
    assert info.value.field == "MSH-9"
    assert "MSH-8 holds 'RSP^K11^RSP_K11'" in str(info.value)
    assert "segment 1" in str(info.value)


def test_bad_version_refused() -> None:
    with pytest.raises(HL7ParseError) as info:
        parse_message(b"MSH|^~\\&|A|B|C|D|2024||ORU^R01|1|P|hello\r")
    assert info.value.field == "MSH-12"


def test_stray_text_line_becomes_warning() -> None:
    msg = parse_message((ORU + "1.2 Bidirectional Communication\r").encode())
    assert [s.name for s in msg.segments] == ["MSH", "PID", "OBR", "OBX"]
    assert any("does not start with a segment name" in w for w in msg.warnings)


@pytest.mark.parametrize("line", ["OBx|2|NM|K||7.9", " OBX|2|NM|K||7.9", "0BX|2|NM|K||7.9",
                                  "OB|2|NM|K||7.9", "|2|NM|K||7.9", "OBXX|2|NM|K"])
def test_damaged_segment_name_refused(line: str) -> None:
    # PROTOCOLS 79, 92: a segment whose name is damaged would lose a result if skipped.
    with pytest.raises(HL7ParseError) as info:
        parse_message((ORU + line + "\rNTE|1||after\r").encode())
    assert "line 5" in str(info.value)
    assert "not a segment name" in str(info.value)


def test_z_segment_and_digit_names_accepted() -> None:
    msg = parse_message((ORU + "ZR1|1|x\rPV2|1\r").encode())
    assert [s.name for s in msg.segments][-2:] == ["ZR1", "PV2"]


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_split_messages(terminator: str) -> None:
    one = ORU.replace("\r", terminator)
    two = ORU.replace("C123", "C124").replace("\r", terminator)
    data = (one + terminator + two + terminator).encode()
    parts = split_messages(data)
    assert [parse_message(p).control_id for p in parts] == ["C123", "C124"]


def test_split_messages_single_and_framed() -> None:
    assert len(split_messages(ORU.encode())) == 1
    framed = b"\x0b" + ORU.encode() + b"\x1c\r\x0b" + ORU.encode() + b"\x1c\r"
    parts = split_messages(framed)
    assert len(parts) == 2
    assert all(p.startswith(b"MSH") and b"\x1c" not in p for p in parts)
    assert split_messages(b"\r\n") == []


def test_msh_inside_a_field_is_not_a_split_point() -> None:
    data = ORU.replace("Glucose^L||", "MSH text^L||").encode()
    assert len(split_messages(data)) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240102030405", datetime(2024, 1, 2, 3, 4, 5)),
        ("202401020304", datetime(2024, 1, 2, 3, 4)),
        ("20240102", datetime(2024, 1, 2)),
        (
            "20230513093938.752+0530",
            datetime(
                2023, 5, 13, 9, 39, 38, 752000, tzinfo=timezone(timedelta(hours=5, minutes=30))
            ),
        ),
        ("20240605131138+0000", datetime(2024, 6, 5, 13, 11, 38, tzinfo=UTC)),
        ("20241345000000", None),
        ("yesterday", None),
        ("", None),
    ],
)
def test_parse_hl7_datetime(value: str, expected: datetime | None) -> None:
    assert parse_hl7_datetime(value) == expected


def test_two_messages_in_one_block_refused() -> None:
    with pytest.raises(HL7ParseError) as info:
        parse_message((ORU + ORU).encode())
    assert info.value.segment_index == 4
    assert "more than one message" in str(info.value)


@given(st.one_of(
    st.from_regex(r"\A\s?\d{4,14}(\.\d{1,6})?([+-]\d{4})?\s?\Z"),
    st.text(max_size=60),
))
def test_the_datetime_cache_answers_as_the_parser_does(value: str) -> None:
    from drivers.hl7.parser import _parse_hl7_datetime

    assert parse_hl7_datetime(value) == _parse_hl7_datetime(value)
    assert parse_hl7_datetime(value) == _parse_hl7_datetime(value)  # from the cache now


def test_the_datetime_cache_keeps_no_long_values() -> None:
    from drivers.hl7.parser import _cached_hl7_datetime

    before = _cached_hl7_datetime.cache_info().currsize
    assert parse_hl7_datetime(" " * 100_000 + "20250101") == datetime(2025, 1, 1)  # read, not kept
    assert _cached_hl7_datetime.cache_info().currsize == before
    assert _cached_hl7_datetime.cache_info().maxsize == 4096


@pytest.mark.parametrize(
    ("msh18", "escaped", "plain"),
    [
        # PROTOCOLS 81-82: the bytes of \Xhh..\ are text in the message's character set
        ("8859/1", "\\XC3A9\\", "Ã©"),  # two Latin-1 characters, not UTF-8's é
        ("UNICODE UTF-8", "\\XC3A9\\", "é"),
        ("8859/1", "\\XE9\\", "é"),
        ("ASCII", "\\XE9\\", "é"),  # not ASCII text: read as Latin-1, as with no MSH-18
        ("", "\\XC3A9\\", "é"),  # no MSH-18: UTF-8
    ],
)
def test_hex_escapes_are_read_in_the_message_character_set(
        msh18: str, escaped: str, plain: str) -> None:
    raw = (f"MSH|^~\\&|AN|LAB|LIS|LAB|20250303101500||ORU^R01|C1|P|2.5.1||||||{msh18}\r"
           f"OBX|1|ST|NOTE||{escaped}||||||F\r").encode("latin-1")
    msg = parse_message(raw)
    assert msg.msh.field(18) == msh18
    assert msg.segments[1].field(5) == plain
