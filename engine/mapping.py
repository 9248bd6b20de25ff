"""The mapping engine: analyzer vocabulary -> LIS vocabulary (DESIGN.md, "Contracts").

A mapping file (YAML, one per analyzer model; format in ``mappings/README.md``) says, per
analyzer code, which LIS test it is, which units the analyzer may send and how they convert
to the UCUM unit the LIS stores, how many decimals to keep, reference ranges by sex and age,
critical limits, and how analyzer flags normalise to ``L H LL HH A N``.

``load_mapping`` validates the whole file and reports *every* problem with file, line, key
path and what was expected. ``AnalyzerMapping.map_specimen`` runs for every message, so all
lookups are compiled at load time into plain dicts, and what each analyzer text (code, units,
range, flags, status, value) means is worked out once and remembered in bounded memos.

Safety rules:
- a code the mapping does not know is never dropped: it comes back in ``unmapped`` (the
  pipeline holds the message with ``UNMAPPED_CODE``) unless the mapping lists it under
  ``ignore:`` on purpose;
- a unit the mapping does not declare for a test is never passed through: the code counts
  as unmapped with the reason;
- the raw value text, units and flags are kept beside the mapped ones.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, TypeVar

import structlog
import yaml

from drivers.model import Observation, SpecimenResults, parse_number
from engine.errors import MappingError
from lis_bridge.types import ResultInput

log = structlog.get_logger(__name__)

__all__ = [
    "NORMALISED_FLAGS",
    "UNMAPPED_DETAIL_PREFIX",
    "AnalyzerMapping",
    "MappedSpecimen",
    "OrderCodes",
    "ReferenceRange",
    "TestMapping",
    "UnitConversion",
    "UnmappedCode",
    "format_unmapped_detail",
    "load_mapping",
    "load_mapping_text",
    "parse_unmapped_detail",
]

# The pipeline writes hold_detail exactly as "unmapped analyzer codes: A, B" (optionally
# followed by "; more text"); `labrelay mapping unmapped` reads it back.
UNMAPPED_DETAIL_PREFIX = "unmapped analyzer codes: "
NO_CODE = "(no code)"

NORMALISED_FLAGS = ("L", "H", "LL", "HH", "A", "N")
_FLAG_SEVERITY = {"": 0, "N": 1, "A": 2, "L": 3, "H": 3, "LL": 4, "HH": 4}

# PROTOCOLS 69 (LIS02 R-7) and 93 (HL7 table 0078). `<` / `>` mean "below / above the
# instrument's measuring range", i.e. low / high. U D B W are delta flags (significant change
# up / down, better, worse): they say nothing about the reference range, so they normalise to
# "" and the flag is computed from the range instead. "" means "no normalised flag".
DEFAULT_FLAGS: dict[str, str] = {
    "L": "L",
    "H": "H",
    "LL": "LL",
    "HH": "HH",
    "<": "L",
    ">": "H",
    "N": "N",
    "A": "A",
    "AA": "A",
    "U": "",
    "D": "",
    "B": "",
    "W": "",
    "POS": "A",
    "DET": "A",
    "NEG": "N",
    "ND": "N",
}

# Result status -> ResultInput status (P F C X). PROTOCOLS 69 (ASTM R-9) and 93 (HL7 table
# 0085) give some letters different meanings, so the table depends on the protocol. Anything
# unknown becomes P (preliminary) with a warning: a result is never made final by guessing.
_STATUS_COMMON = {"F": "F", "P": "P", "C": "C", "X": "X", "": "F", "I": "P", "S": "P"}
_STATUS_ASTM = {
    **_STATUS_COMMON,
    "R": "F",  # previously transmitted (a resend of a final result)
    "V": "F",  # operator verified
    "M": "F",  # MIC level
    "Q": "F",  # response to query
    "N": "P",  # result needs a new order run
    "W": "P",  # warning: the instrument wants a human to look; never auto-final
}
_STATUS_HL7 = {
    **_STATUS_COMMON,
    "R": "P",  # results entered, not verified
    "A": "P",  # some, not all, results available
    "O": "P",  # order received, specimen not yet received
    "U": "F",  # changed to final without retransmitting
    "D": "X",  # deleted
    "W": "X",  # posted as wrong (e.g. wrong patient)
    "N": "X",  # not asked
}
_STATUS_ANY = {**_STATUS_HL7, "R": "P", "W": "P", "V": "F", "M": "F", "Q": "F", "N": "P"}
_STATUS_BY_PROTOCOL = {"astm": _STATUS_ASTM, "hl7": _STATUS_HL7, "any": _STATUS_ANY}
_RESULT_STATUSES = ("P", "F", "C", "X")

_MAX_FILE_BYTES = 4 * 1024 * 1024
_MAX_NODES = 200_000
# Numeric(24, 8) in the results table: larger magnitudes cannot be stored as numbers.
_MAX_DIGITS = 15
_ABSURD_EXPONENT = 9999
_MAX_MAGNITUDE = Decimal(10) ** _MAX_DIGITS
_REFERENCE_RANGE_MAX = 100  # results.reference_range is String(100)

# With its exponent, as parse_number reads a value: a viral load's range "2.0E+01-1.7E+08"
# was read as "+01 - 1.7" (the search began inside the first number), so a value above
# the range could be flagged normal, and the wrong range was shown.
_NUMBER_TEXT = r"[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?"
# "3.08 - 6.44", "0.3 to 4.5", "84.0 - 94.0^REFERENCE_RANGE", "([ Normal : 1.5 - 4.2 ] )",
# "40.000000-" (open upper bound), "-9999900 - " (PROTOCOLS 69, 94).
_RANGE_TWO = re.compile(
    rf"(?P<low>{_NUMBER_TEXT})\s*(?:-|\u2013|to|\.\.)\s*(?P<high>{_NUMBER_TEXT})?", re.IGNORECASE
)
_RANGE_ONE = re.compile(rf"^\s*(?P<op>[<>]=?)\s*(?P<value>{_NUMBER_TEXT})\s*$")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True, slots=True)
class UnitConversion:
    """``value_in_ucum = value_from * factor + offset``."""

    from_units: str
    factor: Decimal
    offset: Decimal = Decimal(0)

    def apply(self, value: Decimal) -> Decimal:
        return value * self.factor + self.offset

    def invert(self, value: Decimal) -> Decimal:
        return (value - self.offset) / self.factor


@dataclass(frozen=True, slots=True)
class ReferenceRange:
    """One reference range; sex "" = any, ages in years (min inclusive, max exclusive)."""

    low: Decimal | None
    high: Decimal | None
    sex: str = ""
    age_min: Decimal | None = None
    age_max: Decimal | None = None
    text: str = ""

    def matches(self, sex: str, age_years: float | None) -> bool:
        if self.sex and self.sex != sex:
            return False
        if self.age_min is None and self.age_max is None:
            return True
        if age_years is None:
            return False
        age = Decimal(str(age_years))
        if self.age_min is not None and age < self.age_min:
            return False
        return not (self.age_max is not None and age >= self.age_max)

    def display(self, decimals: int | None) -> str:
        if self.text:
            return self.text
        return _range_text(self.low, self.high, decimals)


def _first_match(entries: Sequence[ReferenceRange], sex: str,
                 age_years: float | None) -> ReferenceRange | None:
    """The first entry for this sex and age; a sex-specific one beats an "any" one."""
    fallback = None
    for candidate in entries:
        if candidate.matches(sex, age_years):
            if candidate.sex:
                return candidate
            if fallback is None:
                fallback = candidate
    return fallback


@dataclass(frozen=True, slots=True)
class TestMapping:
    """How one analyzer code maps to one LIS test (compiled from ``tests.<code>``)."""

    analyzer_code: str  # as written in the file
    test_code: str
    name: str = ""
    panel: str = ""
    ucum: str = ""
    accepted_units: tuple[str, ...] = ()
    conversions: tuple[UnitConversion, ...] = ()
    decimals: int | None = None
    reference_ranges: tuple[ReferenceRange, ...] = ()
    # critical limits: one entry for everyone (critical: {low, high}), or entries by sex
    # and age (critical: [{sex, age_min, age_max, low, high}, ...]); text is unused
    critical_limits: tuple[ReferenceRange, ...] = ()
    prefer_mapping_range: bool = False
    aliases: tuple[str, ...] = ()
    order_code: str = ""
    line: int = 0
    # normalised analyzer unit -> conversion (None = already in the UCUM unit)
    unit_table: dict[str, UnitConversion | None] = field(default_factory=dict, repr=False)

    def range_for(self, sex: str, age_years: float | None) -> ReferenceRange | None:
        """The first range for this sex and age; a sex-specific one beats an "any" one."""
        return _first_match(self.reference_ranges, sex, age_years)

    def critical_for(self, sex: str, age_years: float | None) -> ReferenceRange | None:
        """The critical limits for this sex and age, chosen as ranges are (None: none)."""
        return _first_match(self.critical_limits, sex, age_years)

    @property
    def by_patient(self) -> bool:
        """Whether a range or a critical limit depends on the patient's sex or age."""
        return any(r.sex or r.age_min is not None or r.age_max is not None
                   for r in (*self.reference_ranges, *self.critical_limits))

    def declared_units(self) -> list[str]:
        units = [self.ucum, *self.accepted_units, *(c.from_units for c in self.conversions)]
        return [u if u else '""' for u in dict.fromkeys(units)]


