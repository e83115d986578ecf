"""Spec + topology -> Plan: what each mirror should be doing right now, and why.

A pure function: the same spec and kernel snapshot always give the same plan,
which is what lets start-up, SIGHUP and every heal share one reconcile path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Literal, Optional

from .match import Address, FamilyMatch, Match
from .spec import Collector, Mirror, Spec
from .topology import ARPHRD_ETHER, Reach, Topology

State = Literal["active", "waiting", "degraded", "error"]
Way = Literal["in", "out"]
TransportName = Literal["clone", "tzsp"]


@dataclass(frozen=True)
class CloneRule:
    """One kernel copy rule: packets crossing `interfaces` in `direction` go to `gateway`."""

    mirror: str
    direction: Way
    interfaces: tuple[str, ...]
    match: FamilyMatch
    gateway: Address
    device: Optional[str]

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


@dataclass(frozen=True)
class TapState:
    interface: str
    direction: Way
    state: State
    reason: str = ""


@dataclass(frozen=True)
class MirrorPlan:
    mirror: Mirror
    collector: Collector
    transport: Optional[Literal["clone", "tzsp"]]
    state: State
    reason: str
    taps: tuple[TapState, ...] = ()
    reach: Optional[Reach] = None


@dataclass(frozen=True)
class Plan:
    backend: Optional[str]
    mirrors: tuple[MirrorPlan, ...]
    clones: tuple[CloneRule, ...] = ()
    tzsp: tuple[TzspTap, ...] = ()
    # Interfaces that kernel clones leave through: an `out` mirror there must
    # not count the clones themselves (they carry the original headers).
    clone_egress: frozenset[str] = field(default_factory=frozenset)

    def mirror(self, name: str) -> Optional[MirrorPlan]:
        return self._by_name.get(name)

    @cached_property
    def _by_name(self) -> dict[str, MirrorPlan]:
        # Built on first use: a scan per lookup is quadratic over thousands of mirrors.
        return {m.mirror.name: m for m in reversed(self.mirrors)}


def collector_keys(spec: Spec) -> list[tuple[Address, Optional[str]]]:
    return [(c.address, c.interface) for c in spec.collectors.values()]


def build(
    spec: Spec,
    topo: Topology,
    backend: Optional[str],
    backend_error: Optional[str] = None,
    versions: frozenset[int] = frozenset({4, 6}),
) -> Plan:
    """`versions`: the IP versions the backend can clone (route-tee: IPv4 only)."""
    mirrors: list[MirrorPlan] = []
    clones: list[CloneRule] = []
    taps: list[TzspTap] = []
    egress: set[str] = set()
    for mirror in spec.mirrors:
        collector = spec.collector_of(mirror)
        reach = topo.reach.get((collector.address, collector.interface))
        mp, rules, tz = _plan_mirror(mirror, collector, reach, topo, backend, backend_error,
                                     versions)
        mirrors.append(mp)
        clones.extend(rules)
        taps.extend(tz)
        if rules and reach is not None and reach.oif:
            egress.add(reach.oif)
    return Plan(backend, tuple(mirrors), tuple(clones), tuple(taps), frozenset(egress))


def _interface_taps(mirror: Mirror, topo: Topology) -> list[TapState]:
    out: list[TapState] = []
    for name in mirror.interfaces:
        link = topo.link(name)
        for way in mirror.directions:
            if link is None:
                out.append(TapState(name, way, "waiting", f"interface {name} does not exist"))
            elif not link.up:
                out.append(TapState(name, way, "waiting", f"interface {name} is down"))
            else:
                out.append(TapState(name, way, "active"))
    return out


def _summarize(taps: list[TapState]) -> tuple[State, str]:
    idle = [t for t in taps if t.state != "active"]
    if not idle:
        return "active", ""
    reasons = list(dict.fromkeys(t.reason for t in idle))
    if len(idle) == len(taps):
        return ("error" if any(t.state == "error" for t in idle) else "waiting"), "; ".join(reasons)
    return "degraded", "; ".join(reasons)


def _bridge_ports(taps: list[TapState], topo: Topology) -> list[TapState]:
    """Taps on bridge ports copy nothing with a kernel clone: IP hooks see the bridge."""
    out = []
    for t in taps:
        link = topo.link(t.interface)
        if t.state == "active" and link is not None and link.master is not None:
            bridge = topo.by_index(link.master)
            bname = bridge.name if bridge else "a bridge"
            t = TapState(t.interface, t.direction, "error",
                         f"{t.interface} is a port of {bname}: kernel clones see {bname}, "
                         "not its ports (mirror the bridge, or use transport tzsp)")
        out.append(t)
    return out


def _plan_mirror(
    mirror: Mirror,
    collector: Collector,
    reach: Optional[Reach],
    topo: Topology,
    backend: Optional[str],
    backend_error: Optional[str],
    versions: frozenset[int],
) -> tuple[MirrorPlan, list[CloneRule], list[TzspTap]]:
    taps = _interface_taps(mirror, topo)

    def result(transport: Optional[TransportName], state: State, reason: str) -> MirrorPlan:
        return MirrorPlan(mirror, collector, transport, state, reason, tuple(taps), reach)

    if reach is None or reach.error:
        why = reach.error if reach and reach.error else f"collector {collector.address} not looked up"
        return result(None, "waiting", why), [], []
    if reach.local:
        return result(None, "error", f"collector {collector.address} is an address of this router"), [], []

    transport: TransportName
    if collector.transport == "auto":
        transport = "clone" if reach.onlink else "tzsp"
    else:
        transport = collector.transport

    if transport == "tzsp":
        return _plan_tzsp(mirror, collector, topo, taps, result)

    if not reach.onlink:
        return (
            result(
                "clone", "error",
                f"collector {collector.address} is not on-link ({reach.describe()}); a kernel clone "
                "only reaches the next hop: use transport: tzsp (or auto)",
            ),
            [],
            [],
        )
    fm = mirror.match.for_version(4 if collector.address.version == 4 else 6)
    if fm is None:
        return (
            result("clone", "error", f"no IPv{collector.address.version} traffic to clone"),
            [],
            [],
        )
    if backend is None:
        return result("clone", "error", backend_error or "no usable firewall backend"), [], []
    if collector.address.version not in versions:
        return (
            result("clone", "error", f"backend {backend} cannot clone IPv{collector.address.version} "
                   "(use backend nftables or iptables, or transport tzsp)"),
            [],
            [],
        )
    rules = [
        CloneRule(mirror.name, way, mirror.interfaces, fm, collector.address, collector.interface)
        for way in mirror.directions
    ]
    taps[:] = _bridge_ports(taps, topo)
    state, reason = _summarize(taps)
    if reach.neighbour == "FAILED":
        state = "degraded"
        reason = "; ".join(
            r for r in (f"collector {collector.address} does not answer ARP/ND (neighbour "
                        f"FAILED on {reach.oif})", reason) if r
        )
    return result("clone", state, reason), rules, []


def _plan_tzsp(
    mirror: Mirror,
    collector: Collector,
    topo: Topology,
    taps: list[TapState],
    result: Callable[[Optional[TransportName], State, str], MirrorPlan],
) -> tuple[MirrorPlan, list[CloneRule], list[TzspTap]]:
    jobs: list[TzspTap] = []
    for name in mirror.interfaces:
        link = topo.link(name)
        if link is None or not link.up:
            continue
        jobs.append(TzspTap(mirror.name, name, link.index, mirror.directions, collector,
                            mirror.match))
    state, reason = _summarize(taps)
    notes = [
        f"{t.interface} is not Ethernet (a header is synthesized)"
        for t in jobs
        if (lk := topo.link(t.interface)) is not None and lk.arphrd != ARPHRD_ETHER
    ]
    if notes and state == "active":
        reason = "; ".join(notes)
    return result("tzsp", state, reason), [], jobs
