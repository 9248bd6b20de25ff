"""Plain value types that cross into lis_bridge from the engine."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def _value(cls: type[_T]) -> type[_T]:
    """Frozen to the type checker (no assignment to a field type-checks); at run time a
    plain slots dataclass, hashable as a frozen one: a frozen one costs 1.5 µs to build
    against 0.2, and every result of every message is built as one."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@_value
class ResultInput:
    """One result in LIS vocabulary, ready to be written for a sample.

    Produced by ``engine.mapping`` from a driver's ``Observation``.
    """

    test_code: str
    analyzer_code: str
    value_text: str
    value_number: Decimal | None = None
    comparator: str = ""
    units: str = ""  # UCUM after any declared conversion
    reference_range: str = ""
    flag: str = ""  # normalised: "", N, L, H, LL, HH, A
    is_critical: bool = False
    status: str = "F"  # P preliminary, F final, C correction, X cannot be done
    observed_at: datetime | None = None
    equipment: str = ""
    comments: tuple[str, ...] = ()
    raw_units: str = ""
    raw_flags: str = ""