@dataclass(frozen=True, slots=True)
class UnmappedCode:
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class MappedSpecimen:
    specimen_id: str
    results: tuple[ResultInput, ...] = ()
    unmapped: tuple[UnmappedCode, ...] = ()
    ignored: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def hold_detail(self) -> str:
        """The text the pipeline stores when it holds the message (``UNMAPPED_CODE``)."""
        return format_unmapped_detail(self.unmapped)


@dataclass(frozen=True, slots=True)
class OrderCodes:
    """Reverse lookup: analyzer codes to send for LIS test codes, and the ones with none."""

    analyzer_codes: tuple[str, ...]
    missing_test_codes: tuple[str, ...]


def format_unmapped_detail(unmapped: Sequence[UnmappedCode]) -> str:
    codes = ", ".join(dict.fromkeys(u.code for u in unmapped))
    reasons = "; ".join(f"{u.code}: {u.reason}" for u in unmapped[:5])
    return f"{UNMAPPED_DETAIL_PREFIX}{codes}; {reasons}" if reasons else ""


def parse_unmapped_detail(detail: str) -> list[str]:
    """The analyzer codes out of ``unmapped analyzer codes: A, B[; more text]``."""
    if not detail.startswith(UNMAPPED_DETAIL_PREFIX):
        return []
    listed = detail[len(UNMAPPED_DETAIL_PREFIX):].split("; ", 1)[0]
    return [code.strip() for code in listed.split(", ") if code.strip()]


# --------------------------------------------------------------------------- hot-path helpers

# ResultInput's fields, in order: map_specimen passes them by position, which costs a good
# deal less than by keyword on a path that builds one per result. Checked at import so a
# reordering in lis_bridge fails loudly instead of shuffling values between fields.
_RESULT_FIELDS = (
    "test_code", "analyzer_code", "value_text", "value_number", "comparator", "units",
    "reference_range", "flag", "is_critical", "status", "observed_at", "equipment",
    "comments", "raw_units", "raw_flags",
)
if tuple(f.name for f in fields(ResultInput))[:len(_RESULT_FIELDS)] != _RESULT_FIELDS:
    raise ImportError("lis_bridge.types.ResultInput's fields changed order; update "
                      "engine.mapping._RESULT_FIELDS and AnalyzerMapping._map_observation")

# Memo keys are analyzer text, which comes from outside, so no memo may grow without
# bound: a memo holds so many entries before it starts again, and does not keep a key
# longer than so many characters (a narrative text result, say) at all.
_MEMO_LIMIT = 4096
_MEMO_KEY_CHARS = 256

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")

_Bounds = tuple[Decimal | None, Decimal | None]


class _Memo(dict[_K, _V]):
    """``memo[key]`` is ``compute(key)``, computed once; forgotten wholesale past the limit.

    ``compute`` must depend on the key alone (and on the mapping, which does not change
    once loaded), so a memoised answer is always the answer.
    """

    __slots__ = ("_compute", "_limit")

    def __init__(self, compute: Callable[[_K], _V]) -> None:
        super().__init__()
        self._compute = compute
        self._limit = _MEMO_LIMIT

    def __missing__(self, key: _K) -> _V:
        value = self._compute(key)
        if _key_chars(key) <= _MEMO_KEY_CHARS:
            if len(self) >= self._limit:
                self.clear()
            self[key] = value
        return value


def _key_chars(key: object) -> int:
    """The characters of text in a memo key (a string, or a tuple holding strings)."""
    if isinstance(key, str):
        return len(key)
    if isinstance(key, tuple):
        return sum(_key_chars(part) for part in key)
    return 0


@dataclass(frozen=True, slots=True, eq=False)
class _CompiledTest:
    """What map_specimen needs of one TestMapping beyond the entry itself, worked out at
    load. Compared (and hashed) by identity: it is part of memo keys."""

    rule: TestMapping
    # the end of the "units ... are not declared" reason
    undeclared_units: str
    # reference ranges / critical limits: chosen per patient, or the same for everyone
    range_by_patient: bool
    fixed_range: ReferenceRange | None
    critical_by_patient: bool
    fixed_critical: ReferenceRange | None
    # id(reference range) -> its display, filled on first use: formatting may fail (a
    # range too long for the decimals), and must fail as before, when a result needs it
    displays: dict[int, str] = field(default_factory=dict)

    @classmethod
    def compile(cls, rule: TestMapping) -> _CompiledTest:
        range_by_patient = _by_patient(rule.reference_ranges)
        critical_by_patient = _by_patient(rule.critical_limits)
        return cls(
            rule=rule,
            undeclared_units=f"(declared: {', '.join(rule.declared_units())}); add them to "
                             f"tests.{rule.analyzer_code}.units (accept, or convert with a "
                             "factor)",
            range_by_patient=range_by_patient,
            # not by patient: every entry matches everyone, so the choice is fixed
            fixed_range=None if range_by_patient else rule.range_for("U", None),
            critical_by_patient=critical_by_patient,
            fixed_critical=None if critical_by_patient else rule.critical_for("U", None),
        )

    def range_for(self, sex: str, age_years: float | None) -> ReferenceRange | None:
        if not self.range_by_patient:
            return self.fixed_range
        return self.rule.range_for(sex, age_years)

    def display(self, chosen: ReferenceRange) -> str:
        """``chosen.display(decimals)``, formatted once per range."""
        shown = self.displays.get(id(chosen))
        if shown is None:
            shown = self.displays[id(chosen)] = chosen.display(self.rule.decimals)
        return shown


