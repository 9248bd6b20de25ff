"""engine.mapping's memoised hot path against the plain one it replaced.

``AnalyzerMapping.map_specimen`` remembers what analyzer text (codes, units, ranges, flags,
statuses, values) means under a mapping. The reference below is the straightforward
implementation it replaced, kept as it was (comments trimmed) but taking the mapping as an
argument; it uses the value helpers the change left alone from engine.mapping. Every field
of every result, every unmapped code and every warning must come out the same, in the same
order, whether the memos are cold, warm or constantly forgotten.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.mapping as mapping_module
from drivers.model import Observation, SpecimenResults, parse_number
from engine.mapping import (
    _FLAG_SEVERITY,
    _MAX_MAGNITUDE,
    _REFERENCE_RANGE_MAX,
    NO_CODE,
    AnalyzerMapping,
    MappedSpecimen,
    UnitConversion,
    UnmappedCode,
    _convert_and_round,
    _meaningful_range,
    _normalise_sex,
    _parse_range,
    _plain,
    _range_text,
    _unit_key,
    load_mapping_text,
)
from lis_bridge.types import ResultInput

if TYPE_CHECKING:  # imported by name, pytest would try to collect it as a test class
    from engine.mapping import TestMapping

# --------------------------------------------------------------------------- the reference


def ref_map_specimen(
    mapping: AnalyzerMapping, specimen: SpecimenResults, *, sex: str = "U",
    age_years: float | None = None,
) -> MappedSpecimen:
    sex = _normalise_sex(sex)
    results: list[ResultInput] = []
    unmapped: list[UnmappedCode] = []
    ignored: list[str] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for observation in specimen.observations:
        raw_code = observation.analyzer_code.strip()
        key = mapping.normalise_code(raw_code)
        units_key = _unit_key(observation.units)
        if mapping._ignore_rules and ref_matches_ignore_rule(mapping, key, units_key,
                                                             observation):
            ignored.append(raw_code or NO_CODE)
            continue
        if not raw_code:
            unmapped.append(UnmappedCode(NO_CODE, "the observation has no analyzer code "
                                         "(check the driver's code_field option)"))
            continue
        rule = mapping._by_code.get(key)
        if rule is None:
            if key in mapping._ignored:
                ignored.append(raw_code)
            else:
                unmapped.append(UnmappedCode(
                    raw_code,
                    f"no entry for analyzer code {raw_code!r} in {mapping.source.name}; "
                    "map it under tests: or list it under ignore:",
                ))
            continue
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            warnings.append(f"analyzer code {raw_code} appears more than once")
        outcome = ref_map_observation(mapping, rule, observation, raw_code, units_key, sex,
                                      age_years, warnings)
        if isinstance(outcome, UnmappedCode):
            unmapped.append(outcome)
        else:
            results.append(outcome)
    return MappedSpecimen(
        specimen_id=specimen.specimen_id,
        results=tuple(results),
        unmapped=tuple(unmapped),
        ignored=tuple(ignored),
        warnings=tuple(warnings),
    )


def ref_matches_ignore_rule(mapping: AnalyzerMapping, key: str, units_key: str,
                            observation: Observation) -> bool:
    value_type = observation.value_type.strip().upper()
    for code, units, wanted_type in mapping._ignore_rules:
        if code is not None and code != key:
            continue
        if units is not None and units != units_key:
            continue
        if wanted_type is not None and wanted_type != value_type:
            continue
        return True
    return False


def ref_map_observation(
    mapping: AnalyzerMapping,
    rule: TestMapping,
    observation: Observation,
    raw_code: str,
    units_key: str,
    sex: str,
    age_years: float | None,
    warnings: list[str],
) -> ResultInput | UnmappedCode:
    comparator, number = parse_number(observation.value_text)
    if comparator == "=":
        comparator = ""
    if units_key not in rule.unit_table:
        if number is None and not units_key:
            conversion = None
        else:
            return UnmappedCode(
                raw_code,
                f"units {observation.units.strip()!r} are not declared for {rule.test_code}"
                f" (declared: {', '.join(rule.declared_units())}); add them to "
                f"tests.{rule.analyzer_code}.units (accept, or convert with a factor)",
            )
    else:
        conversion = rule.unit_table[units_key]

    if number is not None:
        number = _convert_and_round(number, conversion, rule.decimals)
        if number is not None and abs(number) >= _MAX_MAGNITUDE:
            warnings.append(f"{raw_code}: value too large to store as a number; kept as text")
            number = None

    reference_range, bounds = ref_reference_range(
        rule, observation.reference_range, conversion, sex, age_years, raw_code, warnings
    )
    flag = ref_analyzer_flag(mapping, observation.flags, raw_code, warnings)
    if number is not None and bounds is not None and flag in ("", "N"):
        flag = ref_flag_from_range(comparator, number, bounds[0], bounds[1]) or flag
    is_critical = flag in ("LL", "HH") or any(
        f.strip().upper() == "AA" for f in observation.flags)
    limits = rule.critical_for(sex, age_years) if rule.critical_limits else None
    if number is not None and limits is not None:
        critical = ref_flag_from_range(comparator, number, limits.low, limits.high)
        if critical in ("L", "H"):
            is_critical = True
            flag = "LL" if critical == "L" else "HH"

    status_raw = observation.status.strip().upper()
    status = mapping.status_table.get(status_raw)
    if status is None:
        warnings.append(f"{raw_code}: result status {status_raw!r} is not known; "
                        "stored as preliminary (P)")
        status = "P"

    value_text = observation.value_text
    comments = observation.comments
    if number is not None and (conversion is not None or rule.decimals is not None):
        shown = f"{comparator}{number:f}"
        if _plain(shown) != _plain(value_text):
            comments = (*comments, f"as sent by the analyzer: {value_text.strip()} "
                        f"{observation.units.strip()}".rstrip())
        value_text = shown
    return ResultInput(
        test_code=rule.test_code,
        analyzer_code=raw_code,
        value_text=value_text,
        value_number=number,
        comparator=comparator,
        units=rule.ucum if number is not None else observation.units.strip(),
        reference_range=reference_range,
        flag=flag,
        is_critical=is_critical,
        status=status,
        observed_at=observation.observed_at,
        equipment=observation.equipment,
        comments=comments,
        raw_units=observation.units,
        raw_flags=",".join(observation.flags),
    )


def ref_reference_range(
    rule: TestMapping,
    analyzer_text: str,
    conversion: UnitConversion | None,
    sex: str,
    age_years: float | None,
    raw_code: str,
    warnings: list[str],
) -> tuple[str, tuple[Decimal | None, Decimal | None] | None]:
    text = analyzer_text.strip()
    use_mapping = rule.prefer_mapping_range or not _meaningful_range(text)
    if not use_mapping:
        parsed = _parse_range(text)
        if conversion is not None:
            if parsed is None:
                warnings.append(f"{raw_code}: the analyzer's range {text!r} is in "
                                f"{conversion.from_units} and unreadable; the mapping's "
                                "range is used")
                use_mapping = True
            else:
                low = _convert_and_round(parsed[0], conversion, rule.decimals)
                high = _convert_and_round(parsed[1], conversion, rule.decimals)
                return _range_text(low, high, rule.decimals), (low, high)
        else:
            if parsed is None:
                chosen = rule.range_for(sex, age_years)
                bounds = (chosen.low, chosen.high) if chosen else None
                return text[:_REFERENCE_RANGE_MAX], bounds
            return _range_text(parsed[0], parsed[1], None, raw=parsed[2]), parsed[:2]
    chosen = rule.range_for(sex, age_years)
    if chosen is None:
        return "", None
    return chosen.display(rule.decimals), (chosen.low, chosen.high)


def ref_analyzer_flag(mapping: AnalyzerMapping, flags: tuple[str, ...], raw_code: str,
                      warnings: list[str]) -> str:
    best = ""
    directions: set[str] = set()
    for raw in flags:
        text = raw.strip().upper()
        if not text or text == '""':
            continue
        normal = mapping.flag_table.get(text)
        if normal is None:
            if mapping.unknown_flag == "abnormal":
                normal = "A"
            else:
                warnings.append(f"{raw_code}: analyzer flag {raw.strip()!r} is not in the "
                                "flag table; ignored (add it under flags:)")
                continue
        if normal in ("L", "LL"):
            directions.add("L")
        elif normal in ("H", "HH"):
            directions.add("H")
        if _FLAG_SEVERITY[normal] > _FLAG_SEVERITY[best]:
            best = normal
    if len(directions) == 2:
        warnings.append(f"{raw_code}: analyzer flags {','.join(flags)} say both low and high;"
                        " flagged A")
        return "A"
    return best


def ref_flag_from_range(
    comparator: str, value: Decimal, low: Decimal | None, high: Decimal | None
) -> str | None:
    if low is None and high is None:
        return None
    below = comparator.startswith("<")
    above = comparator.startswith(">")
    inclusive = comparator.endswith("=")
    if low is not None:
        if below and (value < low or (value == low and not inclusive)):
            return "L"
        if not below and not above and value < low:
            return "L"
    if high is not None:
        if above and (value > high or (value == high and not inclusive)):
            return "H"
        if not below and not above and value > high:
            return "H"
    if below or above:
        if below and low is None and high is not None and value <= high:
            return "N"
        if above and high is None and low is not None and value >= low:
            return "N"
        return None
    return "N"


# --------------------------------------------------------------------------- the mappings

MAPPING = """\
metadata: {analyzer: fast path, protocol: PROTOCOL, version: "1"}
options:
  strip_suffix: /
  unknown_flag: UNKNOWN_FLAG
  prefer_mapping_range: false
