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

from ..plan import FrameSupport, Plan

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
    # (device, ifindex) the rules bind to when loaded: the same text over
    # another ifindex is other rules (see nftables.tables.bindings).
    binds: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do and what it owns, as the daemon needs to know it."""

    versions: frozenset[int]  # the IP versions it can clone
    # (family, table) whose nftables netlink events mean someone changed what
    # this backend owns.
    watch_tables: frozenset[tuple[str, str]]
    # False when changes to what it owns produce no nftables events
    # (iptables-legacy): the daemon must poll to see drift.
    event_driven: bool
    # What its rules live in: two backends with the same owner replace each
    # other's rules in place, so a switch between them must not flush.
    kernel_owner: str
    removes: str  # what flush() removes, for humans
    # Counts the kernel copies again where they leave the router, after every
    # firewall chain (plan.delivery): status compares the two.
    delivery_counters: bool = False
    # Whether the nftables notifications of its rules' deletion tell what
    # they had counted (named_counter() maps them to mirrors): then a table
    # deleted by someone else costs no count. Without it, what was counted
    # since the last reading is lost with the rules, and status says so.
    counted_deletes: bool = False


class Backend(ABC):
    name: ClassVar[str]

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """A class attribute where every value is known from the class; a
        property where one depends on the system (the iptables flavour)."""

    @classmethod
    def possible_capabilities(cls) -> tuple[Capabilities, ...]:
        """Every Capabilities an instance may report, without probing the system."""
        caps: object = cls.capabilities
        if not isinstance(caps, Capabilities):
            raise TypeError(f"{cls.__name__} computes its capabilities at run time: "
                            "it must say which it may report")
        return (caps,)

    @abstractmethod
    def unsupported(self) -> Optional[str]:
        """None when usable here; otherwise why not, naming what to install."""

    def frame_support(self) -> FrameSupport:
        """Whether this backend can copy whole frames (netdev ingress, egress)."""
        why = (f"backend {self.name} cannot copy whole frames: transports span, vxlan, gretap "
               "and erspan need backend nftables (its netdev family)")
        return FrameSupport(ingress=why, egress=why)

    @abstractmethod
    def render(self, plan: Plan) -> Rendered: ...

    @abstractmethod
    def apply(self, rendered: Rendered, carry: Counts) -> None:
        """Replace what this backend owns with `rendered`, atomically.

        `carry` seeds the counters so that totals survive a replacement.
        That is a backend's only counter duty: counters() goes on from
        `carry`. nftables starts its new counters at it; iptables cannot set
        a rule's count, so it keeps `carry` and the final counts of the rule
        generations it retires (it cannot move counts to new rules
        atomically) and adds them to the live rules'. The ledger of totals
        across restarts, switches and transports is the daemon's.
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

    def named_counter(self, name: str) -> Optional[CounterKey]:
        """The (mirror, direction) a named counter of its own tables counts, if any
        (see Capabilities.counted_deletes)."""
        return None

    @abstractmethod
    def flush(self) -> None:
        """Remove everything this backend owns (capabilities.removes), touching
        nothing else: not a `mirrord trace` table, which is the trace's."""


def comment(mirror: str, direction: str) -> str:
    return f"{COMMENT_PREFIX} {mirror} {direction}"


def parse_comment(text: str) -> Optional[CounterKey]:
    parts = text.split()
    if len(parts) == 3 and parts[0] == COMMENT_PREFIX and parts[2] in ("in", "out"):
        return (parts[1], parts[2])
    return None