def _by_patient(entries: Sequence[ReferenceRange]) -> bool:
    # With no sex and no ages anywhere, every entry matches everyone: the first one wins.
    return any(r.sex or r.age_min is not None or r.age_max is not None for r in entries)


class _RangeReading(NamedTuple):
    """What the analyzer's range text means for one test in one unit."""

    shown: str | None  # the range to show; None: the mapping's range for the patient
    bounds: _Bounds | None  # the bounds flags are decided on, when own_bounds
    own_bounds: bool  # False: the mapping's range for the patient gives the bounds
    warning: str  # "" or a warning, without the "<code>: " it is given per result


class _FlagReading(NamedTuple):
    """What an observation's analyzer flags say, under this mapping's flag table."""

    flag: str  # normalised, "" for none
    warnings: tuple[str, ...]  # without the "<code>: " they are given per result
    critical_text: bool  # HL7 AA (critically abnormal) among them
    raw: str  # the flags as sent, comma-separated (ResultInput.raw_flags)


class _Memos:
    """map_specimen's memos for one mapping. Analyzers send the same codes, units, ranges,
    flags and statuses in message after message, so what each text means under this mapping
    is worked out on first sight and remembered."""

    __slots__ = ("codes", "flags", "ignore_rules", "numbers", "ranges", "statuses", "units")

    def __init__(self, mapping: AnalyzerMapping) -> None:
        # analyzer code as sent -> (stripped, normalised, its test or None)
        self.codes: _Memo[str, tuple[str, str, _CompiledTest | None]] = _Memo(mapping._read_code)
        # units as sent -> (unit key, stripped)
        self.units: _Memo[str, tuple[str, str]] = _Memo(_read_units)
        # value text -> (comparator, number, too large to store)
        self.numbers: _Memo[str, tuple[str, Decimal | None, bool]] = _Memo(_read_number)
        # (test, unit key, range text as sent) -> reading
        self.ranges: _Memo[tuple[_CompiledTest, str, str], _RangeReading] = _Memo(_read_range)
        self.flags: _Memo[tuple[str, ...], _FlagReading] = _Memo(mapping._read_flags)
        # status as sent -> (result status, "" or warning without "<code>: ")
        self.statuses: _Memo[str, tuple[str, str]] = _Memo(mapping._read_status)
        # (normalised code, unit key, value type as sent) -> ignored on purpose
        self.ignore_rules: _Memo[tuple[str, str, str], bool] = _Memo(mapping._read_ignore)


# --------------------------------------------------------------------------- the mapping