flags:
  "025": ignore
  NORMALE: N
  CRIT: HH
status:
  Z: F
ignore:
  - HISTO
  - {code: "651", units: RLU}
  - {value_type: ED}
  - {units: "cells/uL", value_type: ST}
tests:
  GLU:
    test: GLU
    aliases: [GLUCOSE, "717"]
    units:
      ucum: mmol/L
      accept: [mmol/dm3]
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
    reference_ranges:
      - {high: 6.0, text: "< 6.0 %"}
  "651":
    test: HCG
    units: {ucum: mIU/mL}
  URINE-COL:
    test: UCOL
  K:
    test: K
    units: {ucum: mmol/L, accept: [mEq/L]}
    decimals: 2
    reference_ranges: [{low: 3.5, high: 5.1}]
    critical:
      - {age_max: 0.0833, low: 2.0, high: 7.5}
      - {sex: F, age_min: 18, low: 3.0}
      - {low: 2.5, high: 6.5}
  NA:
    test: NA
    units: {ucum: mmol/L}
    reference_ranges:
      - {sex: F, low: 136, high: 145}
      - {age_min: 1, age_max: 18, low: 133, high: 144}
    critical:
      - {sex: M, low: 120}
      - {age_min: 65, high: 160}
  TSH:
    test: TSH
    units:
      ucum: mIU/L
      accept: [uIU/mL]
      convert:
        - {from: mU/mL, factor: 1000}
  WBC:
    test: WBC
    units: {ucum: 10*9/L, accept: ["10^9/L"]}
    decimals: 2
    critical: {high: 30}
  PLT:
    test: PLT
    units: {ucum: 10*9/L}
    prefer_mapping_range: true
