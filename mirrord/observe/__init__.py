"""Showing that it works: the status document, health findings, packet tracing."""
