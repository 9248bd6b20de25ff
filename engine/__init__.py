"""labrelay engine: protocol cores, Twisted adapters, pipeline, mapping, CLI."""

__version__ = "0.1.0"