@dataclass(frozen=True)
class AnalyzerMapping:
    """A validated mapping file, with its lookups compiled."""

    source: Path
    analyzer: str
    protocol: str
    version: str
    description: str
    tests: tuple[TestMapping, ...]
    ignore_codes: tuple[str, ...]
    case_sensitive: bool = False
    strip_suffix: str = ""
    prefer_mapping_range: bool = False
    unknown_flag: str = "warn"
    flag_table: dict[str, str] = field(default_factory=dict, repr=False)
    status_table: dict[str, str] = field(default_factory=dict, repr=False)
    _by_code: dict[str, TestMapping] = field(default_factory=dict, repr=False)
    _ignored: frozenset[str] = frozenset()
    _ignore_rules: tuple[tuple[str | None, str | None, str | None], ...] = ()
    _order_code: dict[str, str] = field(default_factory=dict, repr=False)
    # compiled in __post_init__ for map_specimen: normalised code -> its test, and memos
    _compiled: dict[str, _CompiledTest] = field(init=False, repr=False, compare=False)
    _memos: _Memos = field(init=False, repr=False, compare=False)

    # -- lookups ---------------------------------------------------------------------------

    def normalise_code(self, code: str) -> str:
        return _normalise_code(code, self.strip_suffix, self.case_sensitive)

    def find(self, analyzer_code: str) -> TestMapping | None:
        """The test an analyzer code (as the analyzer sends it) maps to, or None."""
        return self._by_code.get(self.normalise_code(analyzer_code))

    def is_ignored(self, analyzer_code: str) -> bool:
        return self.normalise_code(analyzer_code) in self._ignored

    def lis_codes(self) -> set[str]:
        return {t.test_code for t in self.tests}

    def test(self, test_code: str) -> TestMapping | None:
        """The entry that orders ``test_code`` (name, panel, units for reports)."""
        code = self._order_code.get(test_code)
        return self._by_code.get(self.normalise_code(code)) if code is not None else None

    def order_codes(self, test_codes: Sequence[str]) -> OrderCodes:
        found: dict[str, None] = {}
        missing: dict[str, None] = {}
        for test_code in test_codes:
            code = self._order_code.get(test_code)
            if code is None:
                missing[test_code] = None
            else:
                found[code] = None
        return OrderCodes(tuple(found), tuple(missing))

    def analyzer_codes_for(self, test_codes: Sequence[str]) -> list[str]:
        """Analyzer codes to send for these LIS tests (host query answers, order downloads).

        A LIS test with no analyzer code in this mapping is left out and logged
        (``mapping.order.unmapped_tests``); use :meth:`order_codes` to get the list.
        """
        answer = self.order_codes(test_codes)
        if answer.missing_test_codes:
            log.warning(
                "mapping.order.unmapped_tests",
                mapping=str(self.source),
                test_codes=list(answer.missing_test_codes),
            )
        return list(answer.analyzer_codes)

    # -- the hot path ----------------------------------------------------------------------

    def __post_init__(self) -> None:
        # What map_specimen needs, per normalised code, beyond the TestMapping (shared by
        # a code and its aliases), and its memos.
        compiled = {id(rule): _CompiledTest.compile(rule) for rule in self.tests}
        object.__setattr__(self, "_compiled", {
            key: compiled[id(rule)] for key, rule in self._by_code.items()})
        object.__setattr__(self, "_memos", _Memos(self))

    def map_specimen(
        self, specimen: SpecimenResults, *, sex: str = "U", age_years: float | None = None
    ) -> MappedSpecimen:
        """Translate one specimen's observations into LIS results."""
        sex = _normalise_sex(sex)
        memos = self._memos
        results: list[ResultInput] = []
        unmapped: list[UnmappedCode] = []
        ignored: list[str] = []
        warnings: list[str] = []
        seen: set[str] = set()
        repeated: set[str] = set()
        for observation in specimen.observations:
            raw_code, key, test = memos.codes[observation.analyzer_code]
            units_key, units = memos.units[observation.units]
            if self._ignore_rules and memos.ignore_rules[
                    (key, units_key, observation.value_type)]:
                ignored.append(raw_code or NO_CODE)
                continue
            if not raw_code:
                unmapped.append(UnmappedCode(NO_CODE, "the observation has no analyzer code "
                                             "(check the driver's code_field option)"))
                continue
            if test is None:
                if key in self._ignored:
                    ignored.append(raw_code)
                else:
                    unmapped.append(UnmappedCode(
                        raw_code,
                        f"no entry for analyzer code {raw_code!r} in {self.source.name}; "
                        "map it under tests: or list it under ignore:",
                    ))
                continue
            if key not in seen:
                seen.add(key)
            elif key not in repeated:  # warned once per code, at its second appearance
                repeated.add(key)
                warnings.append(f"analyzer code {raw_code} appears more than once")
            outcome = self._map_observation(test, observation, raw_code, units_key, units,
                                            sex, age_years, warnings)
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

    def _map_observation(
        self,
        test: _CompiledTest,
        observation: Observation,
        raw_code: str,
        units_key: str,
        units: str,
        sex: str,
        age_years: float | None,
        warnings: list[str],
    ) -> ResultInput | UnmappedCode:
        rule = test.rule
        memos = self._memos
        comparator, number, too_large = memos.numbers[observation.value_text]
        try:
            conversion = rule.unit_table[units_key]
        except KeyError:
            if number is not None or units_key:
                return UnmappedCode(raw_code, f"units {units!r} are not declared for "
                                    f"{rule.test_code} {test.undeclared_units}")
            conversion = None  # a text result without units: nothing to convert

        # Converting or rounding makes a new number, so "too large" is decided again.
        converts = conversion is not None or rule.decimals is not None
        if number is not None and converts:
            number = _convert_and_round(number, conversion, rule.decimals)
            too_large = number is not None and abs(number) >= _MAX_MAGNITUDE
        if too_large:
            warnings.append(f"{raw_code}: value too large to store as a number; kept as text")
            number = None

        shown_range, bounds, own_bounds, range_warning = memos.ranges[
            (test, units_key, observation.reference_range)]
        if range_warning:
            warnings.append(f"{raw_code}: {range_warning}")
        if own_bounds:
            reference_range = shown_range or ""  # always text here
        else:
            # The mapping's range for the patient gives the bounds, and the display unless
            # the analyzer's unreadable text is kept.
            chosen = test.range_for(sex, age_years)
            bounds = None if chosen is None else (chosen.low, chosen.high)
            if shown_range is not None:
                reference_range = shown_range
            else:
                reference_range = "" if chosen is None else test.display(chosen)

        flag, flag_warnings, critical_text, raw_flags = memos.flags[observation.flags]
        for warning in flag_warnings:
            warnings.append(f"{raw_code}: {warning}")
        if number is not None and bounds is not None and flag in ("", "N"):
            # The range printed beside the value decides when the analyzer sent no flag, or
            # only N: a report must never show a value outside its range unflagged.
            flag = _flag_from_range(comparator, number, bounds[0], bounds[1]) or flag
        # HL7 table 0078 AA = critically abnormal: critical even for a text result.
        is_critical = flag in ("LL", "HH") or critical_text
        limits = (test.fixed_critical if not test.critical_by_patient
                  else rule.critical_for(sex, age_years))
        if number is not None and limits is not None:
            critical = _flag_from_range(comparator, number, limits.low, limits.high)
            if critical in ("L", "H"):
                is_critical = True
                flag = "LL" if critical == "L" else "HH"

        status, status_warning = memos.statuses[observation.status]
        if status_warning:
            warnings.append(f"{raw_code}: {status_warning}")

        value_text = observation.value_text
        comments = observation.comments
        if number is not None and converts:
            # What is shown is the number flags and critical limits were decided on
            # (converted, rounded to the mapping's decimals) in the unit shown beside it:
            # never "90 mmol/L" for 90 mg/dL. The analyzer's own text is kept as a comment
            # when it differs, and byte for byte in the stored message.
            shown = f"{comparator}{number:f}"
            if _plain(shown) != _plain(value_text):
                comments = (*comments, f"as sent by the analyzer: {value_text.strip()} "
                            f"{units}".rstrip())
            value_text = shown
        # by position, in _RESULT_FIELDS order (checked at import)
        return ResultInput(
            rule.test_code,  # test_code
            raw_code,  # analyzer_code
            value_text,  # value_text
            number,  # value_number
            comparator,  # comparator
            # a text result (POSITIVE) has no unit of its own to show
            rule.ucum if number is not None else units,  # units
            reference_range,  # reference_range
            flag,  # flag
            is_critical,  # is_critical
            status,  # status
            observation.observed_at,  # observed_at
            observation.equipment,  # equipment
            comments,  # comments
            observation.units,  # raw_units
            raw_flags,  # raw_flags
        )

    # -- what analyzer text means under this mapping (computed once, see _Memos) ------------

    def _read_code(self, code: str) -> tuple[str, str, _CompiledTest | None]:
        raw_code = code.strip()
        key = self.normalise_code(raw_code)
        return raw_code, key, self._compiled.get(key)

    def _read_ignore(self, key: tuple[str, str, str]) -> bool:
        code_key, units_key, value_type = key
        value_type = value_type.strip().upper()
        for code, units, wanted_type in self._ignore_rules:
            if code is not None and code != code_key:
                continue
            if units is not None and units != units_key:
                continue
            if wanted_type is not None and wanted_type != value_type:
                continue
            return True
        return False

    def _read_flags(self, flags: tuple[str, ...]) -> _FlagReading:
        best = ""
        directions: set[str] = set()
        warnings: list[str] = []
        for raw in flags:
            text = raw.strip().upper()
            if not text or text == '""':
                continue
            normal = self.flag_table.get(text)
            if normal is None:
                if self.unknown_flag == "abnormal":
                    normal = "A"
                else:
                    warnings.append(f"analyzer flag {raw.strip()!r} is not in the flag table; "
                                    "ignored (add it under flags:)")
                    continue
            if normal in ("L", "LL"):
                directions.add("L")
            elif normal in ("H", "HH"):
                directions.add("H")
            if _FLAG_SEVERITY[normal] > _FLAG_SEVERITY[best]:
                best = normal
        if len(directions) == 2:
            warnings.append(f"analyzer flags {','.join(flags)} say both low and high; "
                            "flagged A")
            best = "A"
        critical_text = any(f.strip().upper() == "AA" for f in flags)
        return _FlagReading(best, tuple(warnings), critical_text, ",".join(flags))

    def _read_status(self, status: str) -> tuple[str, str]:
        status_raw = status.strip().upper()
        known = self.status_table.get(status_raw)
        if known is None:
            # a result is never made final by guessing
            return "P", (f"result status {status_raw!r} is not known; stored as "
                         "preliminary (P)")
        return known, ""


# --------------------------------------------------------------------------- value helpers


def _normalise_code(code: str, strip_suffix: str, case_sensitive: bool) -> str:
    code = code.strip()
    if strip_suffix:
        cut = code.find(strip_suffix)
        if cut > 0:
            code = code[:cut].rstrip()
    return code if case_sensitive else code.casefold()


