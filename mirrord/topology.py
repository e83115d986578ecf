"""Read-only questions to the kernel: which links exist, how is a collector reached.

Everything here is a snapshot taken through rtnetlink (pyroute2); nothing is
changed. The plan decides from it; the watcher tells when to ask again.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .match import Address

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
        for link in self.links.values():
            if link.index == index:
                return link
        return None


def _attr(msg: Any, name: str) -> Any:
    """An NLA by its full name. Not `msg.get("ifname")`: the short-name lookup
    exists only from pyroute2 0.7.3 on; 0.7.2 (Debian 12's python3-pyroute2)
    walks the string's characters and answers None, so every link would look
    missing. get_attr works the same on every version mirrord supports."""
    return msg.get_attr(name)


def _links(ipr: Any) -> dict[str, Link]:
    out: dict[str, Link] = {}
    for msg in ipr.get_links():
        name = _attr(msg, "IFLA_IFNAME")
        if not name:
            continue
        flags = int(msg["flags"])
        kind = None
        info = _attr(msg, "IFLA_LINKINFO")
        if info is not None:
            kind = _attr(info, "IFLA_INFO_KIND")
        out[name] = Link(
            name=name,
            index=int(msg["index"]),
            up=bool(flags & IFF_UP) and _attr(msg, "IFLA_OPERSTATE") in ("UP", "UNKNOWN"),
            kind=kind,
            arphrd=int(msg["ifi_type"]),
            mtu=int(_attr(msg, "IFLA_MTU") or 0),
            master=_attr(msg, "IFLA_MASTER") or None,
        )
    return out


def _reach(ipr: Any, links: dict[str, Link], address: Address, oif: Optional[str]) -> Reach:
    kwargs: dict[str, Any] = {"dst": str(address)}
    if oif is not None:
        link = links.get(oif)
        if link is None:
            return Reach(address, oif=oif, error=f"collector interface {oif} does not exist")
        kwargs["oif"] = link.index
    try:
        routes = ipr.route("get", **kwargs)
    except Exception as e:  # pyroute2 raises NetlinkError; keep this module import-light
        code = getattr(e, "code", None)
        if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return Reach(address, oif=oif, error=f"no route to collector {address}")
        return Reach(address, oif=oif, error=f"route lookup for {address} failed: {e}")
    if not routes:
        return Reach(address, oif=oif, error=f"no route to collector {address}")
    msg = routes[0]
    if msg["type"] == RTN_LOCAL:
        return Reach(address, local=True)
    out_index = _attr(msg, "RTA_OIF")
    out_link = next((lk for lk in links.values() if lk.index == out_index), None)
    out_name = out_link.name if out_link else str(out_index)
    gateway = _attr(msg, "RTA_GATEWAY")
    neighbour = None
    if gateway is None and out_link is not None:
        neighbour = _neighbour_state(ipr, address, out_link.index)
    return Reach(address, oif=out_name, gateway=gateway, neighbour=neighbour)


def _neighbour_state(ipr: Any, address: Address, ifindex: int) -> Optional[str]:
    family = 2 if address.version == 4 else 10
    try:
        for n in ipr.get_neighbours(family=family, ifindex=ifindex):
            dst = _attr(n, "NDA_DST")
            if dst and ipaddress.ip_address(dst) == address:
                state = int(n["state"])
                return NUD_STATES.get(state, hex(state))
    except Exception:
        return None
    return None


def read(collectors: Iterable[tuple[Address, Optional[str]]]) -> Topology:
    """One consistent-enough snapshot: links, then each collector's route."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = _links(ipr)
        reach = {key: _reach(ipr, links, key[0], key[1]) for key in set(collectors)}
    return Topology(links=links, reach=reach)
