"""The kernel layer: mirrord's pieces against the real kernel, in namespaces, without the daemon.

Every test here needs root (most of them network namespaces); without it the
whole layer is skipped with the reason. The pure unit tests (tests/unit) need
neither; the end-to-end tests (tests/e2e) run the daemon itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.fixtures import lab, offlink_lab
from tests.harness.lab import Netns, have_root_netns, scratch_netns

__all__ = ["lab", "netns", "offlink_lab"]  # fixtures, used by name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = have_root_netns()
    if why is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh, empty network namespace, deleted afterwards."""
    why = have_root_netns()
    if why is not None:
        pytest.skip(why)
    with scratch_netns() as ns:
        yield ns
