"""The tunnel devices mirrord owns (vxlan, gretap, erspan), over raw rtnetlink.

nftables `dup to "<dev>"` copies whole frames into one of these; the device
encapsulates them towards the collector. mirrord marks its devices with an
IFLA_IFALIAS starting "mirrord" so it can find them again after a restart or
crash, and never touches a device without that mark.

Attribute numbers and validation rules: include/uapi/linux/if_link.h,
drivers/net/vxlan/vxlan_core.c (vxlan_policy), net/ipv4/ip_gre.c
(erspan_validate), iproute2 ip/iplink_{vxlan,gre}.c; notes in
/work/notes/issue12-research.md section 4.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Optional

from ..match import Address
from . import rtnl
from .rtnl import IFINFOMSG, Message, NetlinkError, attrs, cstr, nla

ACK, NEWLINK = rtnl.NLM_F_ACK, rtnl.RTM_NEWLINK

log = logging.getLogger(__name__)

TunnelKind = Literal["vxlan", "gretap", "erspan"]

RTM_DELLINK = 17
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # the error message does not echo the request's payload
NLM_F_ACK_TLVS = 0x200  # extended-ack attributes follow (NLMSGERR_ATTR_*)
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
IFF_UP = 0x1
IFLA_IFALIAS = 20
IFLA_AF_SPEC = 26
IFLA_INFO_DATA = 2
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IFLA_VXLAN_ID, IFLA_VXLAN_GROUP, IFLA_VXLAN_TTL, IFLA_VXLAN_LEARNING = 1, 2, 5, 7
IFLA_VXLAN_PORT, IFLA_VXLAN_GROUP6, IFLA_VXLAN_DF = 15, 16, 29
IFLA_GRE_IFLAGS, IFLA_GRE_OFLAGS, IFLA_GRE_IKEY, IFLA_GRE_OKEY = 2, 3, 4, 5
IFLA_GRE_REMOTE, IFLA_GRE_TTL, IFLA_GRE_PMTUDISC = 7, 8, 10
IFLA_GRE_ERSPAN_INDEX, IFLA_GRE_ERSPAN_VER = 21, 22
GRE_SEQ_KEY = 0x3000  # GRE_SEQ | GRE_KEY: erspan_validate wants exactly these for type II
TTL = 64
MTU = 65535  # the largest any of these kinds takes without a lower device (ETH_MAX_MTU)
OWNER = "mirrord"
IFNAMSIZ = 16

# kind -> (kernel kind for an IPv4 remote, for an IPv6 remote)
KERNEL_KINDS: dict[str, tuple[str, str]] = {
    "vxlan": ("vxlan", "vxlan"), "gretap": ("gretap", "ip6gretap"), "erspan": ("erspan", "ip6erspan")}
# kernel kind -> (OpenWrt package, kernel option) that provides it
DRIVERS = {"vxlan": ("kmod-vxlan", "CONFIG_VXLAN"), "gretap": ("kmod-gre", "CONFIG_NET_IPGRE"),
           "erspan": ("kmod-gre", "CONFIG_NET_IPGRE"), "ip6gretap": ("kmod-gre6", "CONFIG_IPV6_GRE"),
           "ip6erspan": ("kmod-gre6", "CONFIG_IPV6_GRE")}
KINDS: dict[str, TunnelKind] = {
    "vxlan": "vxlan", "gretap": "gretap", "ip6gretap": "gretap", "erspan": "erspan",
    "ip6erspan": "erspan"}


@dataclass(frozen=True)
class Tunnel:
    name: str  # device name, at most 15 bytes
    kind: TunnelKind
    remote: Address
    vni: int = 0  # vxlan only (0..16777215)
    port: int = 4789  # vxlan UDP destination port
    session: int = 0  # erspan session id (0..1023)
    owner: str = ""  # the collector's name; the device's alias is "mirrord <owner>"

    @property
    def alias(self) -> str:
        return f"{OWNER} {self.owner}" if self.owner else OWNER

    @property
    def kernel_kind(self) -> str:
        return KERNEL_KINDS[self.kind][self.remote.version == 6]


class LinkError(Exception):
    """A tunnel device that could not be made or removed; the message is for the user."""


def canonical(t: Tunnel) -> Tunnel:
    """t with the fields its kind does not use at their defaults (as owned() reads them back)."""
    return replace(t, vni=t.vni if t.kind == "vxlan" else 0,
                   port=t.port if t.kind == "vxlan" else 4789,
                   session=t.session if t.kind == "erspan" else 0)


def check(t: Tunnel) -> None:
    """LinkError for a tunnel the kernel would refuse, before asking it."""
    raw = t.name.encode()
    if not raw or len(raw) >= IFNAMSIZ or t.name in (".", "..") or any(
            c in "/:" or c.isspace() for c in t.name):
        raise LinkError(f"bad tunnel device name {t.name!r}: 1 to 15 bytes, no '/', ':' or space")
    if t.kind not in KERNEL_KINDS:
        raise LinkError(f"{t.name}: unknown tunnel kind {t.kind!r}")
    if t.remote.is_unspecified or t.remote.is_multicast:
        raise LinkError(f"{t.name}: the remote {t.remote} is not a unicast address")
    if not 0 <= t.vni <= 0xFFFFFF:
        raise LinkError(f"{t.name}: vxlan id {t.vni} is out of range 0..16777215")
    if not 1 <= t.port <= 0xFFFF:
        raise LinkError(f"{t.name}: vxlan port {t.port} is out of range 1..65535")
    if not 0 <= t.session <= 1023:
        raise LinkError(f"{t.name}: erspan session {t.session} is out of range 0..1023")


# -- messages -------------------------------------------------------------------------


def info_data(t: Tunnel) -> bytes:
    """IFLA_INFO_DATA's contents for t (the attributes inside the nest)."""
    if t.kind == "vxlan":
        group = IFLA_VXLAN_GROUP if t.remote.version == 4 else IFLA_VXLAN_GROUP6
        return (nla(IFLA_VXLAN_ID, struct.pack("=I", t.vni)) + nla(group, t.remote.packed)
                # Big-endian, and always sent: without it the kernel uses 8472, not 4789.
                + nla(IFLA_VXLAN_PORT, struct.pack("!H", t.port))
                + nla(IFLA_VXLAN_LEARNING, b"\0") + nla(IFLA_VXLAN_TTL, bytes([TTL]))
                # VXLAN_DF_UNSET: an outer IPv4 packet over the path MTU is fragmented, not dropped.
                + nla(IFLA_VXLAN_DF, b"\0"))
    out = nla(IFLA_GRE_REMOTE, t.remote.packed) + nla(IFLA_GRE_TTL, bytes([TTL]))
    if t.remote.version == 4:
        out += nla(IFLA_GRE_PMTUDISC, b"\0")  # outer DF clear: fragmented, never dropped
    if t.kind == "erspan":
        out += (nla(IFLA_GRE_IFLAGS, struct.pack("!H", GRE_SEQ_KEY))
                + nla(IFLA_GRE_OFLAGS, struct.pack("!H", GRE_SEQ_KEY))
                + nla(IFLA_GRE_IKEY, struct.pack("!I", t.session))
                + nla(IFLA_GRE_OKEY, struct.pack("!I", t.session))
                + nla(IFLA_GRE_ERSPAN_VER, b"\1")
                + nla(IFLA_GRE_ERSPAN_INDEX, struct.pack("=I", 0)))
    return out


