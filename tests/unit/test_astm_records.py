"""E1394 / LIS2-A2 record codec, capture reader and order encoders."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.astm.files import read_astm_file, wire_frames
from drivers.astm.generic import (
    GenericASTMDriver,
    OrderRequest,
    build_no_orders_answer,
    build_order_records,
    build_query_answer,
    parse_astm_datetime,
)
from drivers.astm.records import (
    DEFAULT_DELIMITERS,
    Delimiters,
    Record,
    encode_header,
    encode_message,
    encode_record,
    escape,
    parse_message,
    split_messages,
    unescape,
)
from drivers.model import MessageKind

RESULT = (
    b"H|\\^&|||ANALYZER^1.0|||||||P|1|20240101120000\r"
    b"P|1||PID1\r"
    b"O|1|S1||^^^GLU\\^^^NA|R||||||N\r"
    b"R|1|^^^GLU|5.5|mmol/L|3.9 to 6.1|H\\A||F||||20240101121500|M1\r"
    b"C|1|I|hemolysed^sample|G\r"
    b"L|1|N\r"
)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_delimiters_come_from_the_header() -> None:
    # PROTOCOLS 47: H|@^\ (corpus:cepheid_genexpert__1) and H|\~& (mindray_cl8000i__1)
    records, _ = parse_message(b"H|@^\\|x\rR|1|^^^A@^^^B|1^2\rL|1\r")
    assert records[0].delimiters == Delimiters("|", "@", "^", "\\")
    assert records[1].repeats(3) == ["^^^A", "^^^B"]
    records, _ = parse_message(b"H|\\~&|||X\rQ|1|123~134144\rL|1\r")
    assert records[1].value(3, 2) == "134144"


def test_h2_is_not_split() -> None:
    # PROTOCOLS 49
    records, _ = parse_message(RESULT)
    assert records[0].field(2) == "\\^&"
    assert records[0].components(2) == ["\\^&"]
    assert records[0].value(5, 1) == "ANALYZER"


def test_doubled_delimiter_definition_is_tolerated_with_warning() -> None:
    # corpus:abbott_architect_i1000sr__3 "H|\\\\^&"
    records, warnings = parse_message(b"H|\\\\^&|||A\rL|1\r")
    assert records[0].delimiters == Delimiters()
    assert any("repeats a character" in w for w in warnings)


def test_invalid_delimiters_are_refused() -> None:
    # PROTOCOLS 48
    with pytest.raises(ValueError):
        Delimiters("|", "|", "^", "&")
    with pytest.raises(ValueError):
        Delimiters("|", "a", "^", "&")


@pytest.mark.parametrize(
    ("wire", "text"),
    [
        ("a&F&b", "a|b"),
        ("a&S&b&R&c&E&d", "a^b\\c&d"),
        ("&X0D0A&", "\r\n"),
        ("&H&bold&N&", "bold"),
        ("&Zlocal&", "&Zlocal&"),
        ("PNG&R&20240628&R&x.PNG", "PNG\\20240628\\x.PNG"),  # corpus:sysmex_xn550__1
        ("DB&E&23-33E22", "DB&23-33E22"),  # corpus:abbott_m2000rt__2
        ("a & b", "a & b"),
        ("trailing&", "trailing&"),
    ],
)
def test_unescape(wire: str, text: str) -> None:
    # PROTOCOLS 50-51
    assert unescape(wire) == text


def test_record_types_are_case_insensitive() -> None:
    # PROTOCOLS 55
    records, _ = parse_message(b"h|\\^&\rp|1\ro|1|S\rr|1|^^^A|1\rl|1\r")
    assert [r.type for r in records] == ["H", "P", "O", "R", "L"]


def test_trailing_fields_may_be_left_out() -> None:
    # PROTOCOLS 52-53
    records, _ = parse_message(b"H|\\^&\rR|1|^^^X|5\rL|1\r")
    assert records[1].field(5) == "" and records[1].field(99) == ""


@pytest.mark.parametrize("terminator", [b"\r", b"\n", b"\r\n"])
def test_record_terminators(terminator: bytes) -> None:
    # PROTOCOLS 46: CR on the wire; LF and CRLF tolerated in stored files
    records, _ = parse_message(RESULT.replace(b"\r", terminator))
    assert [r.type for r in records] == ["H", "P", "O", "R", "C", "L"]


def test_hierarchy_warnings() -> None:
    # PROTOCOLS 60-63: warn, do not reject
    _, warnings = parse_message(b"H|\\^&\rO|1|S\rR|1|^^^A|1\rR|1|^^^B|2\rL|1\r")
    assert any("without a preceding P" in w for w in warnings)
    assert any("expected 2" in w for w in warnings)
    _, warnings = parse_message(RESULT)
    assert warnings == []


def test_m_records_are_kept_verbatim() -> None:
    # PROTOCOLS 74
    m = "M|1|HISTOGRAM|RBC|FLOATLE-stream/deflate:base64^eJzt\\x&S&y"
    records, _ = parse_message(b"H|\\^&\r" + m.encode() + b"\rL|1\r")
    assert records[1].raw == m


def test_split_messages() -> None:
    # PROTOCOLS 59: several H...L messages in one session
    text = RESULT + b"H|\\^&|||B\rL|1\r" + b"H|\\^&|||C\rQ|1|^X\r"
    messages = split_messages(text)
    assert len(messages) == 3
    assert messages[0] == RESULT
    assert messages[2] == b"H|\\^&|||C\rQ|1|^X\r"


@pytest.mark.parametrize("size", range(1, 10))
def test_reader_accepts_frames_in_every_storage_style(size: int) -> None:
    framed = b"".join(wire_frames(RESULT, frame_size=size * 7))
    for data in (
        b"\x05" + framed + b"\x04",  # (a) session
        framed.replace(b"\r\n", b"\n"),  # (b) CR lost
        b"".join(wire_frames(RESULT, frame_size=63_000)).rstrip(b"\n"),  # (c) one frame, no LF
        RESULT.replace(b"\r", b"\r\n"),  # (d) plain records
    ):
        capture = read_astm_file(data)
        assert capture.messages == (RESULT,)
        assert capture.problems == ()


def test_reader_reports_bad_checksums_but_keeps_content() -> None:
    frames = wire_frames(RESULT, frame_size=50)
    bad = frames[0][:-4] + b"ZZ"[:0] + (b"00" if frames[0][-4:-2] != b"00" else b"11") + b"\r\n"
    capture = read_astm_file(b"\x05" + bad + b"".join(frames[1:]) + b"\x04")
    assert len(capture.problems) == 1
    assert capture.messages == (RESULT,)
    assert capture.frames[0] == bad  # sent as is by `send astm`


def test_reader_detects_non_astm() -> None:
    # PROTOCOLS 43
    assert not read_astm_file(b"\x02\x1emtrsl|pi\x1dx\x03\n").is_astm
    assert not read_astm_file(b"hello world\r\n").is_astm


def test_parse_astm_datetime() -> None:
    # PROTOCOLS 56
    assert parse_astm_datetime("20240101") is not None
    moment = parse_astm_datetime("20200912143000+0900")
    assert moment is not None and moment.utcoffset() is not None
    assert parse_astm_datetime("00000000000000") is None
    assert parse_astm_datetime("") is None


def test_generic_decode_result() -> None:
    message = GenericASTMDriver().decode(RESULT)
    assert message.kind is MessageKind.RESULTS
    assert message.sender == "ANALYZER"
    assert message.control_id == "20240101120000"  # H-3 empty: H-14
    specimen = message.specimens[0]
    assert specimen.specimen_id == "S1"
    assert specimen.patient_id_hint == "PID1"
    assert specimen.ordered_codes == ("GLU", "NA")
    obs = specimen.observations[0]
    assert (obs.analyzer_code, obs.value_text, obs.units) == ("GLU", "5.5", "mmol/L")
    assert obs.reference_range == "3.9 to 6.1"
    assert obs.flags == ("H", "A")
    assert obs.status == "F"
    assert obs.equipment == "M1"
    assert obs.observed_at is not None
    assert obs.comments == ("hemolysed sample",)


def test_generic_detect() -> None:
    assert GenericASTMDriver.detect(RESULT)
    assert not GenericASTMDriver.detect(b"MSH|^~\\&|")


# ------------------------------------------------------------------ encoders


def test_build_order_records_and_decode_back() -> None:
    order = OrderRequest("S|1^x", ("GLU", "NA"), priority="S", action_code="A")
    text = build_order_records(
        [order], analyzer_id="C311", lis_id="LAB", timestamp="20240101120000"
    )
    assert text.startswith(b"H|\\^&|||LAB|||||C311||P|LIS2-A2|20240101120000\r")
    assert b"O|1|S&F&1&S&x||^^^GLU\\^^^NA|S||||||A||||||||||||||O\r" in text
    assert text.endswith(b"L|1|N\r")
    decoded = GenericASTMDriver().decode(text)
    assert decoded.kind is MessageKind.ORDERS
    assert decoded.specimens[0].specimen_id == "S|1^x"
    assert decoded.specimens[0].ordered_codes == ("GLU", "NA")


def test_query_answer_uses_q_and_analyzer_delimiters() -> None:
    # PROTOCOLS 67 (O-26 Q), 47 (the analyzer's own delimiters)
    delims = Delimiters("|", "\\", "~", "&")
    text = build_query_answer([OrderRequest("123", ("CA125",))], delimiters=delims)
    assert text.startswith(b"H|\\~&")
    assert b"|~~~CA125|" in text
    records, _ = parse_message(text)
    assert records[2].value(26) == "Q"


def test_no_orders_answer() -> None:
    # PROTOCOLS 73
    assert build_query_answer([]).endswith(b"L|1|I\r")
    assert build_no_orders_answer(lis_id="LAB").endswith(b"L|1|I\r")


component = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFE, exclude_characters="\x7f"),
    max_size=12,
)
field_value = st.one_of(
    component,
    st.tuples(component, component, component),
    st.lists(st.tuples(component, component), min_size=1, max_size=3),
)
delimiter_sets = st.permutations(["|", "\\", "^", "&", "!", "~", "@", "#"]).map(
    lambda p: Delimiters(p[0], p[1], p[2], p[3])
)


@given(fields=st.lists(field_value, min_size=1, max_size=8), delims=delimiter_sets)
def test_round_trip_encode_decode(fields: list, delims: Delimiters) -> None:
    # PROTOCOLS 50, 52: any text survives escaping under any delimiter set
    record = encode_record("R", ["1", *fields], delims)
    text = encode_message([encode_header(["CTRL"], delims), record, "L" + delims.field + "1"])
    records, _ = parse_message(text)
    parsed = records[1]
    assert b"\n" not in text
    for number, value in enumerate(fields, start=3):
        if isinstance(value, str):
            assert parsed.value(number) == value
        elif isinstance(value, tuple):
            if any(value):
                assert tuple(parsed.components(number)) == value
        elif any(any(rep) for rep in value):
            got = [tuple(parsed.components(number, i)) for i in range(len(value))]
            # trailing empty fields are dropped by the encoder, so compare the kept part
            assert got == value


@given(text=component, delims=delimiter_sets)
def test_escape_unescape_round_trip(text: str, delims: Delimiters) -> None:
    escaped = escape(text, delims)
    for ch in (delims.field, delims.repeat, delims.component):
        assert ch not in escaped
    assert unescape(escaped, delims) == text


@pytest.mark.parametrize("size", range(1, 10))
def test_decode_is_independent_of_how_records_were_split_on_the_wire(size: int) -> None:
    framed = b"".join(wire_frames(RESULT, frame_size=size))
    capture = read_astm_file(b"".join(chunked(framed, size)))
    assert capture.messages == (RESULT,)


def test_a_qc_order_does_not_hide_the_patient_results_beside_it() -> None:
    """One O record with action code Q (PROTOCOLS 67) marks that specimen QC, not the whole
    message: the patient's critical result beside it must still be applied."""
    from drivers.astm.generic import GenericASTMDriver

    message = GenericASTMDriver().decode(
        b"H|\\^&|||AN|||||||P|1|20250101\r"
        b"P|1||PID1\rO|1|S100||^^^GLU|R||||||N\rR|1|^^^GLU|25.0|mmol/L||HH||F\r"
        b"P|2\rO|1|QCLOT1||^^^GLU|R||||||Q\rR|1|^^^GLU|5.0|mmol/L||N||F\r"
        b"L|1|N\r")
    assert message.kind == "results"
    assert [(s.specimen_id, s.is_qc) for s in message.specimens] == [
        ("S100", False), ("QCLOT1", True)]


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.text(alphabet="ab|\\^&X0", max_size=8), min_size=1, max_size=6),
       rtype=st.sampled_from(["H", "R", "O"]), number=st.integers(0, 8),
       component=st.integers(0, 4), repeat=st.integers(0, 2))
