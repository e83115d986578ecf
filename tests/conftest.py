"""Settings shared by every leg of the test matrix (scripts/run-tests), and the test layers.

The tests come in three layers, one directory each, marked by it:
tests/unit (`-m unit`: pure, no root, no namespaces), tests/kernel (`-m kernel`:
mirrord's pieces against the real kernel in namespaces, as root, no daemon)
and tests/e2e (`-m e2e`: the daemon as a subprocess in a namespace lab).
tests/harness is what the kernel and e2e layers and the benchmarks share.

A leg that models a platform without some optional module (the OpenWrt leg has
no scapy) names it in MIRRORD_TEST_ABSENT (comma-separated). A test that fails
only because it imports such a module is reported as skipped, with the module
named, in that leg alone; in every other leg a missing module stays a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

LAYERS = ("unit", "kernel", "e2e")
ABSENT = frozenset(m for m in os.environ.get("MIRRORD_TEST_ABSENT", "").split(",") if m)


def _absent_module(excinfo: Any) -> str | None:
    if excinfo is None or not isinstance(excinfo.value, ModuleNotFoundError):
        return None
    name = (excinfo.value.name or "").split(".")[0]
    return name if name in ABSENT else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    module = _absent_module(call.excinfo)
    if module and report.failed:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: needs {module}, which this leg leaves out (MIRRORD_TEST_ABSENT)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        layer = item.path.relative_to(here).parts[0] if here in item.path.parents else ""
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))
