"""Collector groups (issue 13): the mirrored traffic split over several members by
flow, both directions of a flow to one member, a dead member's flows moved to
the others and only those.

The kernel hashes each packet with nftables `symhash` (symmetric: a flow and
its reply hash alike) into one of BUCKETS buckets; a verdict map sends each
bucket to one member's chain. Buckets are given to the live members by
rendezvous (highest random weight) hashing: bucket b goes to the live member
m with the highest weight(m, b). Removing a member moves only the buckets it
held (every other bucket's highest live member is unchanged); adding one
moves only the buckets it now wins. The weight is FNV-1a (as plan.frames'
tunnel names) with a finalizer, stable across runs and interpreters.

A member is alive (member_state) when copies can reach it now: clone and
vxlan: its route lookup succeeded, it is not local, and its neighbour is not
FAILED (vxlan also needs its tunnel device up); clone also needs it on-link;
span: its port exists, is an Ethernet port, not a bridge, and is up. The
plan is a function of the topology, so a change of liveness is a change of
plan, applied by the reconciler in one transaction like any heal.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..match import Address
from ..netlink.links import Tunnel
from ..netlink.topology import ARPHRD_ETHER, Topology
from ..spec import VXLAN_PORT, Collector

BUCKETS = 64
# Here, not in plan.frames (which uses them too): plan.model imports this module.
TUNNEL_PREFIX = {"vxlan": "mvx-", "gretap": "mgt-", "erspan": "mes-"}
IFNAMSIZ = 16


def _fnv1a(data: bytes) -> int:
    """32-bit FNV-1a: stable across runs and interpreters (hash() is not), and
    no hashlib, which OpenWrt ships only with OpenSSL."""
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h
# A member counter's key is (member_counter_name, MEMBER), as a mirror's is
# (mirror, "in"/"out"): the ledger carries both alike.
MEMBER = "member"


def _fmix32(h: int) -> int:
    """MurmurHash3's finalizer: FNV-1a alone spreads short, similar strings poorly."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def weight(member: str, bucket: int) -> int:
    """The rendezvous weight of `member` for `bucket` (stable across runs)."""
    return _fmix32(_fnv1a(f"{member}/{bucket}".encode()))


def assign(members: Sequence[str], live: Collection[str],
           buckets: int = BUCKETS) -> dict[str, tuple[int, ...]]:
    """member -> the buckets it holds: each bucket to its highest-weight live
    member (ties, which need equal 32-bit weights, to the greater name)."""
    held: dict[str, list[int]] = {m: [] for m in members}
    candidates = [m for m in members if m in live]
    if candidates:
        for b in range(buckets):
            held[max(candidates, key=lambda m: (weight(m, b), m))].append(b)
    return {m: tuple(v) for m, v in held.items()}


