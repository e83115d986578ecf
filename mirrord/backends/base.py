"""What every kernel-clone backend provides.

A backend renders a plan's clone rules as data (pure), applies a rendering in
one atomic step, reads back what it owns (for drift detection) and its
counters, and removes everything it owns. It decides no policy: which backend
and which transport is the plan's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..plan import Plan

# (mirror name, "in" | "out") -> (packets, bytes)
CounterKey = tuple[str, str]
Counts = dict[CounterKey, tuple[int, int]]

COMMENT_PREFIX = "mirrord"


class BackendError(Exception):
    pass


class ApplyError(BackendError):
    """The kernel refused a ruleset; the message carries the input it refused."""


@dataclass(frozen=True)
class Rendered:
    text: str  # exactly what would be applied, for humans (`mirrord render`)
    payload: Any  # what apply() consumes


class Backend(ABC):
    name: ClassVar[str]
    @property
    def event_driven(self) -> bool:
        """Whether changes to what this backend owns produce nftables netlink
        events; when not (iptables-legacy) the daemon must poll to see drift."""
        return True

    # Address families this backend can clone.
    versions: ClassVar[frozenset[int]] = frozenset({4, 6})

    @property
    def kernel_owner(self) -> str:
        """What this backend's rules live in; two backends with the same owner
        replace each other's rules in place, so switching must not flush."""
        return self.name

    @abstractmethod
    def unsupported(self) -> Optional[str]:
        """None when usable here; otherwise why not, naming what to install."""

    @abstractmethod
    def render(self, plan: Plan) -> Rendered: ...

    @abstractmethod
    def apply(self, rendered: Rendered, carry: Counts) -> None:
        """Replace what this backend owns with `rendered`, atomically.

        `carry` seeds the counters so that totals survive a replacement.
        Raises ApplyError and leaves the previous rules in place on failure.
        """

    @abstractmethod
    def snapshot(self) -> str:
        """The kernel's canonical form of what this backend owns ("" if nothing)."""

    @abstractmethod
    def verify(self, rendered: Rendered, snapshot: str) -> Optional[str]:
        """None when `snapshot` holds what `rendered` asks for; otherwise what is off.

        The listing taken after an apply becomes the daemon's reference for
        drift, so it must never be adopted when someone else changed the
        rules between the commit and the listing: this compares the parts
        the kernel lists as given (chains, rule counts per chain, copy
        targets, counters, jumps), not the normalized match expressions.
        """

    @abstractmethod
    def counters(self) -> Counts: ...

    @abstractmethod
    def flush(self) -> None:
        """Remove everything this backend owns, touching nothing else."""


def comment(mirror: str, direction: str) -> str:
    return f"{COMMENT_PREFIX} {mirror} {direction}"


def parse_comment(text: str) -> Optional[CounterKey]:
    parts = text.split()
    if len(parts) == 3 and parts[0] == COMMENT_PREFIX and parts[2] in ("in", "out"):
        return (parts[1], parts[2])
    return None
