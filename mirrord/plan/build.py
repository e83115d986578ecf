"""Spec + topology -> Plan: what each mirror should be doing right now, and why.

A pure function: the same spec and kernel snapshot always give the same plan,
which is what lets start-up, SIGHUP and every heal share one reconcile path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Optional, Protocol

from ..match import Address, FamilyMatch, Match
from ..netlink.topology import ARPHRD_ETHER, Reach, Topology
from ..spec import Collector, Mirror, Spec
from . import reasons as why
from .reasons import Reason

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
    # Every collector address of the spec: their traffic, mirrord's own
    # copies (TZSP datagrams and their fragments) included, is never cloned.
    exclude: tuple[Address, ...] = ()

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
    # Every collector address of the spec, never captured (see exclusions());
    # part of the identity for the same reason as the match.
    exclude: tuple[Address, ...] = ()


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
    transport: Optional[Literal["clone", "tzsp"]]
    state: State
    reasons: tuple[Reason, ...]
    taps: tuple[TapState, ...] = ()
    reach: Optional[Reach] = None
    # A clone mirror's interfaces that are bridge ports, whatever their taps'
    # state: a port copies nothing with a kernel clone (health: bridge-port).
    bridge_ports: tuple[Reason, ...] = ()

    @property
    def reason(self) -> str:
        """What status and the log show: the reasons' texts, each once, "; " between."""
        return why.join(self.reasons)


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


def exclusions(spec: Spec) -> tuple[Address, ...]:
    """The addresses no mirror ever copies traffic to or from: every collector's.

    Whole addresses, not address and port: a TZSP datagram larger than the
    path MTU is fragmented and its later fragments carry no UDP header, and
    a collector answers datagrams with ICMP errors that another mirror would
    otherwise copy on. Excluding every collector (not only a mirror's own)
    is what keeps two mirrors from copying each other's copies for ever.
    """
    addrs = {c.address for c in spec.collectors.values()}
    return tuple(sorted(addrs, key=lambda a: (a.version, int(a))))


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
    exclude = exclusions(spec)
    for mirror in spec.mirrors:
        collector = spec.collector_of(mirror)
        reach = topo.reach.get((collector.address, collector.interface))
        mp, rules, tz = _plan_mirror(mirror, collector, reach, topo, backend, backend_error,
                                     versions)
        mirrors.append(mp)
        clones.extend(dataclasses.replace(r, exclude=exclude) for r in rules)
        taps.extend(dataclasses.replace(t, exclude=exclude) for t in tz)
        if rules and reach is not None and reach.oif:
            egress.add(reach.oif)
    if egress and taps:
        _keep_clones_from_taps(mirrors, taps, egress, topo)
    return Plan(backend, tuple(mirrors), tuple(clones), tuple(taps), frozenset(egress))


def _sees_egress(name: str, egress: set[str], topo: Topology) -> Optional[str]:
    """The clone egress whose outgoing frames a capture on `name` sees, if any."""
    if name in egress:
        return name
    link = topo.link(name)
    if link is not None and link.master is not None:
        master = topo.by_index(link.master)
        if master is not None and master.name in egress:
            return master.name  # a bridge port: the bridge's frames leave through it
    return None


def _keep_clones_from_taps(mirrors: list[MirrorPlan], taps: list[TzspTap], egress: set[str],
                           topo: Topology) -> None:
    """Kernel clones are no input to a TZSP mirror.

    A clone carries the original packet's addresses, so no address filter
    can tell it apart; a capture of what leaves the interface the clones
    leave through would copy them. That direction of that tap is an error
    state (its worker is not started); the rest of the mirror goes on.
    """
    blocked: dict[tuple[str, str], str] = {}
    for i, t in enumerate(taps):
        via = _sees_egress(t.interface, egress, topo) if "out" in t.directions else None
        if via is None:
            continue
        blocked[(t.mirror, t.interface)] = via
        left = tuple(w for w in t.directions if w != "out")
        taps[i] = dataclasses.replace(t, directions=left)
    taps[:] = [t for t in taps if t.directions]
    if not blocked:
        return
    for i, mp in enumerate(mirrors):
        if mp.transport != "tzsp":
            continue
        states = list(mp.taps)
        hit = False
        for j, ts in enumerate(states):
            via = blocked.get((mp.mirror.name, ts.interface))
            if via is not None and ts.direction == "out" and ts.state == "active":
                states[j] = TapState(ts.interface, "out", "error",
                                     why.tzsp_sees_clones(ts.interface, via))
                hit = True
        if hit:
            state, causes = _summarize(states)
            mirrors[i] = dataclasses.replace(mp, state=state, reasons=causes, taps=tuple(states))


