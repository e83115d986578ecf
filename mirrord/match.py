"""The traffic selector of a mirror, independent of any backend.

Every backend (nft expressions, iptables arguments, classic BPF) renders from
`FamilyMatch`, the per-address-family view, so the meaning of a spec is
decided once here and never re-derived per backend.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal, Optional, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Family = Literal["ipv4", "ipv6", "any"]

PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOLS.items()}
# Protocols whose header starts with 16-bit source and destination ports.
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
# A `port` without a protocol means the two transports people mean by it.
DEFAULT_PORT_PROTOCOLS = (6, 17)


@dataclass(frozen=True, order=True)
class PortRange:
    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class PortClause:
    """One conjunction of port tests: every (field, ranges, negated) must hold."""

    tests: tuple[tuple[Literal["sport", "dport"], tuple[PortRange, ...], bool], ...]


@dataclass(frozen=True)
class FamilyMatch:
    """A match restricted to one IP version; what backends render."""

    version: Literal[4, 6]
    protocols: tuple[int, ...]
    port_clauses: tuple[PortClause, ...]
    sources: tuple[Network, ...]
    destinations: tuple[Network, ...]

    @property
    def has_ports(self) -> bool:
        return any(c.tests for c in self.port_clauses)


@dataclass(frozen=True)
class Match:
    family: Family = "any"
    protocols: tuple[int, ...] = ()
    ports: tuple[PortRange, ...] = ()
    sports: tuple[PortRange, ...] = ()
    dports: tuple[PortRange, ...] = ()
    sources: tuple[Network, ...] = ()
    destinations: tuple[Network, ...] = ()

    @property
    def has_ports(self) -> bool:
        return bool(self.ports or self.sports or self.dports)

    def effective_protocols(self) -> tuple[int, ...]:
        if self.protocols:
            return self.protocols
        return DEFAULT_PORT_PROTOCOLS if self.has_ports else ()

    def port_clauses(self) -> tuple[PortClause, ...]:
        """Alternatives that together match each packet at most once.

        `port` (either end) becomes "dport in P" or "sport in P and dport not
        in P": a packet with both ends in P satisfies exactly one branch, so
        a DNS server-to-server packet is copied once, not twice.
        """
        base: list[tuple[Literal["sport", "dport"], tuple[PortRange, ...], bool]] = []
        if self.sports:
            base.append(("sport", self.sports, False))
        if self.dports:
            base.append(("dport", self.dports, False))
        if not self.ports:
            return (PortClause(tuple(base)),)
        return (
            PortClause((*base, ("dport", self.ports, False))),
            PortClause((*base, ("sport", self.ports, False), ("dport", self.ports, True))),
        )

    def versions(self) -> tuple[Literal[4, 6], ...]:
        versions: tuple[Literal[4, 6], ...] = (4, 6)
        return tuple(v for v in versions if self.for_version(v) is not None)

    def for_version(self, version: Literal[4, 6]) -> Optional[FamilyMatch]:
        """The part of this match that can apply to IPv`version`, or None."""
        return _for_version(self, version)

    def _for_version(self, version: Literal[4, 6]) -> Optional[FamilyMatch]:
        if self.family == "ipv4" and version != 4:
            return None
        if self.family == "ipv6" and version != 6:
            return None
        sources = tuple(n for n in self.sources if n.version == version)
        destinations = tuple(n for n in self.destinations if n.version == version)
        # A list that names only the other family can never match here.
        if self.sources and not sources:
            return None
        if self.destinations and not destinations:
            return None
        icmp_other = 58 if version == 4 else 1
        protocols = tuple(p for p in self.effective_protocols() if p != icmp_other)
        if self.effective_protocols() and not protocols:
            return None
        return FamilyMatch(
            version=version,
            protocols=protocols,
            port_clauses=self.port_clauses(),
            sources=collapse(sources),
            destinations=collapse(destinations),
        )

    def describe(self) -> str:
        parts: list[str] = []
        if self.family != "any":
            parts.append(self.family)
        if self.protocols:
            parts.append("/".join(PROTOCOL_NAMES.get(p, str(p)) for p in self.protocols))
        for label, ranges in (("port", self.ports), ("sport", self.sports), ("dport", self.dports)):
            if ranges:
                parts.append(f"{label} {','.join(str(r) for r in ranges)}")
        if self.sources:
            parts.append("from " + ",".join(str(n) for n in self.sources))
        if self.destinations:
            parts.append("to " + ",".join(str(n) for n in self.destinations))
        return " ".join(parts) if parts else "all traffic"


def collapse(networks: tuple[Network, ...]) -> tuple[Network, ...]:
    """Merge overlapping prefixes.

    Backends that expand a list into one rule per element (iptables) would
    otherwise copy a packet once per overlapping element, and nft rejects
    overlapping intervals in one set.
    """
    if not networks:
        return ()
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def merge_ranges(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    """Sorted, non-overlapping, adjacent ranges joined (nft sets need that)."""
    out: list[PortRange] = []
    for r in sorted(ranges):
        if out and r.low <= out[-1].high + 1:
            out[-1] = PortRange(out[-1].low, max(out[-1].high, r.high))
        else:
            out.append(r)
    return tuple(out)


@functools.lru_cache(maxsize=1 << 16)
def _for_version(m: Match, version: Literal[4, 6]) -> Optional[FamilyMatch]:
    # Every plan asks this of every mirror (thousands, mostly with equal
    # matches); the answer depends on the frozen match alone.
    return m._for_version(version)
