"""Twisted adapters: they join the sans-I/O protocol cores to real transports."""
