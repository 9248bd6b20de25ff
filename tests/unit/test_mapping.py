"""engine.mapping: loading, validation errors, conversions, ranges, flags, critical, ignore."""

from __future__ import annotations

import re
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.model import Observation, SpecimenResults
from engine.errors import MappingError
from engine.mapping import (
    AnalyzerMapping,
    UnmappedCode,
    format_unmapped_detail,
    load_mapping,
    load_mapping_text,
    parse_unmapped_detail,
)

REPO = Path(__file__).resolve().parents[2]

BASE = """\
metadata:
  analyzer: Test analyzer
  protocol: astm
  version: "1"
options:
  strip_suffix: /
flags:
  "025": ignore
  NORMALE: N
ignore:
  - HISTO
  - {code: "651", units: RLU}
  - {value_type: ED}
tests:
  GLU:
    test: GLU
    name: Glucose
    panel: Chemistry
    aliases: [GLUCOSE, "717"]
    units:
      ucum: mmol/L
      convert:
        - {from: mg/dL, factor: 0.0555}
    decimals: 1
    reference_ranges:
      - {low: 3.9, high: 6.1}
    critical: {low: 2.5, high: 25}
  CREA:
    test: CREA
    units:
      ucum: umol/L
      convert:
        - {from: mg/dL, factor: 88.4}
    decimals: 0
    prefer_mapping_range: true
    reference_ranges:
      - {sex: M, age_min: 18, low: 62, high: 106}
      - {sex: F, age_min: 18, low: 44, high: 80}
      - {age_max: 18, low: 27, high: 88}
      - {low: 40, high: 110}
  HBA1C:
    test: HBA1C
    units:
      ucum: "%"
      convert:
        - {from: mmol/mol, factor: 0.09148, offset: 2.152}
  "651":
    test: HCG
    units: {ucum: mIU/mL}
  URINE-COL:
    test: UCOL
  K:
    test: K
    units: {ucum: mmol/L, accept: [mEq/L]}
    reference_ranges: [{low: 3.5, high: 5.1}]
    critical: {low: 2.8, high: 6.2}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def mapping(tmp_path: Path) -> AnalyzerMapping:
    return load_mapping(write(tmp_path, BASE))


def obs(code: str, value: str, units: str = "", rng: str = "", flags: tuple[str, ...] = (),
        status: str = "F", value_type: str = "") -> Observation:
    return Observation(code, value, units, rng, flags, status, value_type=value_type)


def one(mapping: AnalyzerMapping, observation: Observation, **kwargs: object):  # type: ignore[no-untyped-def]
    mapped = mapping.map_specimen(SpecimenResults("S1", (observation,)), **kwargs)  # type: ignore[arg-type]
    assert not mapped.unmapped, mapped.unmapped
    assert len(mapped.results) == 1
    return mapped.results[0]


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "mappings").glob("*.yaml")))
def test_shipped_mappings_load(name: str) -> None:
    mapping = load_mapping(REPO / "mappings" / name)
    assert mapping.tests
    assert mapping.version


def test_generic_mappings_cover_fixture_codes() -> None:
    fixture_codes = {"GLU", "NA", "K", "CL", "CREA", "UREA", "ALT", "AST", "HGB", "WBC", "PLT",
                     "HBA1C", "TSH"}
    for name in ("generic_hl7.yaml", "generic_astm.yaml"):
        mapping = load_mapping(REPO / "mappings" / name)
        assert fixture_codes <= mapping.lis_codes()
        for code in fixture_codes:
            assert mapping.find(code) is not None, (name, code)


# --------------------------------------------------------------------------- validation


def error_lines(exc: pytest.ExceptionInfo[MappingError]) -> list[str]:
    return str(exc.value).splitlines()[1:]


def test_every_error_names_file_line_and_key_path(tmp_path: Path) -> None:
    text = """\
    metadata:
      analyzer: X
      protocol: hl7
      version: "1"
    tests:
      GLU:
        test: GLU
        units:
          ucum: mmol/L
          convert:
            - {from: mg/dL, factor: fast}
        critcal: {low: 1}
      K:
        test: K
        decimals: -1
        reference_ranges:
          - {low: 5, high: 3}
        critical: {low: 7, high: 6}
    """
    path = write(tmp_path, text)
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    lines = error_lines(exc)
    assert len(lines) == 5, lines
    joined = "\n".join(lines)
    assert f"{path}:11: tests.GLU.units.convert[0].factor: expected a number, got a string " \
        "'fast'" in joined
    assert f"{path}:12: tests.GLU.critcal: unknown key" in joined
    assert f"{path}:15: tests.K.decimals: expected a whole number 0..8" in joined
    assert f"{path}:17: tests.K.reference_ranges[0].low: low 5 is above high 3" in joined
    assert f"{path}:18: tests.K.critical.low: critical low 7 must be below critical high 6" \
        in joined
    for line in lines:
        assert re.match(rf"  {re.escape(str(path))}:\d+: \S+: ", line), line


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("tests:\n  G:\n    test: G\n    units: {ucum: mmol/L, accept: [MMOL/L]}\n",
         ":8: tests.G.units.accept[0]: unit 'MMOL/L' is already declared"),
        ("tests:\n  G:\n    test: G\n    units:\n      ucum: a\n      convert: [{from: b}]\n",
         ":10: tests.G.units.convert[0].factor: is required"),
        ("tests:\n  G:\n    test: G\n    units:\n      ucum: a\n"
         "      convert: [{from: b, factor: 0}]\n",
         ":10: tests.G.units.convert[0].factor: must not be 0"),
        ("tests:\n  G:\n    name: x\n", ":6: tests.G.test: is required"),
        ("tests:\n  G: {test: G}\n  g: {test: H}\n",
         ":7: tests.g: analyzer code 'g' is already mapped by tests.G (line 6)"),
        ("tests:\n  G: {test: G, aliases: [H]}\n  H: {test: H}\n",
         ":7: tests.H: analyzer code 'H' is already mapped by tests.G"),
        ("ignore: [G]\ntests:\n  G: {test: G}\n",
         ":7: tests.G: analyzer code 'G' is both mapped here and listed under ignore: (line 5)"),
        ("tests:\n  G: {test: G}\n  G: {test: H}\n", ":7: tests.G: duplicate key"),
        ("tests:\n  G: {test: G, units: {ucum: x, convert: [{from: y, factor: 1, ofset: 2}]}}\n",
         "tests.G.units.convert[0].ofset: unknown key"),
        ("flags: {X: HIGH}\ntests:\n  G: {test: G}\n",
         ":5: flags.X: expected one of L, H, LL, HH, A, N, ignore"),
        ("status: {W: Z}\ntests:\n  G: {test: G}\n", ":5: status.W: expected one of P, F, C, X"),
        ("tests:\n  G:\n    test: G\n    reference_ranges: [{sex: X, low: 1}]\n",
         ":8: tests.G.reference_ranges[0].sex: expected one of M, F, any"),
        ("tests:\n  G:\n    test: G\n    reference_ranges: [{age_min: 10, age_max: 5, low: 1}]\n",
         "tests.G.reference_ranges[0].age_min: age_min 10 must be below age_max 5"),
        ("tests:\n  G:\n    test: G\n    reference_ranges: [{sex: M}]\n",
         ":8: tests.G.reference_ranges[0]: needs low, high or both"),
        ("tests: [G]\n", ":5: tests: expected a mapping of keys, got a list"),
        ("tests:\n  G: {test: G}\nextra: 1\n", ":7: extra: unknown key"),
        ("tests:\n  G: {test: G, prefer_mapping_range: maybe}\n",
         ":6: tests.G.prefer_mapping_range: expected true or false, got a string 'maybe'"),
        ("ignore: [{units: RLU, colour: red}]\ntests:\n  G: {test: G}\n",
         ":5: ignore[0].colour: unknown key"),
    ],
)
def test_validation_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    header = 'metadata:\n  analyzer: X\n  protocol: any\n  version: "1"\n'
    path = write(tmp_path, header + snippet)
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert expected in str(exc.value), str(exc.value)
    assert str(path) in str(exc.value)


def test_metadata_required(tmp_path: Path) -> None:
    with pytest.raises(MappingError) as exc:
        load_mapping(write(tmp_path, "tests:\n  G: {test: G}\n"))
    assert "metadata: is required" in str(exc.value)
    with pytest.raises(MappingError) as exc:
        load_mapping(write(tmp_path, "metadata: {analyzer: X}\ntests:\n  G: {test: G}\n"))
    text = str(exc.value)
    assert "metadata.protocol: is required" in text
    assert "metadata.version: is required" in text


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "metadata:\n  analyzer: [unclosed\ntests: {}\n")
    with pytest.raises(MappingError) as exc:
        load_mapping(path)
    assert f"{path}:" in str(exc.value)
    assert "not valid YAML" in str(exc.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="empty"):
        load_mapping(write(tmp_path, ""))
    with pytest.raises(MappingError, match="not found"):
        load_mapping(tmp_path / "nope.yaml")


def test_codes_are_read_as_written(tmp_path: Path) -> None:
    # YAML 1.1 would read 0123 as octal 83 and 002 as 2.
    text = ('metadata: {analyzer: X, protocol: hl7, version: 1.10}\n'
            'flags: {002: ignore}\ntests:\n  0123: {test: T}\n')
    mapping = load_mapping(write(tmp_path, text))
    assert mapping.version == "1.10"
    assert mapping.find("0123") is not None
    assert mapping.find("83") is None
    assert mapping.flag_table["002"] == ""


def test_anchor_bomb_is_bounded(tmp_path: Path) -> None:
    lines = ['metadata: {analyzer: X, protocol: hl7, version: "1"}', "a0: &a0 [x, x, x, x, x]"]
    for level in range(1, 12):
        prev = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([prev] * 5)}]")
    lines.append("tests: {G: {test: G}}")
    with pytest.raises(MappingError, match="YAML nodes"):
        load_mapping(write(tmp_path, "\n".join(lines) + "\n"))


# --------------------------------------------------------------------------- mapping values


def test_conversion_rounding_and_raw_text(mapping: AnalyzerMapping) -> None:
    result = one(mapping, obs("GLU", "90", "mg/dL", "70 - 110"))
    assert result.test_code == "GLU"
    # What is shown is the converted, rounded value in the unit shown beside it (never
    # "90 mmol/L"); the analyzer's text stays as a comment and in the stored message.
    assert result.value_text == "5.0"
    assert "as sent by the analyzer: 90 mg/dL" in result.comments
    assert result.value_number == Decimal("5.0")
    assert result.units == "mmol/L"
    assert result.raw_units == "mg/dL"
    # the analyzer's range converts with the value
    assert result.reference_range == "3.9 - 6.1"
    assert result.flag == "N"
    assert not result.is_critical


def test_offset_conversion_without_decimals(mapping: AnalyzerMapping) -> None:
    result = one(mapping, obs("HBA1C", "48", "mmol/mol"))
    # 48 * 0.09148 + 2.152 = 6.54304 -> 3 significant digits
    assert result.value_number == Decimal("6.54")
    assert result.units == "%"


def test_accepted_spelling_and_case_and_spaces(mapping: AnalyzerMapping) -> None:
    result = one(mapping, obs("glu", "5.85", " MMOL/l "))
    assert result.value_number == Decimal("5.9")
    assert result.analyzer_code == "glu"
    result = one(mapping, obs("K", "4.2", "mEq/L"))
    assert (result.units, result.raw_units) == ("mmol/L", "mEq/L")


def test_roche_suffix_and_alias(mapping: AnalyzerMapping) -> None:
    # PROTOCOLS 68: Roche "^^^717/" and reruns "781/dec"
    for code in ("717/", "717/dec", "717", "GLUCOSE"):
        assert one(mapping, obs(code, "5.85", "mmol/l")).test_code == "GLU"


def test_comparator_kept_and_decimal_comma(mapping: AnalyzerMapping) -> None:
    # PROTOCOLS 69: "> 15000.00", "7,41"
    result = one(mapping, obs("GLU", "> 600", "mg/dL"))
    assert result.comparator == ">"
    assert result.value_number == Decimal("33.3")
    assert result.flag == "HH"
    assert result.is_critical
    result = one(mapping, obs("K", "4,2", "mmol/L"))
    assert result.value_number == Decimal("4.2")
    assert result.flag == "N"


def test_text_value_without_units(mapping: AnalyzerMapping) -> None:
    result = one(mapping, obs("GLU", "-----"))
    assert result.value_number is None
    assert result.value_text == "-----"
    assert result.flag == ""
    result = one(mapping, obs("URINE-COL", "p.yel"))
    assert result.test_code == "UCOL"
    assert result.units == ""


def test_undeclared_unit_is_unmapped_with_reason(mapping: AnalyzerMapping) -> None:
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs("GLU", "90", "g/L"),)))
    assert mapped.results == ()
    assert mapped.unmapped[0].code == "GLU"
    assert "'g/L' are not declared for GLU" in mapped.unmapped[0].reason
    assert "mmol/L" in mapped.unmapped[0].reason
    # a number without units is not silently taken as mmol/L
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs("GLU", "90"),)))
    assert mapped.unmapped and "''" in mapped.unmapped[0].reason


def test_unknown_code_is_unmapped_never_dropped(mapping: AnalyzerMapping) -> None:
    specimen = SpecimenResults("S1", (obs("GLU", "5", "mmol/L"), obs("XYZ", "1", "U/L"),
                                      obs("", "1")))
    mapped = mapping.map_specimen(specimen)
    assert [r.test_code for r in mapped.results] == ["GLU"]
    assert [u.code for u in mapped.unmapped] == ["XYZ", "(no code)"]
    assert "no entry for analyzer code 'XYZ'" in mapped.unmapped[0].reason


def test_ignore_list(mapping: AnalyzerMapping) -> None:
    specimen = SpecimenResults("S1", (
        obs("HISTO", "PNG&R&x"),
        obs("651", "2423973", "RLU"),          # raw signal row of a mapped code
        obs("651", "> 15000.00", "mIU/mL"),
        obs("IMG", "^Image^BMP", value_type="ED"),
    ))
    mapped = mapping.map_specimen(specimen)
    assert mapped.ignored == ("HISTO", "651", "IMG")
    assert [r.test_code for r in mapped.results] == ["HCG"]
    assert not mapped.unmapped


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("sex", "age", "expected"),
    [
        ("M", 40.0, "62 - 106"),
        ("F", 40.0, "44 - 80"),
        ("F", 10.0, "27 - 88"),
        ("U", 10.0, "27 - 88"),
        ("U", 40.0, "40 - 110"),   # no sex: the first "any" band for the age
        ("M", None, "40 - 110"),   # no age: only bands without age limits
        ("male", 18.0, "62 - 106"),  # age_min inclusive
        ("M", 17.99, "27 - 88"),     # age_max exclusive
    ],
)
def test_reference_range_by_sex_and_age(
    mapping: AnalyzerMapping, sex: str, age: float | None, expected: str
) -> None:
    # CREA has prefer_mapping_range: the analyzer's range is not used
    result = one(mapping, obs("CREA", "1.0", "mg/dL", "0.7 - 1.2"), sex=sex, age_years=age)
    assert result.value_number == Decimal("88")
    assert result.reference_range == expected


def test_analyzer_range_kept_when_not_converted(mapping: AnalyzerMapping) -> None:
    result = one(mapping, obs("K", "5.3", "mmol/L", "3.08 - 5.00^REFERENCE_RANGE"))
    assert result.reference_range == "3.08 - 5.00"
    assert result.flag == "H"
    result = one(mapping, obs("K", "5.3", "mmol/L", "([ Normal : 1.5 - 4.2 ] )"))
    assert result.reference_range == "1.5 - 4.2"
    result = one(mapping, obs("K", "5.3", "mmol/L", "normal adult"))
    assert result.reference_range == "normal adult"
    assert result.flag == "H"  # computed from the mapping's range
    result = one(mapping, obs("K", "5.0", "mmol/L", "-"))  # Mindray: no range
    assert result.reference_range == "3.5 - 5.1"


def test_unreadable_range_in_other_units_falls_back(mapping: AnalyzerMapping) -> None:
    mapped = mapping.map_specimen(
        SpecimenResults("S1", (obs("GLU", "90", "mg/dL", "see report"),)))
    assert mapped.results[0].reference_range == "3.9 - 6.1"
    assert any("unreadable" in w for w in mapped.warnings)


# --------------------------------------------------------------------------- flags, critical


@pytest.mark.parametrize(
    ("flags", "value", "expected", "critical"),
    [
        (("H",), "5.0", "H", False),        # analyzer flag wins over the range
        (("L",), "4.0", "L", False),
        (("HH",), "5.0", "HH", True),       # LL/HH are critical by themselves
        (("<",), "2.9", "L", False),        # PROTOCOLS 69: below measuring range
        ((">",), "6.0", "H", False),
        (("N",), "4.0", "N", False),
        (("A",), "4.0", "A", False),
        (("W",), "5.5", "H", False),        # delta flag: computed from the range
        (("025",), "5.5", "H", False),      # overridden: alarm code ignored
        (("NORMALE",), "4.0", "N", False),  # overridden: free text
        (("L", "N"), "3.0", "L", False),    # Mindray "L~N": most severe wins
        (('""',), "4.0", "N", False),       # HL7 null
        ((), "3.0", "L", False),
        ((), "5.2", "H", False),
        ((), "2.7", "LL", True),            # below critical low
        ((), "6.3", "HH", True),
        (("H",), "6.3", "HH", True),        # critical escalates the analyzer's H
        (("L", "H"), "4.0", "A", False),
    ],
)
def test_flags(mapping: AnalyzerMapping, flags: tuple[str, ...], value: str, expected: str,
               critical: bool) -> None:
    result = one(mapping, obs("K", value, "mmol/L", flags=flags))
    assert (result.flag, result.is_critical) == (expected, critical)
    assert result.raw_flags == ",".join(flags)


def test_unknown_flag_warns(mapping: AnalyzerMapping) -> None:
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs("K", "5.5", "mmol/L",
                                                             flags=("ZZ",)),)))
    assert mapped.results[0].flag == "H"
    assert any("'ZZ'" in w for w in mapped.warnings)


def test_unknown_flag_abnormal_option(tmp_path: Path) -> None:
    text = BASE.replace("  strip_suffix: /\n", "  strip_suffix: /\n  unknown_flag: abnormal\n")
    mapping = load_mapping(write(tmp_path, text))
    assert one(mapping, obs("K", "4.0", "mmol/L", flags=("ZZ",))).flag == "A"


@pytest.mark.parametrize(
    ("value", "flag"),
    [("<2.0", "LL"), ("<3.0", "L"), ("<4.0", ""), (">7", "HH"), (">5.5", "H"), (">4", ""),
     ("<=3.5", ""), ("<3.5", "L")],
)
def test_comparator_flags_only_when_certain(mapping: AnalyzerMapping, value: str,
                                            flag: str) -> None:
    assert one(mapping, obs("K", value, "mmol/L")).flag == flag


@pytest.mark.parametrize(
    ("status", "expected"),
    [("F", "F"), ("", "F"), ("C", "C"), ("P", "P"), ("X", "X"), ("R", "F"), ("W", "P"),
     ("I", "P"), ("?", "P")],
)
def test_status_astm(mapping: AnalyzerMapping, status: str, expected: str) -> None:
    assert one(mapping, obs("K", "4", "mmol/L", status=status)).status == expected


# --------------------------------------------------------------------------- reverse, misc


def test_reverse_lookup(mapping: AnalyzerMapping) -> None:
    assert mapping.analyzer_codes_for(["CREA", "GLU", "NOPE", "GLU"]) == ["CREA", "GLU"]
    answer = mapping.order_codes(["HCG", "NOPE"])
    assert answer.analyzer_codes == ("651",)
    assert answer.missing_test_codes == ("NOPE",)
    assert mapping.lis_codes() == {"GLU", "CREA", "HBA1C", "HCG", "UCOL", "K"}
    test = mapping.test("GLU")
    assert test is not None
    assert (test.name, test.panel) == ("Glucose", "Chemistry")


def test_reverse_lookup_logs_missing(mapping: AnalyzerMapping) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        mapping.analyzer_codes_for(["NOPE"])
    assert logs[0]["event"] == "mapping.order.unmapped_tests"
    assert logs[0]["test_codes"] == ["NOPE"]


def test_order_code_and_first_entry_wins(tmp_path: Path) -> None:
    text = ('metadata: {analyzer: X, protocol: astm, version: "1"}\noptions: {strip_suffix: /}\n'
            'tests:\n  "717/": {test: GLU}\n  "419": {test: GLU}\n'
            '  "685/": {test: ALT, order_code: "685"}\n')
    mapping = load_mapping(write(tmp_path, text))
    assert mapping.analyzer_codes_for(["GLU", "ALT"]) == ["717/", "685"]


def test_duplicate_code_warns(mapping: AnalyzerMapping) -> None:
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs("K", "4", "mmol/L"),
                                                         obs("K", "4.1", "mmol/L"))))
    assert len(mapped.results) == 2
    assert any("more than once" in w for w in mapped.warnings)


def test_hold_detail_round_trip() -> None:
    unmapped = (UnmappedCode("GLUC2", "no entry"), UnmappedCode("X Y", "units"),
                UnmappedCode("GLUC2", "again"))
    detail = format_unmapped_detail(unmapped)
    assert detail.startswith("unmapped analyzer codes: GLUC2, X Y; ")
    assert parse_unmapped_detail(detail) == ["GLUC2", "X Y"]
    assert parse_unmapped_detail("unmapped analyzer codes: A") == ["A"]
    assert parse_unmapped_detail("unknown specimen") == []


def test_huge_value_kept_as_text(mapping: AnalyzerMapping) -> None:
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs("K", "1e40", "mmol/L"),)))
    assert mapped.results[0].value_number is None
    assert mapped.results[0].value_text == "1e40"


def test_load_mapping_text_uses_source_name() -> None:
    with pytest.raises(MappingError, match=r"virtual\.yaml:1"):
        load_mapping_text("- a list\n", Path("virtual.yaml"))


# --------------------------------------------------------------------------- property


FACTORS = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("1000"), places=4,
                      allow_nan=False, allow_infinity=False).filter(lambda d: d != 0)
OFFSETS = st.decimals(min_value=Decimal("-100"), max_value=Decimal("100"), places=3,
                      allow_nan=False, allow_infinity=False)
VALUES = st.decimals(min_value=Decimal("-99999"), max_value=Decimal("99999"), places=3,
                     allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(factor=FACTORS, offset=OFFSETS, value=VALUES, decimals=st.none() | st.integers(0, 6))
def test_conversion_round_trip_within_rounding(
    factor: Decimal, offset: Decimal, value: Decimal, decimals: int | None
) -> None:
    places = "" if decimals is None else f"\n    decimals: {decimals}"
    text = (
        'metadata: {analyzer: X, protocol: any, version: "1"}\n'
        "tests:\n  T:\n    test: T\n    units:\n      ucum: b\n"
        f"      convert: [{{from: a, factor: {factor}, offset: {offset}}}]{places}\n"
    )
    mapping = load_mapping_text(text, Path("prop.yaml"))
    value_text = f"{value:f}"
    mapped = mapping.map_specimen(SpecimenResults("S", (obs("T", value_text, "a"),)))
    result = mapped.results[0]
    assert result.value_number is not None
    converted = result.value_number
    # half a unit in the last kept place of the converted value, taken back through the factor
    half_ulp = Decimal(1).scaleb(converted.as_tuple().exponent) / 2  # type: ignore[arg-type]
    back = (converted - offset) / factor
    assert abs(back - value) <= half_ulp / abs(factor) + Decimal("1e-20")


def test_flag_follows_the_printed_range_when_the_analyzer_says_normal(
    mapping: AnalyzerMapping,
) -> None:
    result = one(mapping, obs("GLU", "7.5", "mmol/L", "", flags=("N",)))
    assert result.reference_range and result.flag == "H"


def test_hl7_aa_flag_is_critical_even_for_text(mapping: AnalyzerMapping) -> None:
    result = one(mapping, obs("GLU", "POSITIVE", "", "", flags=("AA",)))
    assert result.is_critical
    assert result.units == ""  # a text result shows no unit of the test


# --------------------------------------------------------------------------- critical by patient

BY_PATIENT = """
metadata: {analyzer: test, protocol: hl7, version: "1"}
tests:
  K:
    test: K
    units: {ucum: mmol/L}
    reference_ranges: [{low: 3.5, high: 5.1}]
    critical:                                   # potassium: neonates tolerate more
      - {age_max: 0.0833, low: 2.0, high: 7.5}  # first month of life
      - {sex: F, age_min: 18, low: 3.0}         # a (made-up) stricter low for women
      - {low: 2.5, high: 6.5}                   # everyone else, and unknown age