def nest(kind: int, payload: bytes) -> bytes:
    return nla(kind | 0x8000, payload)  # NLA_F_NESTED


def new_link_body(t: Tunnel, mtu: Optional[int] = MTU) -> bytes:
    """The RTM_NEWLINK payload creating t (down, no alias yet)."""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + nla(rtnl.IFLA_IFNAME, t.name.encode() + b"\0")
    if mtu is not None:
        body += nla(rtnl.IFLA_MTU, struct.pack("=I", mtu))
    info = nla(rtnl.IFLA_INFO_KIND, t.kernel_kind.encode() + b"\0") + nest(IFLA_INFO_DATA, info_data(t))
    return body + nest(rtnl.IFLA_LINKINFO, info)


def setup_body(index: int, alias: str) -> bytes:
    """Mark the device as mirrord's, and keep IPv6 from sending DAD/MLD/RS into the tunnel."""
    af = nest(socket.AF_INET6, nla(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE])))
    return (IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + nla(IFLA_IFALIAS, alias.encode())
            + nest(IFLA_AF_SPEC, af))


def parse_tunnel(name: str, alias: str, linkinfo: bytes) -> Optional[Tunnel]:
    """The Tunnel an IFLA_LINKINFO describes; None for any other kind of link."""
    info = attrs(linkinfo, 0, len(linkinfo))
    kind = KINDS.get(cstr(info.get(rtnl.IFLA_INFO_KIND)))
    data = info.get(IFLA_INFO_DATA, b"")
    a = attrs(data, 0, len(data))
    owner = alias[len(OWNER):].strip()
    if kind == "vxlan":
        raw = a.get(IFLA_VXLAN_GROUP6) or a.get(IFLA_VXLAN_GROUP)
        port = a.get(IFLA_VXLAN_PORT)
        vni = a.get(IFLA_VXLAN_ID)
        if raw is None or len(raw) not in (4, 16) or port is None or vni is None:
            return None
        return Tunnel(name, kind, ipaddress.ip_address(raw), vni=struct.unpack("=I", vni[:4])[0],
                      port=struct.unpack("!H", port[:2])[0], owner=owner)
    if kind is None:
        return None
    raw = a.get(IFLA_GRE_REMOTE)
    if raw is None or len(raw) not in (4, 16):
        return None
    okey = a.get(IFLA_GRE_OKEY)
    session = struct.unpack("!I", okey[:4])[0] if kind == "erspan" and okey else 0
    return Tunnel(name, kind, ipaddress.ip_address(raw), session=session, owner=owner)