def test_value_of_a_plain_field_is_the_field_itself(fields: list[str], rtype: str, number: int,
                                                    component: int, repeat: int) -> None:
    """Record.value takes a shortcut for fields with no delimiter or escape in them; it must
    give what splitting into repeats and components gives (PROTOCOLS 47-51)."""
    rec = Record(raw="", fields=(rtype, *fields), delimiters=DEFAULT_DELIMITERS)
    comps = rec.components(number, repeat)
    expected = comps[component - 1] if 0 < component <= len(comps) else ""
    assert rec.value(number, component, repeat) == expected


MINDRAY_QC = (b"H|\\^&|||Mindray^^|||||||QR|1394-97|20260101120000\r"
              b"P|1\r"
              b"O|1|||1^GLU|||||||1^CtrlN^LOT7^20270101^5.5^M^0.3^5.61\\"
              b"2^CtrlH^LOT8^20270101^15^M^0.9^14.8||||||||||||||F\r"
              b"L|1|N\r")


def test_mindray_qc_in_the_order_record_is_decoded_per_control_level() -> None:
    """Mindray QC (H-12 QR): no R record; each repeat of O-12 is one control level,
    level^name^lot^expiry^mean^?^SD^result (corpus: mindray_bs240__4, mindray_cl2000i__4)."""
    message = GenericASTMDriver().decode(MINDRAY_QC)
    assert message.kind is MessageKind.QC
    got = [(s.specimen_id, s.is_qc, [(o.analyzer_code, o.value_text, o.reference_range)
                                     for o in s.observations]) for s in message.specimens]
    assert got == [("QC CtrlN lot LOT7", True, [("GLU", "5.61", "target 5.5 SD 0.3")]),
                   ("QC CtrlH lot LOT8", True, [("GLU", "14.8", "target 15 SD 0.9")])]
    assert "lot LOT7, expires 20270101" in message.specimens[0].observations[0].comments[0]