"""


@pytest.mark.parametrize(
    ("sex", "age", "value", "flag", "critical"),
    [
        ("U", 0.01, "7.0", "H", False),    # a neonate: 7.0 is below its critical high
        ("M", 40, "7.0", "HH", True),      # an adult: above 6.5
        ("U", None, "7.0", "HH", True),    # age unknown: the entry without ages
        ("F", 40, "2.9", "LL", True),      # a woman: below her critical low 3.0
        ("M", 40, "2.9", "L", False),      # a man: above 2.5, flagged by the range only
        ("F", 10, "2.9", "L", False),      # a girl: the F entry starts at 18
        ("F", None, "2.9", "L", False),    # age unknown: F entry has ages, not taken
        ("U", 0.01, "1.9", "LL", True),
    ],
)
def test_critical_limits_by_sex_and_age(tmp_path: Path, sex: str, age: float | None,
                                        value: str, flag: str, critical: bool) -> None:
    mapping = load_mapping(write(tmp_path, BY_PATIENT))
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs("K", value, "mmol/L"),)),
                                  sex=sex, age_years=age)
    result = mapped.results[0]
    assert (result.flag, result.is_critical) == (flag, critical)


def test_critical_limits_by_patient_need_the_patient(tmp_path: Path) -> None:
    """The pipeline looks the patient's sex and age up only for mappings that need them:
    critical limits by age count as much as reference ranges by age."""
    from engine.pipeline import _ranges_by_patient

    by_patient = load_mapping(write(tmp_path, BY_PATIENT, "p.yaml"))
    assert by_patient.tests[0].by_patient and _ranges_by_patient(by_patient)
    plain = load_mapping(write(tmp_path, BASE.replace(
        """      - {sex: M, age_min: 18, low: 62, high: 106}
      - {sex: F, age_min: 18, low: 44, high: 80}
      - {age_max: 18, low: 27, high: 88}