def _interface_taps(mirror: Mirror, topo: Topology) -> list[TapState]:
    out: list[TapState] = []
    for name in mirror.interfaces:
        link = topo.link(name)
        for way in mirror.directions:
            if link is None:
                out.append(TapState(name, way, "waiting", why.interface_absent(name)))
            elif not link.up:
                out.append(TapState(name, way, "waiting", why.interface_down(name)))
            else:
                out.append(TapState(name, way, "active"))
    return out


def _summarize(taps: list[TapState]) -> tuple[State, tuple[Reason, ...]]:
    idle = [t for t in taps if t.state != "active"]
    if not idle:
        return "active", ()
    causes = tuple(dict.fromkeys(t.cause for t in idle if t.cause is not None))
    if len(idle) == len(taps):
        return ("error" if any(t.state == "error" for t in idle) else "waiting"), causes
    return "degraded", causes


def _bridge_ports(taps: list[TapState], ports: tuple[Reason, ...]) -> list[TapState]:
    """Active taps on bridge ports are errors: a kernel clone copies nothing there."""
    by_name = {r.interface: r for r in ports}
    return [TapState(t.interface, t.direction, "error", by_name[t.interface])
            if t.state == "active" and t.interface in by_name else t for t in taps]


class _Result(Protocol):
    def __call__(self, transport: Optional[TransportName], state: State,
                 *causes: Reason) -> MirrorPlan: ...


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
    ports: tuple[Reason, ...] = ()

    def result(transport: Optional[TransportName], state: State,
               *causes: Reason) -> MirrorPlan:
        return MirrorPlan(mirror, collector, transport, state, causes, tuple(taps), reach,
                          ports if transport == "clone" else ())

    if reach is None or reach.error:
        if reach is not None and reach.error:
            return result(None, "waiting", why.collector_unreachable(reach.error)), [], []
        return result(None, "waiting", why.collector_not_looked_up(collector.address)), [], []
    if reach.local:
        return result(None, "error", why.collector_local(collector.address)), [], []
    if (not_host := _not_a_host(collector.address, reach)) is not None:
        return result(None, "error", why.collector_not_a_host(not_host)), [], []

    transport: TransportName
    if collector.transport == "auto":
        transport = "clone" if reach.onlink else "tzsp"
    else:
        transport = collector.transport

    if transport == "tzsp":
        return _plan_tzsp(mirror, collector, topo, taps, result)

    # Whatever else stops this clone mirror, its bridge ports would copy nothing.
    ports = tuple(r for name in mirror.interfaces if (r := why.bridge_port(name, topo)))
    if not reach.onlink:
        return result("clone", "error", why.collector_offlink(collector.address, reach)), [], []
    version = collector.address.version
    fm = mirror.match.for_version(4 if version == 4 else 6)
    if fm is None:
        return result("clone", "error", why.no_family_traffic(version)), [], []
    if backend is None:
        return result("clone", "error", why.no_backend(backend_error or "")), [], []
    if version not in versions:
        return result("clone", "error", why.backend_cannot_clone(backend, version)), [], []
    rules = [
        CloneRule(mirror.name, way, mirror.interfaces, fm, collector.address, collector.interface)
        for way in mirror.directions
    ]
    taps[:] = _bridge_ports(taps, ports)
    state, causes = _summarize(taps)
    if reach.neighbour == "FAILED":
        state = "degraded"
        causes = (why.neighbour_failed(collector.address, reach.oif), *causes)
    return result("clone", state, *causes), rules, []


def _not_a_host(address: Address, reach: Reach) -> Optional[str]:
    """Why an on-link collector is its link's broadcast or network address (None: it is not).

    Only the router's own prefix on the link tells: 192.0.2.255 is a host in
    a /23 and every host of the segment in a /24.
    """
    for net in reach.prefixes:
        if net.num_addresses <= 2:  # /31, /32 (RFC 3021) and /127, /128: all hosts
            continue
        where = f"{net} on {reach.oif}"
        if net.version == 4 and address == net.broadcast_address:
            return (f"collector {address} is the broadcast address of {where}: copies would go "
                    "to every host there; a collector must be one host")
        if address == net.network_address:
            what = "network address" if net.version == 4 else "subnet-router anycast address"
            return f"collector {address} is the {what} of {where}, not a host"
    return None


def _plan_tzsp(
    mirror: Mirror,
    collector: Collector,
    topo: Topology,
    taps: list[TapState],
    result: _Result,
) -> tuple[MirrorPlan, list[CloneRule], list[TzspTap]]:
    jobs: list[TzspTap] = []
    for name in mirror.interfaces:
        link = topo.link(name)
        if link is None or not link.up:
            continue
        jobs.append(TzspTap(mirror.name, name, link.index, mirror.directions, collector,
                            mirror.match))
    state, causes = _summarize(taps)
    notes = tuple(
        why.not_ethernet(t.interface)
        for t in jobs
        if (lk := topo.link(t.interface)) is not None and lk.arphrd != ARPHRD_ETHER
    )
    if notes and state == "active":
        causes = notes
    return result("tzsp", state, *causes), [], jobs
