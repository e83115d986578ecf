"""Read-only questions to the kernel: which links exist, how is a collector reached.

Everything here is a snapshot taken through rtnetlink (rtnl.py, a plain
netlink socket); nothing is changed. The plan decides from it; the watcher
tells when to ask again.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional

from ..match import Address, Network
from . import rtnl

IFF_UP = 0x1
IFF_RUNNING = 0x40
ARPHRD_ETHER = 1
RTN_LOCAL = 2

NUD_STATES = {
    0x01: "INCOMPLETE",
    0x02: "REACHABLE",
    0x04: "STALE",
    0x08: "DELAY",
    0x10: "PROBE",
    0x20: "FAILED",
    0x40: "NOARP",
    0x80: "PERMANENT",
}


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    up: bool
    kind: Optional[str]
    arphrd: int
    mtu: int
    master: Optional[int] = None  # ifindex of the bridge (or bond) this link is a port of


@dataclass(frozen=True)
class Reach:
    """How the router reaches one collector address."""

    address: Address
    oif: Optional[str] = None
    gateway: Optional[str] = None
    local: bool = False
    neighbour: Optional[str] = None
    error: Optional[str] = None
    # The router's own prefixes on `oif` that hold the collector (on-link only):
    # what tells a directed broadcast or network address from a host.
    prefixes: tuple[Network, ...] = ()

    @property
    def onlink(self) -> bool:
        return self.error is None and not self.local and self.gateway is None

    def describe(self) -> str:
        if self.error:
            return self.error
        if self.local:
            return f"{self.address} is an address of this router"
        if self.gateway:
            return f"routed via {self.gateway} dev {self.oif}"
        neigh = f", neighbour {self.neighbour}" if self.neighbour else ""
        return f"on-link dev {self.oif}{neigh}"


@dataclass(frozen=True)
class Topology:
    links: dict[str, Link] = field(default_factory=dict)
    reach: dict[tuple[Address, Optional[str]], Reach] = field(default_factory=dict)

    def link(self, name: str) -> Optional[Link]:
        return self.links.get(name)

    def by_index(self, index: int) -> Optional[Link]:
        return self._by_index.get(index)

    @cached_property
    def _by_index(self) -> dict[int, Link]:
        # Built once per snapshot: a scan per lookup is quadratic over many bridge ports.
        return {link.index: link for link in self.links.values()}


def _links(nl: rtnl.Rtnl) -> dict[str, Link]:
    out: dict[str, Link] = {}
    for msg in nl.links():
        if not msg.name:
            continue
        out[msg.name] = Link(
            name=msg.name,
            index=msg.index,
            up=bool(msg.flags & IFF_UP) and msg.operstate in ("UP", "UNKNOWN"),
            kind=msg.kind,
            arphrd=msg.arphrd,
            mtu=msg.mtu,
            master=msg.master,
        )
    return out


def _reach(nl: rtnl.Rtnl, links: dict[str, Link], address: Address, oif: Optional[str],
           by_index: dict[int, Link]) -> Reach:
    oif_index = None
    if oif is not None:
        link = links.get(oif)
        if link is None:
            return Reach(address, oif=oif, error=f"collector interface {oif} does not exist")
        oif_index = link.index
    try:
        route = nl.route_get(address, oif_index)
    except OSError as e:
        if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return Reach(address, oif=oif, error=f"no route to collector {address}")
        return Reach(address, oif=oif, error=f"route lookup for {address} failed: {e}")
    if route is None:
        return Reach(address, oif=oif, error=f"no route to collector {address}")
    if route.type == RTN_LOCAL:
        return Reach(address, local=True)
    out_link = by_index.get(route.oif) if route.oif is not None else None
    out_name = out_link.name if out_link else str(route.oif)
    gateway = str(route.gateway) if route.gateway is not None else None
    neighbour = None
    prefixes: tuple[Network, ...] = ()
    if gateway is None and out_link is not None:
        neighbour = _neighbour_state(nl, address, out_link.index)
        prefixes = _prefixes(nl, address, out_link.index)
    return Reach(address, oif=out_name, gateway=gateway, neighbour=neighbour, prefixes=prefixes)


def _prefixes(nl: rtnl.Rtnl, address: Address, ifindex: int) -> tuple[Network, ...]:
    """The router's own prefixes on the collector's link that hold the collector."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        entries = nl.addresses(family, ifindex)
    except OSError:
        return ()
    out: list[Network] = []
    for a in entries:
        if a.address is None:
            continue
        net = ipaddress.ip_network(f"{a.address}/{a.prefixlen}", strict=False)
        if address in net and net not in out:
            out.append(net)
    return tuple(out)


def _neighbour_state(nl: rtnl.Rtnl, address: Address, ifindex: int) -> Optional[str]:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        entries = nl.neighbours(family, ifindex)
    except OSError:
        return None
    for n in entries:
        if n.dst == address:
            return NUD_STATES.get(n.state, hex(n.state))
    return None


def read(collectors: Iterable[tuple[Address, Optional[str]]]) -> Topology:
    """One consistent-enough snapshot: links, then each collector's route."""
    with rtnl.Rtnl() as nl:
        links = _links(nl)
        by_index = {lk.index: lk for lk in links.values()}
        reach = {key: _reach(nl, links, key[0], key[1], by_index) for key in set(collectors)}
    return Topology(links=links, reach=reach)