"""

VARIANTS = [("astm", "warn"), ("hl7", "abnormal"), ("any", "warn")]


def load(protocol: str, unknown_flag: str) -> AnalyzerMapping:
    text = MAPPING.replace("PROTOCOL", protocol).replace("UNKNOWN_FLAG", unknown_flag)
    return load_mapping_text(text, Path("fast.yaml"))


# Loaded once: the memos stay warm from one example to the next, as in the engine.
WARM = [load(*variant) for variant in VARIANTS]


# --------------------------------------------------------------------------- the inputs

CODES = [
    "GLU", "glu", " GLU ", "GLUCOSE", "717/", "717/1", "Glu/x", "CREA", "HBA1C", "651",
    "URINE-COL", "K", "k ", "NA", "TSH", "WBC", "PLT", "HISTO", "histo/", "UNKNOWN", "ZZ9",
    "", " ", "/GLU",
]
NUMBERS = [
    "4.5", "4,5", "0", "0.0", "-1", "+2.50", ".5", "5.", "2.5", "3.5", "5.1", "6.1", "25",
    "2.0", "7.5", "3.0", "136", "145", "160", "119", "100", "1e3", "1E-2", "1e400", "1e15",
    "999999999999999", "1000000000000000", "12345678901234567890.123", "0.00001",
]
TEXTS = ["POS", "NEG", "", " ", "-----", "***.**", "Positive", "4.5.6", "<", "> ", "abc"]
COMPARATORS = ["", "<", ">", "<=", ">=", "=", "< ", " > ", " "]
UNITS = [
    "mmol/L", " mmol/l ", "MMOL / L", "mmol/dm3", "mg/dL", "mg/dl", "MG / DL", "", " ", "umol/L",
    "%", "mmol/mol", "mEq/L", "mIU/mL", "RLU", "uIU/mL", "mU/mL", "10*9/L", "10^9/L",
    "cells/uL", "xyz",
]
RANGES = [
    "3.0-9.0", "<5", "> 2", "", "garbage", "3.5 - 5.1", "0.3 to 4.5", "84.0 - 94.0^REFERENCE_RANGE",
    "([ Normal : 1.5 - 4.2 ] )", "40.000000-", "-9999900 - ", '""', "-", "^", "~", "9-3",
    "<=2", ">= 10", "3,5-5,1", "1..2", "2 \u2013 4", "x" * 150, "target 5 SD 1",
    "99999999999999999999999999999999-100000000000000000000000000000000",
]
FLAGS = ["H", "L", "HH", "LL", "A", "AA", "N", "", "<", ">", "U", "D", "ZZ", '""', " h ",
         "NORMALE", "025", "POS", "NEG", "CRIT", "aa"]
STATUSES = ["F", "P", "C", "X", "", "I", "S", "R", "W", "D", "N", "Q", "V", "M", "U", "A",
            "O", "Z", "ZZ", " f "]
VALUE_TYPES = ["NM", "ST", "ED", "", "nm", "ed", " st ", "CE"]
SEXES = ["M", "F", "U", "", "male", "f", "X", " F "]

generated_numbers = st.one_of(
    st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False,
                allow_infinity=False).map(str),
    st.integers(-10, 300).map(str),
    st.decimals(min_value=0, max_value=20, places=4, allow_nan=False,
                allow_infinity=False).map(lambda d: str(d).replace(".", ",")),
)
values = st.one_of(
    st.sampled_from(NUMBERS) | generated_numbers,
    st.tuples(st.sampled_from(COMPARATORS), st.sampled_from(NUMBERS) | generated_numbers)
    .map("".join),
    st.sampled_from(TEXTS),
    st.text(alphabet="0123456789.,<>=+-eE ", max_size=8),
)
ranges = st.one_of(
    st.just(""),
    st.sampled_from(RANGES),
    st.tuples(generated_numbers, st.sampled_from(["-", " - ", " to "]), generated_numbers)
    .map("".join),
    st.text(alphabet="0123456789.,<>=- ^\"", max_size=10),
)
ages = st.one_of(
    st.none(),
    st.sampled_from([0.0, 0.01, 0.0833, 0.5, 1, 10, 17.99, 18, 18.0, 40.3, 64.9, 65, 90]),
    st.floats(min_value=0, max_value=120, allow_nan=False),
)
# Most observations are for a mapped test in one of its units (else nearly everything would
# be unmapped for its units); the rest mix any code with any units.
SPELLINGS_AND_UNITS = {
    ("GLU", "glu", " GLU ", "GLUCOSE", "717/", "717/1", "Glu/x"):
        ("mmol/L", " mmol/l ", "mmol/dm3", "mg/dL", "MG / DL"),
    ("CREA", "crea"): ("umol/L", "mg/dL", "mg/dl"),
    ("HBA1C",): ("%", "mmol/mol"),
    ("651",): ("mIU/mL", "RLU"),
    ("URINE-COL",): ("", " ", "xyz"),
    ("K", "k "): ("mmol/L", "mEq/L", "meq / l"),
    ("NA",): ("mmol/L", ""),
    ("TSH",): ("mIU/L", "uIU/mL", "mU/mL"),
    ("WBC",): ("10*9/L", "10^9/L", "cells/uL"),
    ("PLT",): ("10*9/L",),
}
matched = st.sampled_from(list(SPELLINGS_AND_UNITS.items())).flatmap(
    lambda pair: st.tuples(st.sampled_from(pair[0]), st.sampled_from(pair[1])))
code_and_units = st.one_of(
    matched, matched, matched, st.tuples(st.sampled_from(CODES), st.sampled_from(UNITS)))
flag_lists = st.one_of(
    st.just(()), st.just(("N",)), st.lists(st.sampled_from(FLAGS), max_size=3).map(tuple))


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    code, units = draw(code_and_units)
    return Observation(
        analyzer_code=code,
        value_text=draw(values),
        units=units,
        reference_range=draw(ranges),
        flags=draw(flag_lists),
        status=draw(st.sampled_from(STATUSES)),
        observed_at=draw(st.sampled_from([None, datetime(2026, 1, 2, 3, 4, 5)])),
        equipment=draw(st.sampled_from(["", "c311-1"])),
        comments=draw(st.sampled_from([(), ("sample hemolysed",)])),
        value_type=draw(st.sampled_from(VALUE_TYPES)),
    )


specimens = st.builds(SpecimenResults, specimen_id=st.sampled_from(["S1", "S2"]),
                      observations=st.lists(observations(), max_size=8).map(tuple))


def outcome(call: Callable[[], MappedSpecimen]) -> tuple[str, str]:
    """What a call gave, strictly: repr tells Decimal('1.0') from Decimal('1.00') and True
    from 1, which == does not; an exception counts by type and text."""
    try:
        return "ok", repr(call())
    except Exception as exc:  # noqa: BLE001 - both implementations must fail alike
        return type(exc).__name__, str(exc)


def check(mapping: AnalyzerMapping, specimen: SpecimenResults, sex: str,
          age: float | None) -> None:
    expected = outcome(lambda: ref_map_specimen(mapping, specimen, sex=sex, age_years=age))
    # twice: the first call may fill memos, the second reads them
    for _ in range(2):
        got = outcome(lambda: mapping.map_specimen(specimen, sex=sex, age_years=age))
        assert got == expected


# --------------------------------------------------------------------------- the tests


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variant=st.sampled_from(range(len(VARIANTS))), specimen=specimens,
       sex=st.sampled_from(SEXES), age=ages)
def test_same_as_the_plain_implementation(variant: int, specimen: SpecimenResults, sex: str,
                                          age: float | None) -> None:
    check(WARM[variant], specimen, sex, age)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specimen=specimens, sex=st.sampled_from(SEXES), age=ages)
def test_same_when_memos_are_forgotten_all_the_time(specimen: SpecimenResults, sex: str,
                                                    age: float | None) -> None:
    original = mapping_module._MEMO_LIMIT
    mapping_module._MEMO_LIMIT = 2
    try:
        mapping = load("astm", "warn")
    finally:
        mapping_module._MEMO_LIMIT = original
    check(mapping, specimen, sex, age)
    assert all(len(memo) <= 2 for memo in (
        mapping._memos.codes, mapping._memos.units, mapping._memos.numbers,
        mapping._memos.ranges, mapping._memos.flags, mapping._memos.statuses))


def test_memos_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapping_module, "_MEMO_LIMIT", 50)
    mapping = load("hl7", "warn")
    for n in range(500):
        specimen = SpecimenResults("S", (
            Observation(f"C{n}", f"{n}.5", f"u{n}", f"{n}-{n + 1}", (f"F{n}",), f"S{n}"),
            Observation("K", f"{n}.25", "mmol/L", f"1-{n + 2}", ("H",), "F"),
        ))
        assert repr(mapping.map_specimen(specimen)) == repr(ref_map_specimen(mapping,
                                                                             specimen))
    memos = mapping._memos
    for memo in (memos.codes, memos.units, memos.numbers, memos.ranges, memos.flags,
                 memos.statuses):
        assert 0 < len(memo) <= 50


def test_long_text_is_not_memoised() -> None:
    mapping = load("hl7", "warn")
    narrative = "Smear reviewed: " + "no abnormal cells seen. " * 20
    long_range = "see the laboratory handbook, " * 12
    specimen = SpecimenResults("S", (
        Observation("URINE-COL", narrative, "", long_range, ("N",) * 300, "F"),))
    assert repr(mapping.map_specimen(specimen)) == repr(ref_map_specimen(mapping, specimen))
    memos = mapping._memos
    assert narrative not in memos.numbers
    assert ("N",) * 300 not in memos.flags
    assert not any(key[2] == long_range for key in memos.ranges)
    assert "URINE-COL" in memos.codes  # short text is


def test_a_range_that_cannot_be_shown_fails_when_used_not_at_load() -> None:
    # Formatting a range to its decimals can fail (too many digits); as before, the mapping
    # loads and only a result that shows that range fails.
    mapping = load_mapping_text("""
metadata: {analyzer: t, protocol: hl7, version: "1"}
tests:
  K:
    test: K
    decimals: 8
    reference_ranges: [{low: 100000000000000000000000000000000.0}]
""", Path("big.yaml"))
    kept = SpecimenResults("S", (Observation("K", "POS", reference_range="see note"),))
    assert mapping.map_specimen(kept).results[0].reference_range == "see note"
    shown = SpecimenResults("S", (Observation("K", "POS"),))
    assert outcome(lambda: mapping.map_specimen(shown)) == outcome(
        lambda: ref_map_specimen(mapping, shown))
    assert outcome(lambda: mapping.map_specimen(shown))[0] == "InvalidOperation"
