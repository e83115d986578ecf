"""Spec + topology -> Plan: what each mirror should be doing right now, and why.

A pure function: the same spec and kernel snapshot always give the same plan,
which is what lets start-up, SIGHUP and every heal share one reconcile path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional

from ..match import Address
from ..netlink.topology import ARPHRD_ETHER, Reach, Topology
from ..spec import Collector, Mirror, Spec
from . import reasons as why
from .delivery import delivery_points
from .frames import Result, carriers, frame_rules, plan_frames, tunnels
from .groups import Group, plan_group
from .model import (
    CloneRule,
    FrameRule,
    FrameSupport,
    MirrorPlan,
    Plan,
    State,
    TapState,
    TransportName,
    TzspTap,
    summarize,
)
from .reasons import Reason


def collector_keys(spec: Spec) -> list[tuple[Address, Optional[str]]]:
    """The (address, interface) pairs whose reach the topology must look up:
    every collector's, and every member's of a group (plan.groups)."""
    out = [(c.address, c.interface) for c in spec.collectors.values() if c.address is not None]
    out += [(a, None) for c in spec.collectors.values() for a in c.member_addresses()]
    return out


def exclusions(spec: Spec) -> tuple[Address, ...]:
    """The addresses no mirror ever copies traffic to or from: every collector's.

    Whole addresses, not address and port: a TZSP datagram larger than the
    path MTU is fragmented and its later fragments carry no UDP header, and
    a collector answers datagrams with ICMP errors that another mirror would
    otherwise copy on. Excluding every collector (not only a mirror's own)
    is what keeps two mirrors from copying each other's copies for ever.
    """
    addrs = {c.address for c in spec.collectors.values() if c.address is not None}
    addrs |= {a for c in spec.collectors.values() for a in c.member_addresses()}
    return tuple(sorted(addrs, key=lambda a: (a.version, int(a))))


_FRAMES_SUPPORTED = FrameSupport()


def build(
    spec: Spec,
    topo: Topology,
    backend: Optional[str],
    backend_error: Optional[str] = None,
    versions: frozenset[int] = frozenset({4, 6}),
    frame_support: FrameSupport = _FRAMES_SUPPORTED,
    tunnel_errors: Optional[Mapping[str, str]] = None,
    delivery: bool = True,
) -> Plan:
    """`versions`: the IP versions the backend can clone (route-tee: IPv4 only);
    `frame_support`: whether it can copy whole frames; `tunnel_errors`: why a
    tunnel device of plan.tunnels(spec) could not be made, by device name;
    `delivery`: whether the backend counts copies where they leave."""
    mirrors: list[MirrorPlan] = []
    clones: list[CloneRule] = []
    taps: list[TzspTap] = []
    frames: list[FrameRule] = []
    egress: set[str] = set()
    exclude = exclusions(spec)
    ctx = _Context(topo, backend, backend_error, versions, frame_support,
                   tunnel_errors or {}, carriers(spec))
    for mirror in spec.mirrors:
        collector = spec.collector_of(mirror)
        reach = (topo.reach.get((collector.address, collector.interface))
                 if collector.address is not None else None)
        mp, rules, tz, fr = _plan_mirror(mirror, collector, reach, ctx)
        mirrors.append(mp)
        clones.extend(dataclasses.replace(r, exclude=exclude) for r in rules)
        taps.extend(dataclasses.replace(t, exclude=exclude) for t in tz)
        frames.extend(dataclasses.replace(r, exclude=exclude) for r in fr)
        if rules and reach is not None and reach.oif:
            egress.add(reach.oif)
        if rules and mp.group is not None:
            egress |= {r.oif for a in collector.member_addresses()
                       if (r := topo.reach.get((a, None))) is not None and r.oif}
    if egress and (taps or frames):
        _keep_clones_from_taps(mirrors, taps, frames, egress, topo)
    made = tunnels(spec) if frames or any(mp.collector.copies_frames for mp in mirrors) else ()
    return Plan(backend, tuple(mirrors), tuple(clones), tuple(taps), clone_egress=frozenset(egress),
                frames=tuple(frames), tunnels=made,
                deliveries=delivery_points(mirrors, clones, frames, made) if delivery else ())


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every mirror's planning reads besides the mirror and its collector."""

    topo: Topology
    backend: Optional[str]
    backend_error: Optional[str]
    versions: frozenset[int]
    frame_support: FrameSupport
    tunnel_errors: Mapping[str, str]
    carriers: Mapping[str, str]


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


def _keep_clones_from_taps(mirrors: list[MirrorPlan], taps: list[TzspTap],
                           frames: list[FrameRule], egress: set[str], topo: Topology) -> None:
    """Kernel clones are no input to a TZSP or whole-frame mirror.

    A clone carries the original packet's addresses, so no address filter
    can tell it apart; a capture (or netdev egress copy) of what leaves the
    interface the clones leave through would copy them. That direction of
    that tap is an error state (no worker, no rule); the rest of the mirror
    goes on.
    """
    blocked: dict[tuple[str, str], Reason] = {}
    for i, t in enumerate(taps):
        via = _sees_egress(t.interface, egress, topo) if "out" in t.directions else None
        if via is None:
            continue
        blocked[(t.mirror, t.interface)] = why.tzsp_sees_clones(t.interface, via)
        left = tuple(w for w in t.directions if w != "out")
        taps[i] = dataclasses.replace(t, directions=left)
    taps[:] = [t for t in taps if t.directions]
    kept: list[FrameRule] = []
    for r in frames:
        via = _sees_egress(r.interface, egress, topo) if r.direction == "out" else None
        if via is None:
            kept.append(r)
        else:
            blocked[(r.mirror, r.interface)] = why.carries_copies(
                r.interface, f"mirrord's kernel clones (they leave through {via})")
    frames[:] = kept
    if blocked:
        _block_out_taps(mirrors, blocked)


def _block_out_taps(mirrors: list[MirrorPlan], blocked: dict[tuple[str, str], Reason]) -> None:
    for i, mp in enumerate(mirrors):
        if mp.transport in (None, "clone"):
            continue
        states = list(mp.taps)
        hit = False
        for j, ts in enumerate(states):
            cause = blocked.get((mp.mirror.name, ts.interface))
            if cause is not None and ts.direction == "out" and ts.state == "active":
                states[j] = TapState(ts.interface, "out", "error", cause)
                hit = True
        if hit:
            state, causes = summarize(states)
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


def _bridge_ports(taps: list[TapState], ports: tuple[Reason, ...]) -> list[TapState]:
    """Active taps on bridge ports are errors: a kernel clone copies nothing there."""
    by_name = {r.interface: r for r in ports}
    return [TapState(t.interface, t.direction, "error", by_name[t.interface])
            if t.state == "active" and t.interface in by_name else t for t in taps]


def _plan_mirror(
    mirror: Mirror,
    collector: Collector,
    reach: Optional[Reach],
    ctx: _Context,
) -> tuple[MirrorPlan, list[CloneRule], list[TzspTap], list[FrameRule]]:
    topo, backend = ctx.topo, ctx.backend
    taps = _interface_taps(mirror, topo)
    ports: tuple[Reason, ...] = ()

    def result(transport: Optional[TransportName], state: State,
               *causes: Reason) -> MirrorPlan:
        return MirrorPlan(mirror, collector, transport, state, causes, tuple(taps), reach,
                          ports if transport == "clone" else ())

    def frames() -> tuple[MirrorPlan, list[CloneRule], list[TzspTap], list[FrameRule]]:
        if backend is None:
            t: TransportName = collector.transport  # type: ignore[assignment]
            return result(t, "error", why.no_backend(ctx.backend_error or "")), [], [], []
        mp, rules = plan_frames(mirror, collector, topo, taps, ctx.frame_support,
                                ctx.tunnel_errors, ctx.carriers, result)
        return mp, [], [], rules

    if collector.is_group:
        return _plan_group_mirror(mirror, collector, ctx, taps, result)
    if collector.address is None:  # span: the collector is a port, not a host
        return frames()
    if reach is None or reach.error:
        if reach is not None and reach.error:
            return result(None, "waiting", why.collector_unreachable(reach.error)), [], [], []
        return (result(None, "waiting", why.collector_not_looked_up(collector.address)),
                [], [], [])
    if reach.local:
        return result(None, "error", why.collector_local(collector.address)), [], [], []
    if (not_host := _not_a_host(collector.address, reach)) is not None:
        return result(None, "error", why.collector_not_a_host(not_host)), [], [], []

    transport: TransportName
    if collector.transport == "auto":
        transport = "clone" if reach.onlink else "tzsp"
    else:
        transport = collector.transport

    if transport == "tzsp":
        mp, jobs = _plan_tzsp(mirror, collector, topo, taps, ctx.carriers, result)
        return mp, [], jobs, []
    if transport != "clone":
        return frames()

    # Whatever else stops this clone mirror, its bridge ports would copy nothing.
    ports = tuple(r for name in mirror.interfaces if (r := why.bridge_port(name, topo)))
    if not reach.onlink:
        return (result("clone", "error", why.collector_offlink(collector.address, reach)),
                [], [], [])
    version = collector.address.version
    fm = mirror.match.for_version(4 if version == 4 else 6)
    if fm is None:
        return result("clone", "error", why.no_family_traffic(version)), [], [], []
    if backend is None:
        return result("clone", "error", why.no_backend(ctx.backend_error or "")), [], [], []
    if version not in ctx.versions:
        return result("clone", "error", why.backend_cannot_clone(backend, version)), [], [], []
    rules = [
        CloneRule(mirror.name, way, mirror.interfaces, fm, collector.address, collector.interface)
        for way in mirror.directions
    ]
    taps[:] = _bridge_ports(taps, ports)
    state, causes = summarize(taps)
    if reach.neighbour == "FAILED":
        state = "degraded"
        causes = (why.neighbour_failed(collector.address, reach.oif), *causes)
    return result("clone", state, *causes), rules, [], []


def _plan_group_mirror(
    mirror: Mirror,
    collector: Collector,
    ctx: _Context,
    taps: list[TapState],
    result: Result,
) -> tuple[MirrorPlan, list[CloneRule], list[TzspTap], list[FrameRule]]:
    """A mirror to a group: the rules copy to the live members by bucket
    (plan.groups); some members dead: degraded, every member: error."""
    group = plan_group(collector, ctx.topo, ctx.tunnel_errors)
    t: TransportName = collector.transport  # type: ignore[assignment]

    def done(mp: MirrorPlan, clones: list[CloneRule], frames: list[FrameRule]
             ) -> tuple[MirrorPlan, list[CloneRule], list[TzspTap], list[FrameRule]]:
        return dataclasses.replace(mp, group=group), clones, [], frames

    dead = [(m.name, m.cause) for m in group.dead]
    live = group.live
    if not live:
        return done(result(t, "error", why.all_members_dead(collector.name, dead)), [], [])
    if t == "tzsp":
        mp, jobs = _plan_tzsp(mirror, collector, ctx.topo, taps, ctx.carriers, result, group)
        if dead and mp.state in ("active", "degraded"):
            mp = dataclasses.replace(mp, state="degraded", reasons=(
                why.members_dead(collector.name, dead, len(live)), *mp.reasons))
        return dataclasses.replace(mp, group=group), [], jobs, []
    if ctx.backend is None:
        return done(result(t, "error", why.no_backend(ctx.backend_error or "")), [], [])
    clones: list[CloneRule] = []
    frames: list[FrameRule] = []
    if t == "clone":
        ports = tuple(r for name in mirror.interfaces if (r := why.bridge_port(name, ctx.topo)))
        first = collector.member_addresses()[collector.members.index(live[0].name)]
        fm = mirror.match.for_version(4 if first.version == 4 else 6)
        if fm is None:
            return done(result(t, "error", why.no_family_traffic(first.version)), [], [])
        if first.version not in ctx.versions:
            return done(result(t, "error", why.backend_cannot_clone(ctx.backend, first.version)),
                        [], [])
        clones = [CloneRule(mirror.name, way, mirror.interfaces, fm, first, None, group=group)
                  for way in mirror.directions]
        taps[:] = _bridge_ports(taps, ports)
    else:
        if ctx.frame_support.ingress:
            return done(result(t, "error", why.frames_unsupported(ctx.frame_support.ingress)),
                        [], [])
        frames = [dataclasses.replace(r, group=group) for r in frame_rules(
            mirror, ctx.topo, taps, ctx.frame_support, ctx.carriers, live[0].target,
            live[0].target_index)]
    state, causes = summarize(taps)
    if dead and state in ("active", "degraded"):
        state = "degraded"
        causes = (why.members_dead(collector.name, dead, len(live)), *causes)
    return done(result(t, state, *causes), clones, frames)


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
    carried: Mapping[str, str],
    result: Result,
    group: Optional[Group] = None,
) -> tuple[MirrorPlan, list[TzspTap]]:
    """One tap per interface; to a group, one per interface and live member,
    each capturing its member's buckets only (tzsp.bpf)."""
    for i, tap in enumerate(taps):
        what = carried.get(tap.interface)
        if what is not None and tap.direction == "out" and tap.state == "active":
            taps[i] = TapState(tap.interface, "out", "error", why.carries_copies(tap.interface, what))
    jobs: list[TzspTap] = []
    for name in mirror.interfaces:
        link = topo.link(name)
        ways = tuple(t.direction for t in taps if t.interface == name and t.state == "active")
        if link is None or not ways:
            continue
        if group is None:
            jobs.append(TzspTap(mirror.name, name, link.index, ways, collector, mirror.match))
            continue
        addresses = dict(zip(collector.members, collector.member_addresses()))
        # Without the member list: a tap is its member's, and a reload that
        # adds or removes another member must not replace it (only its filter).
        settings = dataclasses.replace(collector, members=())
        jobs += [TzspTap(mirror.name, name, link.index, ways, settings, mirror.match,
                         member=m.name, member_address=addresses[m.name],
                         member_index=collector.members.index(m.name), buckets=m.buckets)
                 for m in group.live]
    state, causes = summarize(taps)
    notes = tuple(
        why.not_ethernet(t.interface)
        for t in jobs
        if (lk := topo.link(t.interface)) is not None and lk.arphrd != ARPHRD_ETHER
    )
    if notes and state == "active":
        causes = notes
    return result("tzsp", state, *causes), jobs
