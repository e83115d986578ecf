"""pytest fixtures of the namespace lab, shared by the kernel and e2e layers (their conftest imports them)."""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Any, Iterator

import pytest

from tests.harness.lab import Lab, have_root_netns


def _skip_unless_root_netns() -> None:
    why = have_root_netns()
    if why is not None:
        pytest.skip(why)


def remove_files(lab: Lab) -> None:
    """The files a test wrote for the lab (/tmp/TAG-*: captures, specs)."""
    for path in glob.glob(f"/tmp/{lab.tag}-*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def lab_then_clean(**options: Any) -> Iterator[Lab]:
    """A module's lab (Lab(**options)), its files removed with it: `yield from` it."""
    with Lab(**options) as built:
        try:
            yield built
        finally:
            remove_files(built)


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