""", ""), "plain.yaml"))
    assert not _ranges_by_patient(plain)


def test_critical_limits_by_patient_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, """
    metadata: {analyzer: test, protocol: hl7, version: "1"}
    tests:
      K:
        test: K
        critical:
          - {age_max: 0.0833, low: 7.5, high: 2.0}
          - {sex: X, low: 3.0}
          - {age_min: -1, high: 9}
          - {low: 2.5, high: 6.5, text: "nope"}
      NA:
        test: NA
        critical: []
    """)
    with pytest.raises(MappingError) as raised:
        load_mapping(path)
    text = str(raised.value)
    assert f"{path}:7: tests.K.critical[0].low: critical low 7.5 must be below critical " \
        "high 2.0" in text
    assert "tests.K.critical[1].sex: expected one of M, F, any" in text
    assert "tests.K.critical[2]: ages are years and must be positive (critical)" in text
    assert "tests.K.critical[3].text: unknown key" in text
    assert "tests.NA.critical: an empty list; leave critical out instead" in text


@pytest.mark.parametrize("value", ["1e99999999999", "-1e99999999999", ">1e99999999999",
                                   "1e10000"])
@pytest.mark.parametrize("code,units", [("GLU", "mg/dL"), ("GLU", "mmol/L"), ("CREA", "umol/L")])
def test_absurd_exponent_is_kept_as_text_with_a_warning(mapping: AnalyzerMapping, value: str,
                                                        code: str, units: str) -> None:
    """An analyzer value with an absurd exponent overflowed the decimal context, an exception
    that failed the whole message (every result of it held as an internal error). It is
    kept as text, as any number too large to store, converted or not."""
    mapped = mapping.map_specimen(SpecimenResults("S1", (obs(code, value, units, "3-9"),)))
    assert not mapped.unmapped
    (result,) = mapped.results
    assert result.value_number is None
    assert result.value_text == value
    assert any("value too large to store as a number; kept as text" in w
               for w in mapped.warnings)


@pytest.mark.parametrize("value", ["1e-99999999999", "0E+99999999999", "0e-99999999999"])
def test_absurdly_small_or_zero_exponent_is_text(mapping: AnalyzerMapping, value: str) -> None:
    """Zero or a number with an exponent PostgreSQL does not read (it stores down to
    1e-16383) is kept as text, not as a number the database would refuse."""
    result = one(mapping, obs("CREA", value, "umol/L"))
    assert result.value_number is None
    assert result.value_text == value


def _viral_load_mapping(tmp_path: Path) -> AnalyzerMapping:
    return load_mapping(write(tmp_path, """\
        metadata: {analyzer: t, protocol: hl7, version: '1'}
        tests:
          VL:
            test: VL
            units: {ucum: "[iU]/mL"}
        """))


@pytest.mark.parametrize("value,rng,flag,shown", [
    # A viral load and its range in scientific notation were read as "+01 - 1.7": a value
    # a hundred million times the upper limit came out normal.
    ("1.2E+09", "2.0E+01-1.7E+08", "H", "2.0E+01 - 1.7E+08"),
    ("5.0E+02", "2.0E+01-1.7E+08", "N", "2.0E+01 - 1.7E+08"),
    ("5.0E-4", "1.0E-4-3.0E-4", "H", "1.0E-4 - 3.0E-4"),
    ("2.0e-4", "1.0e-4 - 3.0e-4", "N", "1.0e-4 - 3.0e-4"),
    ("50", "1E+2-3E+2", "L", "1E+2 - 3E+2"),
    ("0.5", "-1-1", "N", "-1 - 1"),
    ("5", "<1.5E+1", "N", "< 1.5E+1"),
    # no arithmetic on an absurd exponent: the text is shown, no flag is taken from it
    ("5", "1e-99999999999-1", "", "1e-99999999999-1"),
    ("5", "<1e99999999999", "", "<1e99999999999"),
])
def test_range_in_scientific_notation(tmp_path: Path, value: str, rng: str, flag: str,
                                      shown: str) -> None:
    mapping = _viral_load_mapping(tmp_path)
    result = one(mapping, obs("VL", value, "[iU]/mL", rng))
    assert (result.flag, result.reference_range) == (flag, shown)


def test_range_with_an_exponent_decimal_refuses(tmp_path: Path) -> None:
    """'3.0E-4999...9' (an exponent too long for Decimal) raised InvalidOperation from the
    range reader, failing the whole message; the range is now shown as sent, unflagged."""
    mapping = _viral_load_mapping(tmp_path)
    text = "1.0E-4-3.0E-4" + "9" * 40
    result = one(mapping, obs("VL", "5", "[iU]/mL", text))
    assert (result.flag, result.reference_range) == ("", text)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the mapping is read-only
@given(value=st.text(alphabet="0123456789eE+-.,<>= ", max_size=24),
       rng=st.text(alphabet="0123456789eE+-.,<>= to", max_size=40),
       units=st.sampled_from(["mg/dL", "mmol/L", ""]))
def test_numbers_and_ranges_as_sent_never_raise(mapping: AnalyzerMapping, value: str,
                                                rng: str, units: str) -> None:
    """Whatever digits, signs, exponents and separators an analyzer puts in a value or a
    range, mapping gives results, unmapped codes and warnings; it never raises (an
    exception fails the whole message)."""
    for code in ("GLU", "CREA"):
        mapping.map_specimen(SpecimenResults("S1", (obs(code, value, units, rng),)))