def _unit_key(units: str) -> str:
    # " umol/L " (Mindray) and "Copies / mL" (Abbott): spaces carry no meaning in a unit.
    # Case is folded: analyzers mix "mmol/l" and "mmol/L" (PROTOCOLS 69).
    return "".join(units.split()).casefold()


def _read_units(units: str) -> tuple[str, str]:
    return _unit_key(units), units.strip()


def _read_number(text: str) -> tuple[str, Decimal | None, bool]:
    """(comparator, number, too large to store) from a value as sent; "=" is no comparator."""
    comparator, number = parse_number(text)
    if comparator == "=":
        comparator = ""
    if number is None:
        return comparator, None, False
    # Judged by the exponent, not by abs(number) >= _MAX_MAGNITUDE: an analyzer's
    # "1e99999999999" overflows the decimal context, an exception that would fail the whole
    # message. For a nonzero number the two tests agree. An absurd exponent is kept as text
    # before any arithmetic: too large (with the warning) when the number is, else (zero,
    # or 1e-99999999999) as no number at all; PostgreSQL reads neither.
    exponent = number.adjusted()
    if not -_ABSURD_EXPONENT <= exponent <= _ABSURD_EXPONENT:
        if number and exponent > 0:
            return comparator, None, True
        return "", None, False
    return comparator, number, bool(number) and exponent >= _MAX_DIGITS


def _read_range(key: tuple[_CompiledTest, str, str]) -> _RangeReading:
    """What the analyzer's range text means for one test when its value came in one unit:
    the analyzer's range is used when it sends one (converted with the value), unless the
    test prefers the mapping's range."""
    test, units_key, analyzer_text = key
    rule = test.rule
    conversion = rule.unit_table.get(units_key)  # None for a text result without units
    text = analyzer_text.strip()
    if rule.prefer_mapping_range or not _meaningful_range(text):
        return _RangeReading(None, None, False, "")
    parsed = _parse_range(text)
    if parsed is None:
        if conversion is not None:
            return _RangeReading(None, None, False, (
                f"the analyzer's range {text!r} is in {conversion.from_units} and "
                "unreadable; the mapping's range is used"))
        # Kept as the analyzer wrote it; a flag can still come from the mapping.
        return _RangeReading(text[:_REFERENCE_RANGE_MAX], None, False, "")
    if conversion is not None:
        low = _convert_and_round(parsed[0], conversion, rule.decimals)
        high = _convert_and_round(parsed[1], conversion, rule.decimals)
        return _RangeReading(_range_text(low, high, rule.decimals), (low, high), True, "")
    return _RangeReading(_range_text(parsed[0], parsed[1], None, raw=parsed[2]), parsed[:2],
                         True, "")


def _normalise_sex(sex: str) -> str:
    first = sex.strip()[:1].upper()
    return first if first in ("M", "F") else "U"