# -- the kernel ----------------------------------------------------------------------


class KernelError(NetlinkError):
    """NetlinkError with the kernel's extended-ack text, when it sent one."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, os.strerror(code))
        self.detail = detail

    def text(self) -> str:
        return f"{self.strerror}: {self.detail}" if self.detail else str(self.strerror)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    alias: str
    tunnel: Optional[Tunnel]

    @property
    def mine(self) -> bool:
        """A tunnel mirrord made: its alias, exactly, and a tunnel kind (an alias
        like "mirrord-ids port" on someone's VLAN is not the mark)."""
        return (self.alias == OWNER or self.alias.startswith(OWNER + " ")) and (
            self.tunnel is not None)


def parse_link_msg(msg: Message) -> Link:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(msg.buf, msg.start)
    a = attrs(msg.buf, msg.start + IFINFOMSG.size, msg.end)
    name, alias = cstr(a.get(rtnl.IFLA_IFNAME)), cstr(a.get(IFLA_IFALIAS))
    info = a.get(rtnl.IFLA_LINKINFO)
    return Link(index, name, flags, alias, parse_tunnel(name, alias, info) if info else None)


class Links(rtnl.Rtnl):
    """An rtnetlink socket that also changes links, with the kernel's reasons on errors."""

    def __init__(self) -> None:
        super().__init__()
        for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            try:
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:
                pass  # old kernels: errors come without the kernel's text

    def __enter__(self) -> Links:
        return self

    def call(self, kind: int, flags: int, body: bytes) -> Optional[Message]:
        """Send one request; its single answer (None for an acknowledgement); KernelError."""
        seq = self._next_seq()
        self.sock.send(rtnl.request(kind, rtnl.NLM_F_REQUEST | flags, seq, body))
        while True:
            try:
                buf = self.sock.recv(1 << 16)
            except socket.timeout:
                raise KernelError(errno.ETIMEDOUT, "rtnetlink did not answer") from None
            for msg in rtnl.messages(buf):
                if msg.seq != seq or msg.pid != self.pid:
                    continue
                if msg.type == rtnl.NLMSG_ERROR:
                    code = rtnl.error_code(msg)
                    if code:
                        raise KernelError(code, extack(msg))
                    return None
                if msg.type != rtnl.NLMSG_DONE:
                    return msg

    def link(self, name: str) -> Optional[Link]:
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + nla(rtnl.IFLA_IFNAME, name.encode() + b"\0")
        try:
            msg = self.call(rtnl.RTM_GETLINK, 0, body)
        except NetlinkError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        return parse_link_msg(msg) if msg is not None and msg.type == rtnl.RTM_NEWLINK else None

    def all_links(self) -> list[Link]:
        return [parse_link_msg(m) for m in self.dump(rtnl.link_dump_request(0), rtnl.RTM_NEWLINK)]

    def set_up(self, index: int) -> None:
        self.call(NEWLINK, ACK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP))

    def remove(self, index: int) -> None:
        try:
            self.call(RTM_DELLINK, ACK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))
        except NetlinkError as e:
            if e.errno != errno.ENODEV:
                raise


def extack(msg: Message) -> str:
    """NLMSGERR_ATTR_MSG of an error message, '' when the kernel sent none."""
    if not msg.flags & NLM_F_ACK_TLVS or msg.end - msg.start < 4 + rtnl.NLMSG_HDR.size:
        return ""
    offset = msg.start + 4 + rtnl.NLMSG_HDR.size
    if not msg.flags & NLM_F_CAPPED:  # the request's payload is echoed first
        offset += (rtnl.NLMSG_HDR.unpack_from(msg.buf, msg.start + 4)[0] - rtnl.NLMSG_HDR.size + 3) & ~3
    return cstr(attrs(msg.buf, offset, msg.end).get(NLMSGERR_ATTR_MSG))


