"""HL7 v2 codec: tokenizer, ACK builder and the generic driver (PROTOCOLS 79-99)."""

from drivers.hl7.ack import AckError, Outcome, ack_plan, build_ack, build_reject_ack, is_ack
from drivers.hl7.generic import GenericHL7Driver
from drivers.hl7.parser import (
    HL7Message,
    HL7ParseError,
    Segment,
    Separators,
    parse_message,
    split_messages,
)

__all__ = [
    "AckError",
    "GenericHL7Driver",
    "HL7Message",
    "HL7ParseError",
    "Outcome",
    "Segment",
    "Separators",
    "ack_plan",
    "build_ack",
    "build_reject_ack",
    "is_ack",
    "parse_message",
    "split_messages",
]
