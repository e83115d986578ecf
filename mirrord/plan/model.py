"""What a plan is made of: the rules and taps it asks for, each mirror's state and why.

Plain frozen data, compared field by field by the reconciler (a field added
here reaches the rendering's cache key without further code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Optional

from ..match import Address, FamilyMatch, Match
from ..netlink.links import Tunnel
from ..netlink.topology import Reach
from ..spec import Collector, Mirror
from . import reasons as why
from .groups import Group
from .reasons import Reason

State = Literal["active", "waiting", "degraded", "error"]
Way = Literal["in", "out"]
TransportName = Literal["clone", "tzsp", "span", "vxlan", "gretap", "erspan"]
PointKind = Literal["clone", "vxlan", "gre"]
DELIVERED = "delivered"  # a delivery counter key's second part, where copies use "in"/"out"


@dataclass(frozen=True)
class CloneRule:
    """One kernel copy rule: packets crossing `interfaces` in `direction` go to `gateway`."""

    mirror: str
    direction: Way
    interfaces: tuple[str, ...]
    match: FamilyMatch
    gateway: Address
    device: Optional[str]
    # Every collector address of the spec: their traffic, mirrord's own
    # copies (TZSP datagrams and their fragments) included, is never cloned.
    exclude: tuple[Address, ...] = ()
    # A group collector: copies go to the member holding the flow's bucket
    # (`gateway` is then the first live member, for the family and the log).
    group: Optional[Group] = None

    @property
    def version(self) -> int:
        return self.match.version


@dataclass(frozen=True)
class TzspTap:
    """One capture socket: a mirrored interface, its directions, where copies go."""

    mirror: str
    interface: str
    ifindex: int
    directions: tuple[Way, ...]
    collector: Collector
    # Part of the tap's identity: a reload that changes only the match must
    # replace the worker, whose BPF program was compiled from it.
    match: Match = field(default_factory=Match)
    # Every collector address of the spec, never captured (see exclusions()).
    # Not part of the identity: a reload that adds a collector swaps the
    # socket's filter in place (like `buckets`), its ring and counters stay.
    exclude: tuple[Address, ...] = field(default=(), compare=False)
    # A group collector's member (plan.groups): the tap sends to `member`,
    # its `index`-th member, and captures only the flows of its buckets.
    member: Optional[str] = None
    member_address: Optional[Address] = None
    member_index: int = 0
    # Not part of the identity: a member's share changes in place (the capture
    # process swaps the socket's filter), its ring and counters stay.
    buckets: Optional[tuple[int, ...]] = field(default=None, compare=False)

    def same_filter(self, other: TzspTap) -> bool:
        """Whether `other`, the same tap, also has the same filter (the fields
        swapped in place differ: see exclude, buckets)."""
        return (self.exclude, self.buckets) == (other.exclude, other.buckets)

    @property
    def destination(self) -> Address:
        """Where its copies go: the member, else the collector's address."""
        address = self.member_address or self.collector.address
        assert address is not None  # TZSP collectors and members are hosts (spec)
        return address


@dataclass(frozen=True)
class FrameRule:
    """One whole-frame copy (nftables netdev `dup`): frames crossing `interface`
    in `direction` are sent out of `target`, a span port or mirrord's tunnel
    device. The ifindexes are part of the rule: nft binds a netdev chain and a
    dup target to the device present when the rules are loaded."""

    mirror: str
    direction: Way
    interface: str
    ifindex: int
    match: Match
    target: str
    target_index: int
    # Every collector address of the spec: their traffic, the tunnels' outer
    # packets and TZSP datagrams included, is never copied.
    exclude: tuple[Address, ...] = ()
    # A group collector: `target` is then the first live member's device.
    group: Optional[Group] = None


@dataclass(frozen=True)
class DeliveryPoint:
    """Where kernel copies leave the router and are counted again (plan.delivery)."""

    kind: PointKind
    address: Address  # clone: the next hop; tunnels: the remote
    port: int = 0  # vxlan only
    # The (mirror, direction) counters whose copies leave here (a group's
    # member: its (member counter, "member") alone).
    feeds: tuple[tuple[str, str], ...] = ()
    collectors: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return self.address.version

    @property
    def name(self) -> str:
        """The counter's name without its ".delivered": a mirror name never
        starts with "_", and nft reads it unquoted (no ":")."""
        addr = str(self.address).replace(":", "-")
        return f"_{self.kind}_{addr}" + (f"_{self.port}" if self.kind == "vxlan" else "")

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, DELIVERED)

    def describe(self) -> str:
        if self.kind == "clone":
            return f"clones routed to {self.address}"
        if self.kind == "vxlan":
            return f"VXLAN datagrams to {self.address} port {self.port}"
        return f"GRE packets to {self.address}"


@dataclass(frozen=True)
class FrameSupport:
    """Why the backend cannot copy whole frames at each netdev hook ("": it can)."""

    ingress: str = ""
    egress: str = ""


@dataclass(frozen=True)
class TapState:
    interface: str
    direction: Way
    state: State
    cause: Optional[Reason] = None  # None exactly when active

    @property
    def reason(self) -> str:
        return self.cause.text if self.cause else ""


@dataclass(frozen=True)
class MirrorPlan:
    mirror: Mirror
    collector: Collector
    transport: Optional[TransportName]
    state: State
    reasons: tuple[Reason, ...]
    taps: tuple[TapState, ...] = ()
    reach: Optional[Reach] = None
    # A clone mirror's interfaces that are bridge ports, whatever their taps'
    # state: a port copies nothing with a kernel clone (health: bridge-port).
    bridge_ports: tuple[Reason, ...] = ()
    # A group collector: each member's liveness and buckets (status shows them).
    group: Optional[Group] = None

    @property
    def reason(self) -> str:
        """What status and the log show: the reasons' texts, each once, "; " between."""
        return why.join(self.reasons)

    @property
    def kernel_copies(self) -> bool:
        """Its copies are made by the backend's rules (counted per direction
        there, restored by a heal), not by a TZSP capture."""
        return self.transport == "clone" or self.collector.copies_frames


@dataclass(frozen=True)
class Plan:
    backend: Optional[str]
    mirrors: tuple[MirrorPlan, ...]
    clones: tuple[CloneRule, ...] = ()
    tzsp: tuple[TzspTap, ...] = ()
    frames: tuple[FrameRule, ...] = ()
    # The tunnel devices the frame mirrors need, made before the rules are.
    tunnels: tuple[Tunnel, ...] = ()
    # Interfaces that kernel clones leave through: an `out` mirror there must
    # not count the clones themselves (they carry the original headers).
    clone_egress: frozenset[str] = field(default_factory=frozenset)
    # Where the kernel copies leave the router, when the backend counts them
    # there (plan.delivery): render counts, status compares.
    deliveries: tuple[DeliveryPoint, ...] = ()

    def mirror(self, name: str) -> Optional[MirrorPlan]:
        return self._by_name.get(name)


    @cached_property
    def _by_name(self) -> dict[str, MirrorPlan]:
        # Built on first use: a scan per lookup is quadratic over thousands of mirrors.
        return {m.mirror.name: m for m in reversed(self.mirrors)}


def summarize(taps: list[TapState]) -> tuple[State, tuple[Reason, ...]]:
    """A mirror's state from its taps': active, all idle (waiting or error), or degraded."""
    idle = [t for t in taps if t.state != "active"]
    if not idle:
        return "active", ()
    causes = tuple(dict.fromkeys(t.cause for t in idle if t.cause is not None))
    if len(idle) == len(taps):
        return ("error" if any(t.state == "error" for t in idle) else "waiting"), causes
    return "degraded", causes
