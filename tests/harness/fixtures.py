"""pytest fixtures of the namespace lab, shared by the kernel and e2e layers (their conftest imports them)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.harness.lab import Lab, have_root_netns


def _skip_unless_root_netns() -> None:
    why = have_root_netns()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab (LAN host, router, WAN host, on-link collector), deleted afterwards."""
    _skip_unless_root_netns()
    with Lab() as built:
        yield built


@pytest.fixture
def offlink_lab() -> Iterator[Lab]:
    """A lab whose collector sits behind a second router (not on-link)."""
    _skip_unless_root_netns()
    with Lab(offlink=True) as built:
        yield built
