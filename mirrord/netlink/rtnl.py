"""The rtnetlink questions the daemon asks, over a plain netlink socket.

Which links exist (RTM_GETLINK dump), how the kernel routes one address
(RTM_GETROUTE without NLM_F_DUMP: `ip route get`), and what the neighbour
table says of it (RTM_GETNEIGH dump). pyroute2 answers the same in about
15 MiB of resident memory and 240 modules (docs/DESIGN.md has the figures);
these few fixed layouts take a few hundred lines of struct, and parse the
same on every kernel and Python a router runs.

Layouts: include/uapi/linux/netlink.h (nlmsghdr, nlattr, nlmsgerr),
rtnetlink.h (rtmsg, RTA_*), if_link.h (ifinfomsg, IFLA_*), neighbour.h
(ndmsg, NDA_*). Headers and attributes are in host byte order.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

NETLINK_ROUTE = 0

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30

# ifinfomsg attributes
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
# Kernels >= 5.10 then leave out the link counters, most of a link message;
# older ones ignore the bit.
RTEXT_FILTER_SKIP_STATS = 1 << 3
# rtmsg attributes
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15
RTA_VIA = 18
# ndmsg attributes
IFA_ADDRESS = 1

NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8

# RFC 2863 operational states, as `ip link` names them (IF_OPER_*).
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")

NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # length, type (with NLA_F_NESTED / NLA_F_NET_BYTEORDER)
IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
NDMSG = struct.Struct("=BxxxiHBB")  # family, (pad), ifindex, state, flags, type
NLA_TYPE_MASK = 0x3FFF

# Bounded: a kernel that stops answering must not hang the daemon's loop.
TIMEOUT = 5.0
# A dump the kernel marks inconsistent (the table changed while it was
# read) is asked again; the watcher's event for that change follows anyway.
DUMP_RETRIES = 3

Ip = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class NetlinkError(OSError):
    """The kernel refused a request (NLMSG_ERROR with a negative errno)."""


class ParseError(ValueError):
    """Bytes that do not have the layout their message type promises."""


# -- parsing ------------------------------------------------------------------------


def attrs(buf: bytes, offset: int, end: int) -> dict[int, bytes]:
    """Attributes from offset to end, by type (flags masked off); the last of a type wins."""
    out: dict[int, bytes] = {}
    while offset + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(buf, offset)
        if length < NLA_HDR.size or offset + length > end:
            break
        out[kind & NLA_TYPE_MASK] = buf[offset + NLA_HDR.size : offset + length]
        offset += (length + 3) & ~3
    return out


def attr(buf: bytes, offset: int, end: int, wanted: int) -> Optional[bytes]:
    """One attribute, without decoding the rest (a rule's expressions follow its table)."""
    while offset + 4 <= end:
        length, kind = NLA_HDR.unpack_from(buf, offset)
        if length < 4:
            break
        if kind & NLA_TYPE_MASK == wanted:
            return buf[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return None


def cstr(b: Optional[bytes]) -> str:
    """A NUL-terminated string attribute (IFLA_IFNAME, IFLA_INFO_KIND)."""
    return b.split(b"\0", 1)[0].decode(errors="replace") if b else ""


def address(b: Optional[bytes]) -> str:
    """An IPv4/IPv6 address attribute as text; '?' for anything else (for logs)."""
    ip = ip_address(b)
    return "?" if ip is None else str(ip)


def ip_address(b: Optional[bytes]) -> Optional[Ip]:
    if b is None or len(b) not in (4, 16):
        return None
    return ipaddress.ip_address(b)


def u32(b: Optional[bytes]) -> Optional[int]:
    return struct.unpack("=I", b[:4])[0] if b is not None and len(b) >= 4 else None


@dataclass(frozen=True)
class Message:
    """One netlink message of a datagram: header fields, and where its payload lies."""

    type: int
    flags: int
    seq: int
    pid: int
    buf: bytes
    start: int  # first byte after the nlmsghdr
    end: int

    @property
    def payload(self) -> bytes:
        return self.buf[self.start : self.end]


def messages(buf: bytes) -> Iterator[Message]:
    """The messages of one datagram, in order; a truncated tail is dropped."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(buf):
        length, kind, flags, seq, pid = NLMSG_HDR.unpack_from(buf, offset)
        if length < NLMSG_HDR.size or offset + length > len(buf):
            return
        yield Message(kind, flags, seq, pid, buf, offset + NLMSG_HDR.size, offset + length)
        offset += (length + 3) & ~3


def error_code(msg: Message) -> int:
    """NLMSG_ERROR's errno, positive; 0 is an acknowledgement."""
    if msg.end - msg.start < 4:
        raise ParseError("NLMSG_ERROR shorter than its error code")
    code: int = struct.unpack_from("=i", msg.buf, msg.start)[0]
    return -code


@dataclass(frozen=True)
class LinkMsg:
    index: int
    name: str
    arphrd: int  # ARPHRD_*: 1 is Ethernet
    flags: int  # IFF_*
    mtu: int
    operstate: str
    master: Optional[int]  # ifindex of the bridge or bond this link is a port of
    kind: Optional[str]  # IFLA_INFO_KIND: bridge, veth, vlan, ...; None for plain devices


def parse_link(msg: Message) -> LinkMsg:
    if msg.end - msg.start < IFINFOMSG.size:
        raise ParseError(f"link message of {msg.end - msg.start} bytes")
    _family, arphrd, index, flags, _change = IFINFOMSG.unpack_from(msg.buf, msg.start)
    a = attrs(msg.buf, msg.start + IFINFOMSG.size, msg.end)
    kind = None
    info = a.get(IFLA_LINKINFO)
    if info is not None:
        kind = cstr(attrs(info, 0, len(info)).get(IFLA_INFO_KIND)) or None
    oper = a.get(IFLA_OPERSTATE)
    operstate = "UNKNOWN"
    if oper:
        operstate = OPERSTATES[oper[0]] if oper[0] < len(OPERSTATES) else str(oper[0])
    return LinkMsg(index=index, name=cstr(a.get(IFLA_IFNAME)), arphrd=arphrd, flags=flags,
                   mtu=u32(a.get(IFLA_MTU)) or 0, operstate=operstate,
                   master=u32(a.get(IFLA_MASTER)) or None, kind=kind)


@dataclass(frozen=True)
class RouteMsg:
    family: int
    type: int  # RTN_*: 1 unicast, 2 local, ...
    table: int
    dst: Optional[Ip]
    oif: Optional[int]
    gateway: Optional[Ip]  # RTA_GATEWAY, or RTA_VIA (an IPv4 route via an IPv6 next hop)
    prefsrc: Optional[Ip]


def parse_route(msg: Message) -> RouteMsg:
    if msg.end - msg.start < RTMSG.size:
        raise ParseError(f"route message of {msg.end - msg.start} bytes")
    family, _dl, _sl, _tos, table, _proto, _scope, rtype, _flags = RTMSG.unpack_from(
        msg.buf, msg.start)
    a = attrs(msg.buf, msg.start + RTMSG.size, msg.end)
    gateway = ip_address(a.get(RTA_GATEWAY))
    via = a.get(RTA_VIA)
    if gateway is None and via is not None and len(via) > 2:
        gateway = ip_address(via[2:])  # struct rtvia: family u16, then the address
    return RouteMsg(family=family, type=rtype, table=u32(a.get(RTA_TABLE)) or table,
                    dst=ip_address(a.get(RTA_DST)), oif=u32(a.get(RTA_OIF)), gateway=gateway,
                    prefsrc=ip_address(a.get(RTA_PREFSRC)))


@dataclass(frozen=True)
class NeighMsg:
    family: int
    ifindex: int
    state: int  # NUD_* bits
    dst: Optional[Ip]
    lladdr: Optional[str]


def parse_neigh(msg: Message) -> NeighMsg:
    if msg.end - msg.start < NDMSG.size:
        raise ParseError(f"neighbour message of {msg.end - msg.start} bytes")
    family, ifindex, state, _flags, _type = NDMSG.unpack_from(msg.buf, msg.start)
    a = attrs(msg.buf, msg.start + NDMSG.size, msg.end)
    ll = a.get(NDA_LLADDR)
    return NeighMsg(family=family, ifindex=ifindex, state=state, dst=ip_address(a.get(NDA_DST)),
                    lladdr=":".join(f"{x:02x}" for x in ll) if ll else None)


@dataclass(frozen=True)
class AddrMsg:
    family: int
    prefixlen: int
    index: int
    address: Optional[Ip]


def parse_addr(msg: Message) -> AddrMsg:
    if msg.end - msg.start < IFADDRMSG.size:
        raise ParseError(f"address message of {msg.end - msg.start} bytes")
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(msg.buf, msg.start)
    a = attrs(msg.buf, msg.start + IFADDRMSG.size, msg.end)
    return AddrMsg(family=family, prefixlen=prefixlen, index=index,
                   address=ip_address(a.get(IFA_ADDRESS)))


# -- building requests ----------------------------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    length = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(length, kind) + payload + b"\0" * (-length % 4)


def request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), kind, flags, seq, 0) + body