def bucket_ranges(buckets: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted buckets as contiguous (first, last) runs."""
    out: list[tuple[int, int]] = []
    for b in sorted(buckets):
        if out and out[-1][1] == b - 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


@dataclass(frozen=True)
class Member:
    """One member of a group as the plan sees it now."""

    name: str  # the spec's text: an address, or a span port
    target: str  # where its copies go: the address (clone), a device (span, vxlan)
    target_index: int  # the device's ifindex (span, vxlan); 0 for clone
    alive: bool
    cause: str  # why it is dead ("" when alive)
    buckets: tuple[int, ...]
    counter_name: str  # its counter's key's first part (key: (counter_name, MEMBER))

    @property
    def counter(self) -> tuple[str, str]:
        return (self.counter_name, MEMBER)


@dataclass(frozen=True)
class Group:
    collector: str
    transport: str
    members: tuple[Member, ...]

    @property
    def live(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.alive)

    @property
    def dead(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if not m.alive)


def member_counter_name(collector: str, member: str) -> str:
    """Never a mirror's name (those never start with "_"); nft reads it unquoted."""
    return f"_member_{collector}_{member.replace(':', '-')}"


def member_tunnel_name(c: Collector, k: int) -> str:
    """Member k's tunnel device: prefix + name + "~k", or + a hash when too long
    ("~" is in no collector name, so no single collector's device is taken)."""
    prefix = TUNNEL_PREFIX[c.transport]
    name = f"{prefix}{c.name}~{k}"
    if len(name.encode()) < IFNAMSIZ:
        return name
    return prefix + f"{_fnv1a(f'{c.name}~{k}'.encode()):08x}"


def member_tunnels(c: Collector) -> list[Tunnel]:
    """A vxlan group's devices: one per member, member k with VNI vni + k (the
    kernel refuses two vxlan devices with one VNI, port and IP version)."""
    return [Tunnel(name=member_tunnel_name(c, k), kind="vxlan", remote=a, vni=c.vni + k,
                   port=c.port if c.transport == "vxlan" else VXLAN_PORT, owner=c.name)
            for k, a in enumerate(c.member_addresses())]


def _host_dead(topo: Topology, address: Address, clone: bool) -> str:
    """Why copies cannot reach the host member `address` now ("": they can)."""
    reach = topo.reach.get((address, None))
    if reach is None:
        return f"{address} not looked up yet"
    if reach.error:
        return reach.error
    if reach.local:
        return f"{address} is an address of this router"
    if clone and not reach.onlink:
        return f"{address} is routed via {reach.gateway}: a clone goes to an on-link host"
    if reach.neighbour == "FAILED":
        return f"{address} does not answer ARP/ND (neighbour FAILED on {reach.oif})"
    return ""


def _port_dead(topo: Topology, device: str, what: str) -> tuple[str, int]:
    link = topo.link(device)
    if link is None:
        return f"{what} {device} does not exist", 0
    if link.arphrd != ARPHRD_ETHER:
        return f"{what} {device} is not an Ethernet port", link.index
    if link.kind == "bridge":
        return f"{what} {device} is a bridge: it would flood every copy", link.index
    if not link.up:
        return f"{what} {device} is down", link.index
    return "", link.index


def plan_group(c: Collector, topo: Topology,
               tunnel_errors: Optional[Mapping[str, str]] = None) -> Group:
    """Each member's liveness and buckets, from the topology alone."""
    rows: list[tuple[str, str, int, str]] = []  # name, target, ifindex, cause
    if c.transport == "span":
        for name in c.members:
            cause, index = _port_dead(topo, name, "port")
            rows.append((name, name, index, cause))
    else:
        for k, (name, address) in enumerate(zip(c.members, c.member_addresses())):
            cause = _host_dead(topo, address, clone=c.transport == "clone")
            target, index = name, 0
            if c.transport == "vxlan":
                target = member_tunnel_name(c, k)
                error = (tunnel_errors or {}).get(target)
                dev_cause, index = _port_dead(topo, target, "tunnel device")
                cause = cause or (f"tunnel device {target}: {error}" if error else dev_cause)
            rows.append((name, target, index, cause))
    held = assign(c.members, {name for name, _, _, cause in rows if not cause})
    return Group(c.name, c.transport, tuple(
        Member(name, target, index, not cause, cause, held[name],
               member_counter_name(c.name, name))
        for name, target, index, cause in rows))


def moves(old: Group, new: Group) -> list[str]:
    """What changed between two plans of one group, for the log: a member that
    died or came back, and to whom its buckets went or from whom they came."""
    before = {m.name: m for m in old.members}
    out: list[str] = []
    for m in new.members:
        was = before.get(m.name)
        if was is None or was.alive == m.alive:
            continue
        if not m.alive:
            gone = set(was.buckets)
            takers = [o.name for o in new.members if gone & set(o.buckets)]
            out.append(f"member {m.name} FAILED ({m.cause}): buckets {len(gone)} moved to "
                       f"{', '.join(takers) or 'no one (every member is dead)'}")
        else:
            back = set(m.buckets)
            givers = [o.name for o in old.members if back & set(o.buckets)]
            out.append(f"member {m.name} is back: buckets {len(back)} returned from "
                       f"{', '.join(givers) or 'no one'}")
    return out


def groups_of(mirrors: Iterable[Any]) -> dict[str, Group]:
    """collector -> its group, from a plan's mirrors (MirrorPlan.group)."""
    out: dict[str, Group] = {}
    for mp in mirrors:
        if mp.group is not None:
            out.setdefault(mp.group.collector, mp.group)
    return out


def member_changes(old: Mapping[str, Group], new: Mapping[str, Group],
                   since: Mapping[tuple[str, str], float], now: float
                   ) -> tuple[dict[tuple[str, str], float], list[str]]:
    """When each member's current state began (wall clock), and what the log
    says of the members that died or came back since the `old` groups."""
    out: dict[tuple[str, str], float] = {}
    lines: list[str] = []
    for name, g in new.items():
        was = old.get(name)
        before = {m.name: m for m in was.members} if was is not None else {}
        for m in g.members:
            key = (name, m.name)
            prev = before.get(m.name)
            out[key] = since.get(key, now) if prev is not None and prev.alive == m.alive else now
        if was is not None:
            lines += [f"collector {name}: {line}" for line in moves(was, g)]
    return out, lines
