"""HL7 acknowledgements (PROTOCOLS 83-90)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from drivers.hl7.ack import (
    AckError,
    AckMode,
    Outcome,
    ack_mode,
    ack_plan,
    build_ack,
    build_reject_ack,
    is_ack,
)
from drivers.hl7.parser import parse_message

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "hl7"

OUL = (
    b"MSH|^~\\&|BA400|Biosystems|Host|Host provider|20230512080427||OUL^R22^OUL_R22|"
    b"71a67f85|P|2.5.1|||ER|AL||UNICODE UTF-8|||LAB-29^IHE\r"
    b'SPM|1|S1||SER\rOBR||""||GLU\rOBX|1|NM|GLU||5.1|mmol/L\r'
)
TS = "20240102030405"


def ack_of(raw: bytes, code: str = "AA", **kwargs: object) -> list[list[str]]:
    ack = build_ack(parse_message(raw), code, "ACK1", TS, **kwargs)  # type: ignore[arg-type]
    assert ack.endswith(b"\r")
    return [seg.split("|") for seg in ack.decode().rstrip("\r").split("\r")]


def test_sender_and_receiver_swapped() -> None:
    # PROTOCOLS 83: ACK MSH-3/4 = original MSH-5/6 and MSH-5/6 = original MSH-3/4.
    msh = ack_of(OUL)[0]
    assert msh[0:2] == ["MSH", "^~\\&"]
    # split index n-1 = MSH-n
    assert (msh[2], msh[3]) == ("Host", "Host provider")
    assert (msh[4], msh[5]) == ("BA400", "Biosystems")


def test_msh9_msh10_msh7_msh11_12() -> None:
    # PROTOCOLS 83: ACK^<trigger>^ACK, new control id, MSH-11/12 copied; clock injected.
    msh = ack_of(OUL)[0]
    assert msh[6] == TS
    assert msh[8] == "ACK^R22^ACK"
    assert msh[9] == "ACK1"
    assert (msh[10], msh[11]) == ("P", "2.5.1")
    assert msh[17] == "UNICODE UTF-8"  # MSH-18 copied so the peer decodes the same way


def test_timestamp_from_datetime() -> None:
    tz = timezone(timedelta(hours=2))
    ack = build_ack(parse_message(OUL), "AA", "X", datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz))
    assert b"|20240102030405+0200||ACK^R22^ACK|" in ack


def test_msa_echoes_control_id() -> None:
    # PROTOCOLS 83, 85: MSA|<code>|<original MSH-10>.
    segments = ack_of(OUL)
    assert segments[1] == ["MSA", "AA", "71a67f85"]


@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_msa_codes(code: str) -> None:
    # PROTOCOLS 84: table 0008.
    assert ack_of(OUL, code)[1][1] == code


def test_unknown_code_refused() -> None:
    with pytest.raises(ValueError, match="table 0008"):
        build_ack(parse_message(OUL), "OK", "X", TS)


def test_err_segment_v25_and_escaped_text() -> None:
    # PROTOCOLS 86: ERR after MSA; ERR-3 table 0357, ERR-4 severity, ERR-8 user message.
    error = AckError(
        code=204,
        message="Sample S1|2 unknown to the LIS^ check barcode & resend",
        segment="SPM",
        sequence=1,
        field_number=2,
    )
    ack = build_ack(parse_message(OUL), "AE", "ACK1", TS, text="held", errors=[error])
    segments = ack.decode().rstrip("\r").split("\r")
    assert segments[1] == "MSA|AE|71a67f85|held"
    err = segments[2].split("|")
    assert err[0] == "ERR"
    assert err[2] == "SPM^1^2"
    assert err[3] == "204^Unknown key identifier^HL70357"
    assert err[4] == "E"
    assert err[8] == "Sample S1\\F\\2 unknown to the LIS\\S\\ check barcode \\T\\ resend"
    # The ACK reads back to the original text.
    parsed = parse_message(ack)
    err_seg = parsed.segment("ERR")
    assert err_seg is not None
    assert err_seg.field(8) == error.message


def test_build_from_msh_segment_alone() -> None:
    msh = parse_message(OUL, header_only=True).msh
    assert build_ack(msh, "AA", "ACK1", TS).split(b"\r")[1] == b"MSA|AA|71a67f85"


def test_ack_keeps_original_separators() -> None:
    raw = b"MSH#$*@%#A#B#C#D#2024##ORU$R01#9#P#2.4\r"
    ack = build_ack(parse_message(raw), "AA", "X", TS)
    assert ack.startswith(b"MSH#$*@%#C#D#A#B#")
    assert b"#ACK$R01$ACK#X#P#2.4" in ack
    assert parse_message(ack).segment("MSA") is not None


@pytest.mark.parametrize(
    ("msh15", "msh16", "mode"),
    [
        ("", "", AckMode.ORIGINAL),
        ("NE", "AL", AckMode.ENHANCED),
        ("AL", "NE", AckMode.ENHANCED),
        ("ER", "AL", AckMode.ENHANCED),
        ("", "0", AckMode.ORIGINAL),  # PROTOCOLS 88: Mindray MSH-16 flag is not table 0155
        ("", "2", AckMode.ORIGINAL),
    ],
)
def test_ack_mode(msh15: str, msh16: str, mode: AckMode) -> None:
    # PROTOCOLS 87: both empty -> original mode.
    assert ack_mode(msh15, msh16) is mode


@pytest.mark.parametrize(
    ("msh15", "msh16", "outcome", "codes"),
    [
        # PROTOCOLS 87: original mode
        ("", "", Outcome.ACCEPTED, ["AA"]),
        ("", "", Outcome.APPLICATION_ERROR, ["AE"]),
        ("", "", Outcome.REJECTED, ["AR"]),
        # PROTOCOLS 88: Mindray BS MSH-16 "0" is read as not set -> original mode
        ("", "0", Outcome.ACCEPTED, ["AA"]),
        ("", "1", Outcome.APPLICATION_ERROR, ["AE"]),
        # PROTOCOLS 88: Roche cobas NE|AL
        ("NE", "AL", Outcome.ACCEPTED, ["AA"]),
        ("NE", "AL", Outcome.APPLICATION_ERROR, ["AE"]),
        ("NE", "AL", Outcome.REJECTED, ["AR"]),
        # BioSystems ER|AL
        ("ER", "AL", Outcome.ACCEPTED, ["AA"]),
        ("ER", "AL", Outcome.REJECTED, ["CR"]),
        # GeneXpert QCN AL|NE
        ("AL", "NE", Outcome.ACCEPTED, ["CA"]),
        ("AL", "NE", Outcome.APPLICATION_ERROR, ["CA"]),
        ("AL", "NE", Outcome.REJECTED, ["CR"]),
        # both always
        ("AL", "AL", Outcome.ACCEPTED, ["CA", "AA"]),
        ("AL", "AL", Outcome.APPLICATION_ERROR, ["CA", "AE"]),
        # stored but refused as unsupported (an HL7 work-order query): the commit went
        # well, the application says AR so that the sender stops (PROTOCOLS 91)
        ("", "", Outcome.APPLICATION_REJECTED, ["AR"]),
        ("ER", "AL", Outcome.APPLICATION_REJECTED, ["AR"]),
        ("AL", "AL", Outcome.APPLICATION_REJECTED, ["CA", "AR"]),
        ("AL", "NE", Outcome.APPLICATION_REJECTED, ["CA"]),
        # SU / ER on the application side
        ("NE", "SU", Outcome.ACCEPTED, ["AA"]),
        ("NE", "SU", Outcome.APPLICATION_ERROR, []),
        ("NE", "ER", Outcome.ACCEPTED, []),
        ("NE", "ER", Outcome.APPLICATION_ERROR, ["AE"]),
        ("SU", "NE", Outcome.REJECTED, []),
        ("NE", "NE", Outcome.ACCEPTED, []),
        # lower case and blanks are tolerated
        (" al ", "", Outcome.ACCEPTED, ["CA", "AA"]),
    ],
)
def test_ack_plan(msh15: str, msh16: str, outcome: Outcome, codes: list[str]) -> None:
    # PROTOCOLS 84, 87, 88
    assert ack_plan(msh15, msh16, outcome) == codes


def test_ack_plan_accepts_plain_strings() -> None:
    assert ack_plan("", "", "rejected") == ["AR"]  # type: ignore[arg-type]


def test_never_acknowledge_an_ack() -> None:
    # PROTOCOLS 89
    ack = build_ack(parse_message(OUL), "AA", "ACK1", TS)
    assert is_ack(ack)
    assert is_ack(parse_message(ack))
    assert not is_ack(OUL)
    assert not is_ack(parse_message(OUL))
    assert is_ack(b"MSH|^~\\&|||||20120508||QCK^Q02|4|P|2.3.1\rMSA|AA|4\r")


def test_corpus_acks_are_acks() -> None:
    # PROTOCOLS 89: real ACKs from the corpus.
    for name in ("hmis_lis_ack_r22__1.hl7", "mindray_cl2000i__2.hl7"):
        path = CORPUS / name
        if not path.exists():
            pytest.skip(f"corpus not at {CORPUS}")
        assert is_ack(path.read_bytes())


def test_duplicate_gets_same_ack_content() -> None:
    # PROTOCOLS 90: a retransmission is ACKed again; same inputs give the same ACK bytes,
    # so the stored ACK can be replayed verbatim.
    first = build_ack(parse_message(OUL), "AA", "ACK1", TS)
    again = build_ack(parse_message(OUL), "AA", "ACK1", TS)
    assert first == again


def test_reject_ack_for_shifted_msh() -> None:
    # corpus hmis_lis_rsp_to_ba400__1 shape: unparseable MSH -> best-effort AR, MSA-2 empty.
    raw = b"MSH|^~\\&|oHIMS|OPD|Lab|sample id||QBP^Q11^QBP_Q11|7e3f|P|2.5.1\nQPD|x\n"
    ack = build_reject_ack(raw, "ACK9", TS, text="MSH-9 is not a message type; fix the MSH")
    assert ack is not None
    segments = ack.decode("latin-1").rstrip("\r").split("\r")
    assert segments[0].startswith("MSH|^~\\&|Lab|sample id|oHIMS|OPD|" + TS + "||ACK")
    assert segments[1].startswith("MSA|AR||")
    assert segments[2].split("|")[3] == "207^Application internal error^HL70357"
    assert parse_message(ack).segment("MSA") is not None


@pytest.mark.parametrize(
    ("raw", "echoed"),
    [
        # the MSH is whole: its MSH-10 is echoed, whatever broke further on
        (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303||ORU^R01|C-17|P|2.5x\rOBR|1|S1\r", "C-17"),
        (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303||ORU^R01|C-18|P|2.5.1\rOBx|1|NM\r", "C-18"),
        (b"MSH#^~\\&#AN#LAB#LIS#LAB#20250303##ORU^R01#C-19#P#2.5.1\r", "C-19"),
        # MSH-9 is no message type: the fields may be shifted, MSH-10 is not trusted
        (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303||XX|C-20|P|2.5.1\r", ""),
        # a control id that would need escaping, or is no plain text, is not echoed
        (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303||ORU^R01|C^21|P|2.5.1\r", ""),
        (b"MSH|^~\\&|AN|LAB|LIS|LAB|20250303||ORU^R01||P|2.5.1\r", ""),
    ],
)
def test_reject_ack_echoes_a_control_id_it_can_trust(raw: bytes, echoed: str) -> None:
    """PROTOCOLS 85: MSA-2 is how the sender matches an answer to its message; an AR it
    cannot match is resent (PROTOCOLS 91). The reject ACK left MSA-2 empty even when the
    message's MSH was whole and only a later segment or field was broken."""
    ack = build_reject_ack(raw, "ACK9", TS, text="could not be read")
    assert ack is not None
    fsep = chr(raw[3])
    msa = ack.decode("latin-1").split("\r")[1].split(fsep)
    assert msa[:3] == ["MSA", "AR", echoed], msa


def test_reject_ack_without_msh_is_none() -> None:
    assert build_reject_ack(b"H|\\^&|||x\rL|1\r", "A", TS, text="not HL7") is None
    assert build_reject_ack(b"", "A", TS, text="empty") is None


def test_reject_ack_never_answers_a_broken_ack() -> None:
    # PROTOCOLS 89 also holds for an ACK we cannot parse.
    raw = b"MSH|^~\\&|A|B|C|D||ACK^R01|x|P|bad\rMSA|AA|1\r"
    assert build_reject_ack(raw, "A", TS, text="bad") is None
