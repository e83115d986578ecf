"""The end-to-end layer: the real daemon as a subprocess in a namespace lab; shared fixtures."""

from __future__ import annotations

from tests.harness.fixtures import lab, offlink_lab

__all__ = ["lab", "offlink_lab"]  # fixtures, used by name
