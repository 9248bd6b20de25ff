"""The contract between drivers and the engine (DESIGN.md, "Contracts").

A driver turns a decoded wire message into an :class:`AnalyzerMessage`, in the
analyzer's own vocabulary. Raw strings are always kept beside parsed values.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import TypeVar, dataclass_transform

# Processing ids of messages that are not production (ASTM H-12, HL7 MSH-11): training and
# debugging. Their results are never applied to patients' samples (kind OTHER, stored).
NOT_PRODUCTION = {"T": "training", "D": "debugging"}


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def _value(cls: type[_T]) -> type[_T]:
    """A frozen dataclass to the type checker, which refuses any assignment to a field;
    at run time a plain slots dataclass (hashable as a frozen one is), because building a
    frozen one sets each field through ``object.__setattr__``: 1.5 µs for an Observation
    against 0.2, and a 25-result message builds fifty of these (its observations, then
    their results) on the way of every message."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


class MessageKind(enum.StrEnum):
    RESULTS = "results"
    QUERY = "query"
    ORDER_ACK = "order_ack"
    KEEP_ALIVE = "keep_alive"
    QC = "qc"
    ACK = "ack"
    ORDERS = "orders"
    OTHER = "other"


@_value
class Observation:
    """One result as the analyzer reported it."""

    analyzer_code: str
    value_text: str
    units: str = ""
    reference_range: str = ""
    flags: tuple[str, ...] = ()
    status: str = ""  # P / F / C / X ... as sent
    observed_at: datetime | None = None
    equipment: str = ""
    comments: tuple[str, ...] = ()
    value_type: str = ""
    sub_id: str = ""
    analyzer_name: str = ""

    @property
    def number(self) -> Decimal | None:
        return parse_number(self.value_text)[1]

    @property
    def comparator(self) -> str:
        return parse_number(self.value_text)[0]


@dataclass(frozen=True, slots=True)
class SpecimenResults:
    """Everything one message says about one specimen."""

    specimen_id: str
    observations: tuple[Observation, ...] = ()
    patient_id_hint: str = ""
    ordered_codes: tuple[str, ...] = ()
    is_qc: bool = False
    action_code: str = ""
    report_type: str = ""


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """A host query: which specimens the analyzer wants work for."""

    specimen_ids: tuple[str, ...]
    all_specimens: bool = False
    raw_range: str = ""
    tests: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AnalyzerMessage:
    """One decoded analyzer message, in analyzer vocabulary."""

    protocol: str  # "hl7" or "astm"
    kind: MessageKind
    sender: str
    control_id: str
    specimens: tuple[SpecimenResults, ...] = ()
    queries: tuple[QueryRequest, ...] = ()
    message_type: str = ""
    version: str = ""
    sent_at: datetime | None = None
    warnings: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def specimen_ids(self) -> tuple[str, ...]:
        return tuple(s.specimen_id for s in self.specimens)

    def to_json(self) -> dict[str, object]:
        """The shape `labrelay decode --json` prints."""
        return {
            "protocol": self.protocol,
            "kind": str(self.kind),
            "sender": self.sender,
            "control_id": self.control_id,
            "message_type": self.message_type,
            "warnings": list(self.warnings),
            "queries": [
                {"specimen_ids": list(q.specimen_ids), "all": q.all_specimens}
                for q in self.queries
            ],
            "specimens": [
                {
                    "specimen_id": s.specimen_id,
                    "observations": [
                        {
                            "code": o.analyzer_code,
                            "value": o.value_text,
                            "units": o.units,
                            "reference_range": o.reference_range,
                            "flags": list(o.flags),
                            "status": o.status,
                        }
                        for o in s.observations
                    ],
                }
                for s in self.specimens
            ],
        }


_NUMBER = re.compile(r"^\s*([<>]=?|=)?\s*([+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?)\s*$")


def parse_number(text: str) -> tuple[str, Decimal | None]:
    """Split ``'> 15000.00'`` into ``('>', Decimal('15000.00'))``.

    A decimal comma (``7,41``) is read as a decimal point. Anything that is not a
    plain number (``-----``, ``***.**``, ``Positive``) gives ``('', None)``.
    """
    match = _NUMBER.match(text)
    if not match:
        return "", None
    comparator = match.group(1) or ""
    try:
        return comparator, Decimal(match.group(2).replace(",", "."))
    except InvalidOperation:
        return "", None
