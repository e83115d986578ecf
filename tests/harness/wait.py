"""Waiting for a state, with a deadline: the one polling loop of the tests and benchmarks."""

from __future__ import annotations

import time
from typing import Callable, TypeVar, Union

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """The state never came. An AssertionError, so pytest reports it as a failed check."""


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: Union[str, Callable[[], str]] = "",
               ok: Callable[[T], object] = bool) -> T:
    """Call `predicate` every `interval` seconds until `ok` holds for its value; return that value.

    `ok` (truth, by default) lets the predicate return what it read, so the
    caller gets it back and a timeout can show it. Checked once more at the
    deadline, so a slow last call still counts. On timeout raise WaitTimeout
    naming `what` (a callable is called only then, to describe the state at
    the end, e.g. a log) and the last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise WaitTimeout(f"timed out after {timeout}s waiting for "
                              f"{described or 'the condition'}; last: {value!r}")
        time.sleep(interval)