def _create(nl: Links, t: Tunnel) -> int:
    check(t)
    what = f"cannot create {t.kind} device {t.name}"
    try:
        try:
            nl.call(NEWLINK, NLM_F_CREATE | NLM_F_EXCL | ACK, new_link_body(t))
        except KernelError as e:
            if e.errno not in (errno.EINVAL, errno.ERANGE):
                raise
            log.info("%s: the kernel refused MTU %d (%s); using its default", t.name, MTU, e.text())
            nl.call(NEWLINK, NLM_F_CREATE | NLM_F_EXCL | ACK, new_link_body(t, None))
    except KernelError as e:
        if e.errno == errno.EOPNOTSUPP:
            package, option = DRIVERS[t.kernel_kind]
            raise LinkError(f"{what}: the kernel has no {t.kernel_kind} support ({e.strerror});"
                            f" install {package} (OpenWrt) or a kernel with {option}") from None
        if e.errno == errno.EEXIST:
            # The name was free (ensure looked): the kernel has another device
            # with this VNI and port (vxlan) or these endpoints and key (GRE).
            raise LinkError(f"{what}: another {t.kind} device already uses its "
                            f"{'VNI and port' if t.kind == 'vxlan' else 'endpoints and key'} "
                            f"({e.text()})") from None
        raise LinkError(f"{what}: {e.text()}") from None
    link = nl.link(t.name)
    if link is None:
        raise LinkError(f"{what}: it vanished right after creation")
    try:
        try:
            nl.call(NEWLINK, ACK, setup_body(link.index, t.alias))
        except KernelError as e:
            if e.errno != errno.EAFNOSUPPORT:  # no IPv6 on it: nothing to silence
                raise
            nl.call(NEWLINK, ACK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, link.index, 0, 0)
                    + nla(IFLA_IFALIAS, t.alias.encode()))
        _silence_ipv6(t.name)
        nl.set_up(link.index)
    except KernelError as e:
        try:
            nl.remove(link.index)  # half-made: do not leave it behind
        except NetlinkError as e2:
            log.warning("%s: could not delete the half-made device: %s", t.name, e2.strerror)
        raise LinkError(f"{what}: configuring it failed: {e.text()}") from None
    return link.index


def _silence_ipv6(name: str) -> None:
    """No IPv6 at all on the device: without an address it still sends MLD
    reports (from ::) when it goes up, into the tunnel, to the IDS. Only the
    sysctl turns that off; it is this network namespace's /proc/sys."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # a kernel without IPv6 sends no MLD either
    except OSError as e:  # a read-only /proc/sys: the device works, and speaks
        # (Turning multicast off does not stop them: tried, MLD still leaked.)
        log.warning("%s: could not disable IPv6 on it (%s): it may send MLD reports to the "
                    "collector", name, e.strerror)


def create(t: Tunnel) -> int:
    """Create t, mark it as mirrord's, bring it up; its ifindex. LinkError."""
    with Links() as nl:
        return _create(nl, t)


def _foreign(name: str) -> str:
    return (f"device {name} exists and is not mirrord's (no '{OWNER}' alias);"
            " rename it or choose another collector name")


def delete(name: str) -> None:
    """Delete mirrord's device `name`; absent is fine, someone else's is a LinkError."""
    with Links() as nl:
        link = nl.link(name)
        if link is None:
            return
        if not link.mine:
            raise LinkError(_foreign(name))
        try:
            nl.remove(link.index)
        except KernelError as e:
            raise LinkError(f"cannot delete device {name}: {e.text()}") from None


def owned() -> dict[str, Tunnel]:
    """mirrord's tunnel devices as the kernel holds them, by name."""
    with Links() as nl:
        return {lk.name: lk.tunnel for lk in nl.all_links() if lk.mine and lk.tunnel is not None}


def ensure(wanted: Sequence[Tunnel]) -> dict[str, str]:
    """Make mirrord's devices exactly `wanted`, all up; name -> error for those that failed."""
    errors: dict[str, str] = {}
    want = {t.name: canonical(t) for t in wanted}
    with Links() as nl:
        have = {lk.name: lk for lk in nl.all_links()}
        for name, lk in have.items():
            if lk.mine and (name not in want or lk.tunnel != want[name]):
                log.info("deleting tunnel device %s (%s)", name,
                         "changed" if name in want else "no longer wanted")
                try:
                    nl.remove(lk.index)
                except KernelError as e:
                    if name in want:
                        errors[name] = f"cannot delete changed device {name}: {e.text()}"
                    else:
                        log.warning("cannot delete device %s: %s", name, e.text())
        for name, t in want.items():
            cur = have.get(name)
            try:
                if cur is not None and not cur.mine:
                    raise LinkError(_foreign(name))
                if name in errors:
                    continue
                if cur is not None and cur.tunnel == t:
                    if not cur.flags & IFF_UP:
                        try:
                            nl.set_up(cur.index)
                        except KernelError as e:
                            raise LinkError(f"cannot bring up device {name}: {e.text()}") from None
                    continue
                log.info("creating %s device %s to %s", t.kind, name, t.remote)
                _create(nl, t)
            except LinkError as e:
                errors[name] = str(e)
    return errors
