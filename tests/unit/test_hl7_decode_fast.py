"""The OBX fast path of the generic HL7 driver gives what the general path gives.

``GenericHL7Driver._observation`` reads plain OBX (no repetition, escape or subcomponent
character, OBX-4 empty) with one split per value and hands everything else to
``_observation_general``, the reading through ``Segment.component``/``field``. Both must
give the same Observation, field for field, and the same warnings, for any input.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.hl7.generic import GenericHL7Driver
from drivers.hl7.parser import HL7ParseError, Segment, parse_message, split_messages
from drivers.model import AnalyzerMessage, Observation

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "hl7"
CODE_FIELDS = ("auto", "OBX-3", "OBX-4")


class GeneralOnlyDriver(GenericHL7Driver):
    """The driver with every OBX read the general way (the reference)."""

    def _observation(self, obx: Segment, warnings: list[str]) -> Observation:
        return self._observation_general(obx, warnings)


def assert_same_observation(driver: GenericHL7Driver, obx: Segment) -> None:
    fast_warnings: list[str] = []
    general_warnings: list[str] = []
    fast = driver._observation(obx, fast_warnings)
    general = driver._observation_general(obx, general_warnings)
    for f in fields(Observation):
        assert getattr(fast, f.name) == getattr(general, f.name), (f.name, obx.fields)
    # repr also tells str from a str subclass, and one time zone from another.
    assert repr(fast) == repr(general)
    assert fast_warnings == general_warnings


def assert_same_decode(raw: bytes, code_field: str) -> None:
    options = {"code_field": code_field}
    try:
        fast = GenericHL7Driver(options).decode(raw)
    except HL7ParseError as exc:
        with pytest.raises(HL7ParseError) as general_exc:
            GeneralOnlyDriver(options).decode(raw)
        assert str(general_exc.value) == str(exc)
        return
    general: AnalyzerMessage = GeneralOnlyDriver(options).decode(raw)
    assert fast == general
    assert repr(fast) == repr(general)


# ------------------------------------------------------------------ generated OBX

# (MSH-1, MSH-2): the usual separators and an unusual set, so nothing assumes "^" or "\".
SEPARATORS = [("|", "^~\\&"), ("!", "@#$%")]
ESCAPE_CODES = ["F", "S", "T", "R", "E", "P", "X0D", "X41", "XC3A9", "X4", "H", "N", ".br",
                ".sp2", "Z1", "Cxx", ""]
WORDS = ["", "4.53", "> 15.0", "<0.1", "mmol/L", "3.9-6.1", "GLU", "Glucose", "H", "N", "F",
         '""', "12", " 7 ", "\t", "\xa0x", "µg/dL", "é", "20240102030405", "202401020304+0100",
         "2024-01-02", "NOT DETECTED", "MOD1"]


@st.composite
def values(draw: st.DrawFn, seps: tuple[str, str], plain: bool) -> str:
    """A field: words, component separators and, unless ``plain``, repetition and
    subcomponent separators and escape sequences (some unterminated)."""
    comp, rep, esc, sub = seps[1]
    pieces = [st.sampled_from(WORDS), st.just(comp)]
    if not plain:
        pieces += [
            st.just(rep),
            st.just(sub),
            st.just(esc),
            st.sampled_from(ESCAPE_CODES).map(lambda code: f"{esc}{code}{esc}"),
        ]
    return "".join(draw(st.lists(st.one_of(pieces), max_size=6)))


@st.composite
def obx_lines(draw: st.DrawFn, seps: tuple[str, str]) -> str:
    plain = draw(st.booleans())
    count = draw(st.integers(min_value=0, max_value=22))  # OBX-1..OBX-count
    obx = [draw(values(seps, plain)) for _ in range(count)]
    if count >= 4 and draw(st.booleans()):
        # OBX-4 mostly empty; else a sub-id or a Mindray test name (PROTOCOLS 94).
        obx[3] = draw(st.sampled_from(["", "", " ", "1", " 2 ", "ALT", "TBil^x", '""']))
    return seps[0].join(["OBX", *obx])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    seps = draw(st.sampled_from(SEPARATORS))
    fsep, enc = seps
    msh = fsep.join(["MSH", enc, "AN", "LAB", "LIS", "", "20240102030405", "",
                     f"ORU{enc[0]}R01", "C1", "P", "2.5.1"])
    obr = fsep.join(["OBR", "1", "S1", "S1", f"PANEL{enc[0]}Panel"])
    lines = [msh, obr, *draw(st.lists(obx_lines(seps), min_size=1, max_size=4))]
    return ("\r".join(lines) + "\r").encode()


@settings(max_examples=400, deadline=None)
@given(raw=messages(), code_field=st.sampled_from(CODE_FIELDS))
def test_generated_obx_read_the_same_both_ways(raw: bytes, code_field: str) -> None:
    driver = GenericHL7Driver({"code_field": code_field})
    message = parse_message(raw)
    for obx in message.segments_named("OBX"):
        assert_same_observation(driver, obx)
    assert_same_decode(raw, code_field)


@settings(max_examples=300, deadline=None)
@given(raw=messages())
def test_is_plain_says_whether_a_separator_or_escape_is_in_the_segment(raw: bytes) -> None:
    message = parse_message(raw)
    seps = message.separators
    for seg in message.segments:
        text = seps.field.join(seg.fields)
        special = any(c in text for c in (seps.repetition, seps.escape, seps.subcomponent))
        assert seg.is_plain() is (seg.name != "MSH" and not special)


# ------------------------------------------------------------------ fixed cases


def test_plain_obx_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = (
        b"MSH|^~\\&|A|L|||20240102030405||ORU^R01|C1|P|2.5.1\r"
        b"OBR|1|S1|S1\r"
        b"OBX|1|NM|GLU^Glucose||4.53^|mmol/L|3.9-6.1|H|||F|||20240102030000\r"
        b"OBX|2|NM|ALT\r"
    )

    def general(*args: object) -> Observation:
        raise AssertionError("plain OBX went the general way")

    monkeypatch.setattr(GenericHL7Driver, "_observation_general", general)
    decoded = GenericHL7Driver().decode(raw)
    first, second = decoded.specimens[0].observations
    assert (first.analyzer_code, first.analyzer_name, first.value_text) == (
        "GLU", "Glucose", "4.53"
    )
    assert first.flags == ("H",)
    assert first.observed_at is not None
    assert (second.analyzer_code, second.value_text, second.units) == ("ALT", "", "")


@pytest.mark.parametrize(
    "obx",
    [
        "OBX|1|NM|GLU^Glucose^L|1|> 15.0|mmol/L^^UCUM|3.9-6.1|HH~A|||F|||20240102020000||OP||"
        "MOD1^SN1~X",  # repetitions
        "OBX|2|ST|COM^Comment^L||line\\.br\\two \\T\\ more||||||P",  # escapes
        "OBX|3|NM|&GLU&x^Glucose||5|||N",  # subcomponents in OBX-3
        "OBX|4|NM|1|ALT|33|U/L",  # Mindray: test name in OBX-4
        "OBX|5|NM|ALT|2|33|U/L",  # sub-id in OBX-4
        "OBX|6|NM|GLU||5|||N|||F||||||||20240102030000+0100",  # OBX-19 time only
        "OBX|7|NM|||5",  # no code: a warning
        'OBX|8|NM|GLU||5^^|mmol/L| 3-6 |""|||F',  # trailing components, HL7 null flag
        "OBX|9",  # nothing after the set id
        "OBX|10|SN|GLU||>^25|mmol/L|3.9-6.1|||F",  # structured numeric (PROTOCOLS 93)
        "OBX|11|SN|TITER||^1^:^40",  # SN ratio
        "OBX",
    ],
)
@pytest.mark.parametrize("code_field", CODE_FIELDS)
def test_odd_obx_read_the_same_both_ways(obx: str, code_field: str) -> None:
    raw = f"MSH|^~\\&|A|L|||20240102030405||ORU^R01|C1|P|2.5.1\rOBR|1|S1|S1\r{obx}\r".encode()
    driver = GenericHL7Driver({"code_field": code_field})
    for seg in parse_message(raw).segments_named("OBX"):
        assert_same_observation(driver, seg)
    assert_same_decode(raw, code_field)


def test_sn_and_nte_read_on_the_fast_path_too() -> None:
    # PROTOCOLS 92, 93: a plain SN OBX and the NTE after a plain OBX.
    raw = (
        b"MSH|^~\\&|A|L|||20240102030405||ORU^R01|C1|P|2.5.1\r"
        b"OBR|1|S1|S1\r"
        b"OBX|1|SN|GLU||>^25|mmol/L|3.9-6.1|||F\r"
        b"OBX|2|NM|K||6.0|mmol/L\r"
        b"NTE|1|L|haemolysed\r"
    )
    glu, k = GenericHL7Driver().decode(raw).specimens[0].observations
    assert (glu.value_text, glu.comparator, str(glu.number)) == (">25", ">", "25")
    assert k.comments == ("haemolysed",)
    assert_same_decode(raw, "auto")


# ------------------------------------------------------------------ corpus


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("code_field", CODE_FIELDS)
def test_corpus_reads_the_same_both_ways(path: Path, code_field: str) -> None:
    driver = GenericHL7Driver({"code_field": code_field})
    for raw in split_messages(path.read_bytes()):
        try:
            message = parse_message(raw)
        except HL7ParseError:
            message = None
        if message is not None:
            for obx in message.segments_named("OBX"):
                assert_same_observation(driver, obx)
        assert_same_decode(raw, code_field)


def test_corpus_is_there() -> None:
    # The parametrized test above has no case at all when the corpus is missing.
    if not corpus_files():
        pytest.skip(f"corpus not at {CORPUS}")
