"""What the reconciler produced, as values: the snapshot of what is applied and
why, and a reading of the counters at one moment.

Both are immutable; status and health are built from them alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

from ..backends.base import Counts
from ..netlink.topology import Topology
from ..plan import Plan
from ..spec import Spec


@dataclass(frozen=True)
class Heal:
    """The last time a mirror's state changed or its rules were restored, and why."""

    when: float
    why: str


def _frozen_heals() -> Mapping[str, Heal]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    spec: Spec
    started: float  # wall clock, for status's "started"
    plan: Optional[Plan] = None
    topology: Optional[Topology] = None
    backend: Optional[str] = None  # the backend's name
    backend_error: str = ""
    apply_error: str = ""  # the kernel refused the last apply; "" when it did not
    applies: int = 0
    reapplies: int = 0
    heals: Mapping[str, Heal] = field(default_factory=_frozen_heals)
    # (collector, member) of a group -> wall clock its state (alive, dead) began.
    member_since: Mapping[tuple[str, str], float] = field(
        default_factory=lambda: MappingProxyType({}))

    def summary(self) -> str:
        if self.plan is None:
            return "starting"
        states: dict[str, int] = {}
        for m in self.plan.mirrors:
            states[m.state] = states.get(m.state, 0) + 1
        parts = [f"{n} {s}" for s, n in sorted(states.items())]
        return f"{len(self.plan.mirrors)} mirror(s): " + ", ".join(parts)


@dataclass(frozen=True)
class TapReading:
    """One TZSP tap as its capture process reports it."""

    mirror: str
    interface: str
    id: Optional[int]
    pid: Optional[int]
    state: str
    exit_reason: Optional[str]
    counters: Mapping[str, int]
    restart_in: Optional[float] = None  # seconds until an exited tap starts again
    member: Optional[str] = None  # a group's member the tap sends to

    @property
    def running(self) -> bool:
        return self.exit_reason is None


@dataclass(frozen=True)
class Reading:
    """The counters at one moment: totals across every replacement (the ledger's)."""

    clones: Counts
    tzsp: Mapping[str, tuple[int, int]]
    taps: tuple[TapReading, ...] = ()
    # Where the totals could not be kept exact (the ledger's notes).
    notes: tuple[str, ...] = ()
