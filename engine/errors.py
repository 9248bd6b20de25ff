"""The one exception family of labrelay.

Every error an operator may see derives from :class:`LabrelayError`; its text says
what is wrong and what to do about it.
"""

from __future__ import annotations


class LabrelayError(Exception):
    """Root of every labrelay error."""


class ConfigError(LabrelayError):
    """The configuration file is invalid; the engine does not start."""


class MappingError(LabrelayError):
    """A mapping file is invalid, or a code could not be mapped."""


class ProtocolError(LabrelayError):
    """A wire protocol was violated."""


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved: answer with NAK / AR and keep serving."""


class LocalProtocolError(ProtocolError):
    """We misused a protocol core: a bug in labrelay."""


class StorageError(LabrelayError):
    """The database could not store or read something."""


class InvalidTransition(LabrelayError):
    """A sample was asked to move between two states the lifecycle does not join."""