def _round(value: Decimal, decimals: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _round_significant(value: Decimal, digits: int) -> Decimal:
    if value.is_zero():
        return value
    return value.quantize(
        Decimal(1).scaleb(value.adjusted() - digits + 1), rounding=ROUND_HALF_UP
    )


def _plain(text: str) -> str:
    return "".join(text.split())


def _convert_and_round(
    value: Decimal | None, conversion: UnitConversion | None, decimals: int | None
) -> Decimal | None:
    """Convert, then round: to ``decimals`` places when declared; after a conversion without
    declared decimals, to the input's significant digits (at least 3) so 90 mg/dL does not
    become 4.99500 mmol/L."""
    if value is None:
        return None
    try:
        if conversion is not None:
            converted = conversion.apply(value)
            if decimals is not None:
                return _round(converted, decimals)
            return _round_significant(converted, max(len(value.as_tuple().digits), 3))
        if decimals is not None:
            return _round(value, decimals)
        return value
    except ArithmeticError:  # InvalidOperation; Overflow of an absurd exponent
        return None


def _format_number(value: Decimal, decimals: int | None) -> str:
    if decimals is not None:
        value = _round(value, decimals)
    return f"{value:f}"


def _range_text(
    low: Decimal | None,
    high: Decimal | None,
    decimals: int | None,
    *,
    raw: tuple[str, str] | None = None,
) -> str:
    low_text = raw[0] if raw and raw[0] else (
        _format_number(low, decimals) if low is not None else "")
    high_text = raw[1] if raw and raw[1] else (
        _format_number(high, decimals) if high is not None else "")
    if low is not None and high is not None:
        return f"{low_text} - {high_text}"
    if low is not None:
        return f"> {low_text}"
    if high is not None:
        return f"< {high_text}"
    return ""


def _meaningful_range(text: str) -> bool:
    # HL7 null `""`, Mindray "-", Mindray ASTM "^" carry no range (PROTOCOLS 94).
    return bool(text.strip(' -^"~'))


@lru_cache(maxsize=4096)
def _parse_range(text: str) -> tuple[Decimal | None, Decimal | None, tuple[str, str]] | None:
    """``(low, high, (low_text, high_text))`` from analyzer range text, or None."""
    one = _RANGE_ONE.match(text.split("^", 1)[0])
    if one:
        value_text = one.group("value")
        value = _range_number(value_text)
        if value is None:
            return None
        if one.group("op").startswith("<"):
            return None, value, ("", value_text)
        return value, None, (value_text, "")
    two = _RANGE_TWO.search(text)
    if not two:
        return None
    low_text, high_text = two.group("low"), two.group("high") or ""
    low = _range_number(low_text)
    high = _range_number(high_text) if high_text else None
    if low is None or (high_text and high is None):
        return None
    if high is not None and high < low:
        return None
    return low, high, (low_text, high_text)


def _range_number(text: str) -> Decimal | None:
    """A bound of an analyzer's range, or None when it is no number to compute with: an
    exponent Decimal refuses (1E-4999...9), or an absurd one (1e99999999999; arithmetic
    on it overflows). The range text is then shown as sent and no flag comes from it."""
    try:
        number = Decimal(text.replace(",", "."))
    except InvalidOperation:
        return None
    if number and not -_ABSURD_EXPONENT <= number.adjusted() <= _ABSURD_EXPONENT:
        return None
    return number


def _flag_from_range(
    comparator: str, value: Decimal, low: Decimal | None, high: Decimal | None
) -> str | None:
    """"L", "H", "N" or None when the value with its comparator cannot be placed.

    ``<2.00`` is surely below a limit of 2.5 but cannot be placed against a limit of 1;
    outside means strictly below low / strictly above high.
    """
    if low is None and high is None:
        return None
    if not comparator:  # the common case, a plain value: the rules below reduce to this
        if low is not None and value < low:
            return "L"
        if high is not None and value > high:
            return "H"
        return "N"
    below = comparator.startswith("<")
    above = comparator.startswith(">")
    inclusive = comparator.endswith("=")  # "<=2.5" may be exactly 2.5
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
        # "< x" is inside only when the whole interval below x is inside, which a lower
        # limit makes impossible to say; likewise "> x" with an upper limit.
        if below and low is None and high is not None and value <= high:
            return "N"
        if above and high is None and low is not None and value >= low:
            return "N"
        return None
    return "N"


# --------------------------------------------------------------------------- YAML with lines


@dataclass(slots=True)
class _Node:
    kind: str  # "map" | "seq" | "scalar"
    line: int
    text: str = ""  # a scalar as written (no octal / float / Norway surprises for codes)
    tag: str = ""  # resolved scalar type: str int float bool null
    entries: dict[str, _Node] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)
    items: list[_Node] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "map":
            return "a mapping"
        if self.kind == "seq":
            return "a list"
        if self.tag == "null":
            return "nothing"
        return f"{_TAG_NAMES.get(self.tag, self.tag)} {self.text!r}"


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that only composes: every node keeps its start mark (line number).

    Values are read from the nodes' raw text, so analyzer codes like ``002`` or ``0123`` stay
    text (YAML 1.1 would read them as octal numbers) and factors like ``0.0555`` become exact
    Decimals.
    """


_TAG_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}
_TAGS = {
    "tag:yaml.org,2002:str": "str",
    "tag:yaml.org,2002:int": "int",
    "tag:yaml.org,2002:float": "float",
    "tag:yaml.org,2002:bool": "bool",
    "tag:yaml.org,2002:null": "null",
}


class _Errors:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, line: int, path: str, text: str) -> None:
        self.items.append(f"{self.source}:{line}: {path or '(top level)'}: {text}")


def _compose(text: str, errors: _Errors) -> _Node | None:
    loader = _LineLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        errors.add(line, "", f"not valid YAML: {exc.problem or exc.context}")
        return None
    except yaml.YAMLError as exc:
        errors.add(0, "", f"not valid YAML: {exc}")
        return None
    finally:
        loader.dispose()
    if root is None:
        return None
    budget = [_MAX_NODES]
    return _convert(root, errors, "", budget)


def _convert(node: yaml.Node, errors: _Errors, path: str, budget: list[int]) -> _Node:
    budget[0] -= 1
    line = node.start_mark.line + 1
    if budget[0] < 0:
        if budget[0] == -1:
            errors.add(line, path, f"the file has more than {_MAX_NODES} YAML nodes "
                       "(anchor expansion?); split it")
        return _Node("scalar", line, "", "null")
    if isinstance(node, yaml.MappingNode):
        result = _Node("map", line)
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                errors.add(key_line, path, "a key must be plain text, not a list or mapping")
                continue
            key = str(key_node.value)
            child_path = f"{path}.{key}" if path else key
            if key in result.entries:
                errors.add(key_line, child_path,
                           f"duplicate key (first at line {result.key_lines[key]}); YAML would "
                           "silently keep only the last one")
                continue
            child = _convert(value_node, errors, child_path, budget)
            if child.kind != "scalar":
                # A block mapping "starts" at its first child; errors about the whole
                # mapping (a missing key) read better at the line of the key that opens it.
                child.line = key_line
            result.entries[key] = child
            result.key_lines[key] = key_line
        return result
    if isinstance(node, yaml.SequenceNode):
        result = _Node("seq", line)
        for index, item in enumerate(node.value):
            result.items.append(_convert(item, errors, f"{path}[{index}]", budget))
        return result
    assert isinstance(node, yaml.ScalarNode)
    return _Node("scalar", line, str(node.value), _TAGS.get(node.tag, "str"))


# --------------------------------------------------------------------------- validation


class _Map:
    """One YAML mapping being validated: typed getters that record errors, unknown keys."""

    def __init__(self, node: _Node, path: str, errors: _Errors) -> None:
        self.node = node
        self.path = path
        self.errors = errors
        self.known: list[str] = []

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def child(self, key: str) -> _Node | None:
        self.known.append(key)
        found = self.node.entries.get(key)
        if found is None or (found.kind == "scalar" and found.tag == "null"):
            return None
        return found

    def error(self, node: _Node | None, key: str, text: str) -> None:
        line = node.line if node is not None else self.node.line
        self.errors.add(line, self.key_path(key), text)

    def text(self, key: str, *, required: bool = False, default: str = "",
             allow_empty: bool = True) -> str:
        node = self.child(key)
        if node is None:
            if required:
                self.error(None, key, "is required (a text value)")
            return default
        if node.kind != "scalar":
            self.error(node, key, f"expected a text value, got {node.describe()}")
            return default
        if not allow_empty and not node.text.strip():
            self.error(node, key, "must not be empty")
            return default
        return node.text

    def number(self, key: str) -> Decimal | None:
        node = self.child(key)
        if node is None:
            return None
        return _number(node, self.key_path(key), self.errors)

    def integer(self, key: str, low: int, high: int) -> int | None:
        node = self.child(key)
        if node is None:
            return None
        if node.kind != "scalar" or node.tag != "int":
            self.error(node, key, f"expected a whole number {low}..{high}, got {node.describe()}")
            return None
        try:
            value = int(node.text.replace("_", ""))
        except ValueError:
            self.error(node, key, f"expected a plain whole number, got {node.text!r}")
            return None
        if not low <= value <= high:
            self.error(node, key, f"expected a whole number {low}..{high}, got {value}")
            return None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        node = self.child(key)
        if node is None:
            return default
        if node.kind != "scalar" or node.tag != "bool":
            self.error(node, key, f"expected true or false, got {node.describe()}")
            return default
        return node.text.lower() in ("true", "yes", "on", "y")

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        node = self.child(key)
        if node is None:
            return default
        if node.kind != "scalar" or node.text not in choices:
            self.error(node, key, f"expected one of {', '.join(choices)}, got {node.describe()}")
            return default
        return node.text

    def sub(self, key: str) -> _Map | None:
        node = self.child(key)
        if node is None:
            return None
        if node.kind != "map":
            self.error(node, key, f"expected a mapping of keys, got {node.describe()}")
            return None
        return _Map(node, self.key_path(key), self.errors)

    def sequence(self, key: str) -> Iterator[tuple[str, _Node]]:
        node = self.child(key)
        if node is None:
            return
        if node.kind != "seq":
            self.error(node, key, f"expected a list, got {node.describe()}")
            return
        for index, item in enumerate(node.items):
            yield f"{self.key_path(key)}[{index}]", item

    def finish(self) -> None:
        for key, child in self.node.entries.items():
            if key not in self.known:
                self.errors.add(self.node.key_lines.get(key, child.line), self.key_path(key),
                                f"unknown key (known keys here: {', '.join(self.known)})")


def _number(node: _Node, path: str, errors: _Errors) -> Decimal | None:
    if node.kind != "scalar" or node.tag not in ("int", "float"):
        errors.add(node.line, path, f"expected a number, got {node.describe()}")
        return None
    try:
        value = Decimal(node.text.replace("_", ""))
    except InvalidOperation:
        errors.add(node.line, path, f"expected a plain decimal number, got {node.text!r}")
        return None
    if not value.is_finite():
        errors.add(node.line, path, f"expected a finite number, got {node.text!r}")
        return None
    return value


def _band(node: _Node, path: str, errors: _Errors, *, with_text: bool,
          critical: bool = False, by_patient: bool = True) -> ReferenceRange | None:
    """One reference range or set of critical limits: low and/or high, and (``by_patient``)
    the sex and ages it is for; None after recording what is wrong."""
    band = _as_map(node, path, errors)
    if band is None:
        return None
    low = band.number("low")
    high = band.number("high")
    sex, age_min, age_max = "any", None, None
    if by_patient:
        sex = band.choice("sex", ("M", "F", "any"), "any")
        age_min = band.number("age_min")
        age_max = band.number("age_max")
    text = band.text("text") if with_text else ""
    band.finish()
    what = "critical" if critical else "the range"
    if low is None and high is None:
        errors.add(node.line, path, "critical: needs low, high or both" if critical
                   else "needs low, high or both")
        return None
    if low is not None and high is not None and (low >= high if critical else low > high):
        errors.add(node.line, f"{path}.low",
                   f"critical low {low} must be below critical high {high}" if critical
                   else f"low {low} is above high {high}")
        return None
    if age_min is not None and age_max is not None and age_min >= age_max:
        errors.add(node.line, f"{path}.age_min", f"age_min {age_min} must be below age_max "
                   f"{age_max} (years; min inclusive, max exclusive)")
        return None
    if (age_min is not None and age_min < 0) or (age_max is not None and age_max <= 0):
        errors.add(node.line, path, f"ages are years and must be positive ({what})")
        return None
    return ReferenceRange(low, high, "" if sex == "any" else sex, age_min, age_max,
                          text.strip())


def _as_map(node: _Node, path: str, errors: _Errors) -> _Map | None:
    if node.kind != "map":
        errors.add(node.line, path, f"expected a mapping of keys, got {node.describe()}")
        return None
    return _Map(node, path, errors)


def _scalar_text(node: _Node, path: str, errors: _Errors, what: str) -> str | None:
    if node.kind != "scalar" or node.tag == "null":
        errors.add(node.line, path, f"expected {what}, got {node.describe()}")
        return None
    return node.text


_TOP_KEYS_HELP = "metadata, options, flags, status, ignore, tests"


def load_mapping(path: Path) -> AnalyzerMapping:
    """Read and validate a mapping file; MappingError lists every problem found."""
    return load_mapping_file(path)[0]


def load_mapping_file(path: Path) -> tuple[AnalyzerMapping, str]:
    """:func:`load_mapping`, and the SHA-256 of the bytes it read (hex): which version of
    the file is in use, for the log and for ``labrelay mapping reload``."""
    try:
        with path.open("rb") as stream:
            data = stream.read(_MAX_FILE_BYTES + 1)
        if len(data) > _MAX_FILE_BYTES:
            raise MappingError(f"{path}: mapping file is over {_MAX_FILE_BYTES} bytes, the "
                               "limit (is this the right file?)")
        text = data.decode("utf-8")
    except FileNotFoundError as exc:
        raise MappingError(f"{path}: mapping file not found; check the interface's "
                           "`mapping:` path") from exc
    except UnicodeDecodeError as exc:
        raise MappingError(f"{path}: mapping file is not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start})") from exc
    except OSError as exc:
        raise MappingError(f"{path}: cannot read the mapping file: {exc.strerror}") from exc
    return load_mapping_text(text, path), hashlib.sha256(data).hexdigest()


def load_mapping_text(text: str, source: Path) -> AnalyzerMapping:
    """Validate mapping YAML held in memory (``source`` names it in errors)."""
    errors = _Errors(source)
    root = _compose(text, errors)
    if root is None:
        if not errors.items:
            errors.add(1, "", f"the file is empty; a mapping needs {_TOP_KEYS_HELP}")
        _raise(errors)
    assert root is not None
    top = _as_map(root, "", errors)
    if top is None:
        _raise(errors)
    assert top is not None
    mapping = _read_mapping(top, source, errors)
    top.finish()
    if errors.items:
        _raise(errors)
    assert mapping is not None
    return mapping


def _raise(errors: _Errors) -> None:
    count = len(errors.items)
    heading = f"{errors.source}: {count} problem{'s' if count != 1 else ''} in the mapping file:"
    raise MappingError("\n".join([heading, *(f"  {e}" for e in errors.items)]))


def _read_mapping(top: _Map, source: Path, errors: _Errors) -> AnalyzerMapping | None:
    metadata = top.sub("metadata")
    analyzer = version = description = ""
    protocol = "any"
    if metadata is None:
        top.error(None, "metadata", "is required (analyzer, protocol, version)")
    else:
        analyzer = metadata.text("analyzer", required=True, allow_empty=False)
        protocol = metadata.choice("protocol", ("hl7", "astm", "any"), "any")
        if "protocol" not in metadata.node.entries:
            metadata.error(None, "protocol", "is required (hl7, astm or any)")
        version = metadata.text("version", required=True, allow_empty=False)
        description = metadata.text("description")
        metadata.finish()

    options = top.sub("options")
    case_sensitive = False
    strip_suffix = ""
    prefer_mapping_range = False
    unknown_flag = "warn"
    if options is not None:
        case_sensitive = options.boolean("case_sensitive", False)
        strip_suffix = options.text("strip_suffix")
        prefer_mapping_range = options.boolean("prefer_mapping_range", False)
        unknown_flag = options.choice("unknown_flag", ("warn", "abnormal"), "warn")
        options.finish()

    def norm(code: str) -> str:
        return _normalise_code(code, strip_suffix, case_sensitive)

    flag_table = dict(DEFAULT_FLAGS)
    flags = top.sub("flags")
    if flags is not None:
        allowed = (*NORMALISED_FLAGS, "ignore")
        for key in list(flags.node.entries):
            node = flags.child(key)
            value = "" if node is None else node.text.strip()
            if node is not None and (node.kind != "scalar" or value not in allowed):
                flags.error(node, key, f"expected one of {', '.join(allowed)}, got "
                            f"{node.describe()}")
                continue
            flag_table[key.strip().upper()] = "" if value in ("ignore", "") else value

    status_table = dict(_STATUS_BY_PROTOCOL[protocol])
    status = top.sub("status")
    if status is not None:
        for key in list(status.node.entries):
            node = status.child(key)
            value = "" if node is None else node.text.strip()
            if node is None or node.kind != "scalar" or value not in _RESULT_STATUSES:
                status.error(node, key, f"expected one of {', '.join(_RESULT_STATUSES)}, got "
                             f"{node.describe() if node else 'nothing'}")
                continue
            status_table[key.strip().upper()] = value

    ignored: dict[str, tuple[str, int]] = {}  # normalised code -> (as written, line)
    ignore_rules: list[tuple[str | None, str | None, str | None]] = []
    ignore_codes: list[str] = []
    for path, item in top.sequence("ignore"):
        if item.kind == "map":
            # Conditional form: every key given must match (e.g. the RLU rows of a code, or
            # every ED image OBX whatever its code).
            pair = _Map(item, path, errors)
            pair_code = pair.text("code").strip()
            units_node = pair.child("units")
            value_type = pair.text("value_type").strip().upper()
            pair.finish()
            units_text = None
            if units_node is not None:
                units_text = _scalar_text(units_node, f"{path}.units", errors, "units text")
            elif "units" in item.entries:
                units_text = ""  # `units: ` (empty) means "sent without units"
            if not pair_code and units_text is None and not value_type:
                errors.add(item.line, path, "needs code, units or value_type (or write a code "
                           "alone to ignore it whatever it carries)")
                continue
            ignore_rules.append((
                norm(pair_code) if pair_code else None,
                _unit_key(units_text) if units_text is not None else None,
                value_type or None,
            ))
            continue
        code = _scalar_text(item, path, errors, "an analyzer code (text)")
        if code is None or not code.strip():
            continue
        key = norm(code)
        if key in ignored:
            errors.add(item.line, path, f"analyzer code {code!r} is already ignored at line "
                       f"{ignored[key][1]}")
            continue
        ignored[key] = (code.strip(), item.line)
        ignore_codes.append(code.strip())

    tests: list[TestMapping] = []
    by_code: dict[str, TestMapping] = {}
    code_lines: dict[str, tuple[str, int]] = {}
    order_code: dict[str, str] = {}
    tests_map = top.sub("tests")
    if tests_map is None:
        if "tests" not in top.node.entries:
            top.error(None, "tests", "is required: analyzer code -> {test: LIS code, ...}")
    else:
        for code in list(tests_map.node.entries):
            node = tests_map.child(code)
            path = tests_map.key_path(code)
            line = tests_map.node.key_lines.get(code, 0)
            if node is None:
                errors.add(line, path, "is empty; expected at least `test: <LIS test code>`")
                continue
            test_entry = _as_map(node, path, errors)
            if test_entry is None:
                continue
            test = _read_test(code, line, test_entry, prefer_mapping_range, errors)
            if test is None:
                continue
            for spelling in (code, *test.aliases):
                key = norm(spelling)
                if not key:
                    errors.add(line, path, f"analyzer code {spelling!r} is empty after "
                               "normalisation")
                    continue
                if key in code_lines:
                    first = code_lines[key]
                    errors.add(line, path, f"analyzer code {spelling!r} is already mapped by "
                               f"tests.{first[0]} (line {first[1]})")
                    continue
                if key in ignored:
                    errors.add(line, path, f"analyzer code {spelling!r} is both mapped here and "
                               f"listed under ignore: (line {ignored[key][1]}); keep one")
                    continue
                code_lines[key] = (code, line)
                by_code[key] = test
            tests.append(test)
            # The first entry for a LIS test is the one used to order it (file order).
            order_code.setdefault(test.test_code, test.order_code or code)
    if errors.items:
        return None
    return AnalyzerMapping(
        source=source,
        analyzer=analyzer,
        protocol=protocol,
        version=version,
        description=description,
        tests=tuple(tests),
        ignore_codes=tuple(ignore_codes),
        case_sensitive=case_sensitive,
        strip_suffix=strip_suffix,
        prefer_mapping_range=prefer_mapping_range,
        unknown_flag=unknown_flag,
        flag_table=flag_table,
        status_table=status_table,
        _by_code=by_code,
        _ignored=frozenset(ignored),
        _ignore_rules=tuple(ignore_rules),
        _order_code=order_code,
    )


def _read_test(
    code: str, line: int, entry: _Map, prefer_default: bool, errors: _Errors
) -> TestMapping | None:
    before = len(errors.items)
    test_code = entry.text("test", required=True, allow_empty=False).strip()
    name = entry.text("name")
    panel = entry.text("panel")
    decimals = entry.integer("decimals", 0, 8)
    prefer = entry.boolean("prefer_mapping_range", prefer_default)
    order = entry.text("order_code").strip()
    aliases: list[str] = []
    for path, item in entry.sequence("aliases"):
        alias = _scalar_text(item, path, errors, "an analyzer code (text)")
        if alias is not None and alias.strip():
            aliases.append(alias.strip())

    ucum = ""
    accepted: list[str] = []
    conversions: list[UnitConversion] = []
    unit_table: dict[str, UnitConversion | None] = {"": None}
    units = entry.sub("units")
    if units is not None:
        ucum = units.text("ucum", required=True).strip()
        unit_table = {_unit_key(ucum): None}
        unit_lines: dict[str, str] = {_unit_key(ucum): f"{units.path}.ucum"}
        for path, item in units.sequence("accept"):
            spelling = _scalar_text(item, path, errors, "a unit as the analyzer writes it")
            if spelling is None:
                continue
            key = _unit_key(spelling)
            if key in unit_lines:
                errors.add(item.line, path, f"unit {spelling!r} is already declared at "
                           f"{unit_lines[key]}")
                continue
            unit_lines[key] = path
            unit_table[key] = None
            accepted.append(spelling.strip())
        for path, item in units.sequence("convert"):
            rule = _as_map(item, path, errors)
            if rule is None:
                continue
            from_node = rule.child("from")
            factor = rule.number("factor")
            offset = rule.number("offset")
            rule.finish()
            if from_node is None:
                rule.error(None, "from", "is required (the analyzer's unit)")
                continue
            source_units = _scalar_text(from_node, f"{path}.from", errors,
                                        "a unit as the analyzer writes it")
            if factor is None:
                if "factor" not in item.entries:
                    rule.error(None, "factor", "is required: value_in_ucum = value * factor "
                               "+ offset (e.g. 0.0555 for glucose mg/dL -> mmol/L)")
                continue
            if factor.is_zero():
                rule.error(item.entries["factor"], "factor", "must not be 0")
                continue
            if source_units is None:
                continue
            key = _unit_key(source_units)
            if key in unit_lines:
                rule.error(from_node, "from", f"unit {source_units!r} is already declared at "
                           f"{unit_lines[key]}")
                continue
            conversion = UnitConversion(source_units.strip(), factor, offset or Decimal(0))
            unit_lines[key] = f"{path}.from"
            unit_table[key] = conversion
            conversions.append(conversion)
        units.finish()

    ranges: list[ReferenceRange] = []
    for path, item in entry.sequence("reference_ranges"):
        band = _band(item, path, errors, with_text=True)
        if band is not None:
            ranges.append(band)

    critical_limits: list[ReferenceRange] = []
    critical_node = entry.child("critical")
    if critical_node is not None and critical_node.kind == "seq":
        # by sex and age, chosen as reference ranges are
        for index, item in enumerate(critical_node.items):
            path = f"{entry.key_path('critical')}[{index}]"
            band = _band(item, path, errors, with_text=False, critical=True)
            if band is not None:
                critical_limits.append(band)
        if not critical_node.items:
            entry.error(critical_node, "critical", "an empty list; leave critical out instead")
    elif critical_node is not None:
        band = _band(critical_node, entry.key_path("critical"), errors, with_text=False,
                     critical=True, by_patient=False)
        if band is not None:
            critical_limits.append(band)
    entry.finish()
    if len(errors.items) != before:
        return None
    return TestMapping(
        analyzer_code=code,
        test_code=test_code,
        name=name.strip(),
        panel=panel.strip(),
        ucum=ucum,
        accepted_units=tuple(accepted),
        conversions=tuple(conversions),
        decimals=decimals,
        reference_ranges=tuple(ranges),
        critical_limits=tuple(critical_limits),
        prefer_mapping_range=prefer,
        aliases=tuple(aliases),
        order_code=order,
        line=line,
        unit_table=unit_table,
    )