def route_get_request(seq: int, dst: Ip, oif: Optional[int] = None) -> bytes:
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    body = RTMSG.pack(family, dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + nla(RTA_DST, dst.packed)
    if oif is not None:
        body += nla(RTA_OIF, struct.pack("=I", oif))
    return request(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


def link_dump_request(seq: int) -> bytes:
    return request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq,
                   IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
                   + nla(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS)))


def addr_dump_request(seq: int, family: int) -> bytes:
    return request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq,
                   IFADDRMSG.pack(family, 0, 0, 0, 0))


def neigh_dump_request(seq: int, family: int, ifindex: Optional[int] = None) -> bytes:
    body = NDMSG.pack(family, 0, 0, 0, 0)
    if ifindex is not None:
        # Kernels >= 4.20 filter the dump by device; older ones send it all.
        body += nla(NDA_IFINDEX, struct.pack("=I", ifindex))
    return request(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


# -- asking the kernel ----------------------------------------------------------------


class Rtnl:
    """One NETLINK_ROUTE socket for a few requests; use as a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        try:
            self.sock.settimeout(TIMEOUT)
            self.sock.bind((0, 0))
            self.pid: int = self.sock.getsockname()[0]
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _replies(self, seq: int) -> Iterator[Message]:
        """The messages answering `seq`, until NLMSG_DONE or an error; raises NetlinkError."""
        while True:
            try:
                buf = self.sock.recv(1 << 16)
            except socket.timeout:
                raise NetlinkError(errno.ETIMEDOUT, "rtnetlink did not answer") from None
            for msg in messages(buf):
                if msg.seq != seq or msg.pid != self.pid:
                    continue  # an answer to an earlier request that timed out
                if msg.type == NLMSG_ERROR:
                    code = error_code(msg)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                if msg.type == NLMSG_DONE:
                    return
                if msg.type in (NLMSG_NOOP, NLMSG_OVERRUN):
                    continue
                yield msg
                if not msg.flags & NLM_F_MULTI:
                    return  # a single answer (route get) has no NLMSG_DONE

    def dump(self, build: bytes, kind: int) -> list[Message]:
        """A whole dump of `kind` messages; asked again if the kernel says it is inconsistent."""
        for attempt in range(DUMP_RETRIES):
            seq = self._next_seq()
            # The sequence number is the only field a request depends on per attempt.
            self.sock.send(build[:8] + struct.pack("=I", seq) + build[12:])
            out = [m for m in self._replies(seq) if m.type == kind]
            if not any(m.flags & NLM_F_DUMP_INTR for m in out) or attempt == DUMP_RETRIES - 1:
                return out
        raise AssertionError("unreachable")

    def links(self) -> list[LinkMsg]:
        return [parse_link(m) for m in self.dump(link_dump_request(0), RTM_NEWLINK)]

    def route_get(self, dst: Ip, oif: Optional[int] = None) -> Optional[RouteMsg]:
        """The kernel's route for dst (`ip route get dst [oif DEV]`); NetlinkError if none."""
        seq = self._next_seq()
        self.sock.send(route_get_request(seq, dst, oif))
        for m in self._replies(seq):
            if m.type == RTM_NEWROUTE:
                return parse_route(m)
        return None

    def neighbours(self, family: int, ifindex: Optional[int] = None) -> list[NeighMsg]:
        out = [parse_neigh(m) for m in self.dump(neigh_dump_request(0, family, ifindex),
                                                  RTM_NEWNEIGH)]
        return [n for n in out if ifindex is None or n.ifindex == ifindex]

    def addresses(self, family: int, ifindex: Optional[int] = None) -> list[AddrMsg]:
        out = [parse_addr(m) for m in self.dump(addr_dump_request(0, family), RTM_NEWADDR)]
        return [a for a in out if ifindex is None or a.index == ifindex]
