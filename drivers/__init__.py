"""Analyzer drivers and the HL7 / ASTM record codecs.

Drivers never import :mod:`lis_bridge`; the engine joins the two.
"""

from drivers.model import AnalyzerMessage, MessageKind, Observation, SpecimenResults

__all__ = ["AnalyzerMessage", "MessageKind", "Observation", "SpecimenResults"]
