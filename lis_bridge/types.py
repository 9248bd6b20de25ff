"""Plain value types that cross into lis_bridge from the engine."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
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