@pytest.mark.parametrize("message", [
    # an ordinary result message: O-12 is an action code
    MINDRAY_QC.replace(b"|QR|", b"|PR|"),
    # QR, but O-12 is not the QC layout (too few components)
    MINDRAY_QC.replace(b"1^CtrlN^LOT7^20270101^5.5^M^0.3^5.61\\2^CtrlH^LOT8^20270101^15^M^0.9"
                       b"^14.8", b"N"),
])
def test_only_the_mindray_qc_layout_is_read_as_qc(message: bytes) -> None:
    decoded = GenericASTMDriver().decode(message)
    assert decoded.kind is not MessageKind.QC
    assert not [o for s in decoded.specimens for o in s.observations]


def test_r4_repeats_beyond_the_first_are_kept_beside_the_result() -> None:
    """PROTOCOLS 69: R-4 is the value. A second value in a repeat of R-4 was dropped
    without a word; the first stays the result and the whole field is kept as its
    comment, as R-4 components already were."""
    driver = GenericASTMDriver()
    message = driver.decode(
        b"H|\\^&|||an^1|||||host||P|1\rP|1\rO|1|S1||^^^GLU|R\r"
        b"R|1|^^^GLU|5.4\\5.6|mmol/L||N||F\rR|2|^^^NA|140^x|mmol/L||N||F\rL|1|N\r")
    glu, na = message.specimens[0].observations
    assert (glu.value_text, glu.comments) == ("5.4", ("R-4 repeats: 5.4\\5.6",))
    assert (na.value_text, na.comments) == ("140", ("R-4 components: 140^x",))


