"""On-demand structural validation of an HL7 v2 message with hl7apy.

The hot path never calls this (hl7apy's full parse costs tens of milliseconds); an analyst
asks for it with `labrelay decode --validate` when a new analyzer is connected. Problems
are returned as data: errors (the message breaks the standard's structure for its version)
and warnings; real analyzers break the standard often, so neither stops decoding.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

from drivers.hl7.parser import parse_message as lean_parse


@dataclass(frozen=True, slots=True)
class ValidationReport:
    structure: str
    version: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.errors


def validate_structure(raw: bytes, encoding: str | None = None) -> ValidationReport:
    """Check ``raw`` against hl7apy's definitions for its MSH-12 version and structure."""
    lean = lean_parse(raw, encoding=encoding)
    text = lean.text.replace("\r\n", "\r").replace("\n", "\r")
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT,
                                find_groups=True)
    except (HL7apyException, ValueError, KeyError) as exc:
        return ValidationReport("", lean.version, (f"hl7apy cannot read it: {exc}",), ())
    fd, report_path = tempfile.mkstemp(prefix="labrelay-hl7-validation-", suffix=".txt")
    os.close(fd)
    try:
        # The report file holds every problem, not only the first the exception names.
        with contextlib.suppress(HL7apyException):
            Validator.validate(message, report_file=report_path)
        with open(report_path, encoding="utf-8", errors="replace") as report:
            lines = [line.strip() for line in report if line.strip()]
    finally:
        os.unlink(report_path)
    errors = tuple(line.removeprefix("Error: ") for line in lines if line.startswith("Error"))
    warnings = tuple(
        line.removeprefix("Warning: ") for line in lines if line.startswith("Warning")
    )
    return ValidationReport(str(message.name), str(message.version), errors, warnings)
