"""Read-only questions to the kernel: which links exist, how is a collector reached.

Everything here is a snapshot taken through rtnetlink (pyroute2); nothing is
changed. The plan decides from it; the watcher tells when to ask again.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from functools import cached_property
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
        return self._by_index.get(index)

    @cached_property
    def _by_index(self) -> dict[int, Link]:
        # Built once per snapshot: a scan per lookup is quadratic over many bridge ports.
        return {link.index: link for link in self.links.values()}


# rtnetlink, for the link dump (see _dump_links)
NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_GETLINK = 18
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IF_OPER_UNKNOWN = 0
IF_OPER_UP = 6
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_NLA = struct.Struct("=HH")


def _nla(buf: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(buf, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = buf[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def _dump_links() -> dict[str, Link]:
    """Every link, from one RTM_GETLINK dump parsed here.

    pyroute2 decodes every attribute of every link (statistics, AF_SPEC, ...)
    into Python objects: with thousands of interfaces that took seconds per
    read, and the daemon reads the links on every link event.
    """
    for _ in range(5):
        links, interrupted = _dump_links_once()
        if not interrupted:
            return links
    return links  # still changing under us: the next event re-reads


def _dump_links_once() -> tuple[dict[str, Link], bool]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        seq = 1
        # Statistics are most of a link message and nothing here needs them.
        ext = struct.pack("=HHI", 8, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + ext
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), RTM_GETLINK,
                              NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        out: dict[str, Link] = {}
        interrupted = False
        while True:
            buf = sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSG.size <= len(buf):
                length, kind, flags, mseq, _pid = _NLMSG.unpack_from(buf, offset)
                if length < _NLMSG.size:
                    return out, True
                start, end = offset + _NLMSG.size, offset + length
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    return out, interrupted
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, start)[0]
                    if code:
                        raise OSError(code, f"link dump: {os.strerror(code)}")
                    continue
                if kind != RTM_NEWLINK or end - start < _IFINFO.size:
                    continue
                _fam, arphrd, index, ifflags, _change = _IFINFO.unpack_from(buf, start)
                attrs = _nla(buf, start + _IFINFO.size, end)
                name = _cstr(attrs.get(IFLA_IFNAME, b""))
                if not name:
                    continue
                oper = attrs.get(IFLA_OPERSTATE)
                operstate = oper[0] if oper else IF_OPER_UNKNOWN
                kind_name = None
                info = attrs.get(IFLA_LINKINFO)
                if info is not None:
                    k = _nla(info, 0, len(info)).get(IFLA_INFO_KIND)
                    kind_name = _cstr(k) if k is not None else None
                mtu = attrs.get(IFLA_MTU)
                master = attrs.get(IFLA_MASTER)
                out[name] = Link(
                    name=name,
                    index=index,
                    up=bool(ifflags & IFF_UP) and operstate in (IF_OPER_UP, IF_OPER_UNKNOWN),
                    kind=kind_name,
                    arphrd=arphrd,
                    mtu=struct.unpack("=I", mtu)[0] if mtu and len(mtu) >= 4 else 0,
                    master=(struct.unpack("=I", master)[0] or None)
                    if master and len(master) >= 4 else None,
                )


def _reach(ipr: Any, links: dict[str, Link], address: Address, oif: Optional[str],
           by_index: dict[int, Link]) -> Reach:
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
    if msg.get("type") == RTN_LOCAL:
        return Reach(address, local=True)
    out_index = msg.get("oif")
    out_link = by_index.get(out_index) if isinstance(out_index, int) else None
    out_name = out_link.name if out_link else str(out_index)
    gateway = msg.get("gateway")
    neighbour = None
    if gateway is None and out_link is not None:
        neighbour = _neighbour_state(ipr, address, out_link.index)
    return Reach(address, oif=out_name, gateway=gateway, neighbour=neighbour)


def _neighbour_state(ipr: Any, address: Address, ifindex: int) -> Optional[str]:
    family = 2 if address.version == 4 else 10
    try:
        for n in ipr.get_neighbours(family=family, ifindex=ifindex):
            if n.get("dst") and ipaddress.ip_address(n.get("dst")) == address:
                state = int(n["state"])
                return NUD_STATES.get(state, hex(state))
    except Exception:
        return None
    return None


def read(collectors: Iterable[tuple[Address, Optional[str]]]) -> Topology:
    """One consistent-enough snapshot: links, then each collector's route."""
    links = _dump_links()
    keys = set(collectors)
    reach: dict[tuple[Address, Optional[str]], Reach] = {}
    if keys:
        from pyroute2 import IPRoute

        by_index = {lk.index: lk for lk in links.values()}
        with IPRoute() as ipr:
            reach = {key: _reach(ipr, links, key[0], key[1], by_index) for key in keys}
    return Topology(links=links, reach=reach)