def test_a_roche_o3_without_its_sample_id_is_not_read_as_one() -> None:
    """Roche O-3 is sequence number ^ sample id (corpus roche_cobas_c311__1). With the
    sample id empty, the sequence number was taken as the specimen id: a sample with that
    number would have received another tube's results. The next field (O-4) is read
    instead, and with none the message says it has no specimen id."""
    head = b"H|\\^&|||c311^1|||||host|RSUPL^REAL|P|1\r"
    driver = GenericASTMDriver()
    with_id = driver.decode(head + b"O|1|11625^S-77^1^^004|R1|^^^685/\rL|1|N\r")
    assert with_id.specimens[0].specimen_id == "S-77"
    without = driver.decode(head + b"O|1|11625^^1^^004|R1|^^^685/\rL|1|N\r")
    assert without.specimens[0].specimen_id == "R1"
    nothing = driver.decode(head + b"O|1|11625^^1^^004||^^^685/\rL|1|N\r")
    assert nothing.specimens[0].specimen_id == ""
    assert any("no specimen id" in w for w in nothing.warnings)
    # the other Roche form, the sample id alone (roche_cobas_c311__3), with or without
    # empty components after it, is read as before
    for o3 in (b"123456", b"123456^^", b"PCCC2   "):
        alone = driver.decode(head + b"O|1|" + o3 + b"|R1|^^^685/\rL|1|N\r")
        assert alone.specimens[0].specimen_id == o3.split(b"^")[0].strip().decode()
