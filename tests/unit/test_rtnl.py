"""The rtnetlink parsers and requests of mirrord.netlink.rtnl, on bytes the kernel sent.

data/rtnl_kernel.txt holds datagrams captured from a real kernel in a
namespace (its header says how); the expected values are what `ip -j` showed
in that namespace. Edge cases the kernel does not send on demand (truncated
attributes, RTA_VIA, unknown operstates) are built here byte by byte from the
uapi layouts, not with the parser's own helpers.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from mirrord.netlink import rtnl, topology

DATA = Path(__file__).parent / "data" / "rtnl_kernel.txt"
IFF_UP = 0x1


def captured() -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for line in DATA.read_text().splitlines():
        if line and not line.startswith("#"):
            name, hexdata = line.split()
            out.setdefault(name, []).append(bytes.fromhex(hexdata))
    return out


def msgs(name: str) -> list[rtnl.Message]:
    return [m for buf in captured()[name] for m in rtnl.messages(buf)]


def ip(text: str) -> rtnl.Ip:
    return ipaddress.ip_address(text)


# -- what the kernel sent -----------------------------------------------------------


def test_link_dump() -> None:
    ms = msgs("link_dump")
    assert [m.type for m in ms] == [rtnl.RTM_NEWLINK] * 4 + [rtnl.NLMSG_DONE]
    assert all(m.seq == 1 and m.flags & rtnl.NLM_F_MULTI for m in ms)
    links = [rtnl.parse_link(m) for m in ms[:4]]
    # ip -j -d link show: ifindex, ifname, link_type, "UP" in flags, mtu, operstate, master, info_kind
    assert [(lk.index, lk.name, lk.arphrd, bool(lk.flags & IFF_UP), lk.mtu, lk.operstate,
             lk.master, lk.kind) for lk in links] == [
        (1, "lo", 772, True, 65536, "UNKNOWN", None, None),
        (2, "br0", 1, True, 1400, "DOWN", None, "bridge"),
        (3, "q0", 1, False, 1500, "DOWN", None, "veth"),
        (4, "p0", 1, True, 1400, "LOWERLAYERDOWN", 2, "veth"),
    ]


class Replay:
    """Answers topology's questions with the captured kernel messages."""

    def links(self) -> list[rtnl.LinkMsg]:
        return [rtnl.parse_link(m) for m in msgs("link_dump") if m.type == rtnl.RTM_NEWLINK]


def test_topology_links_from_the_kernel_dump() -> None:
    links = topology._links(Replay())  # type: ignore[arg-type]
    # Usable = administratively up and operationally UP or UNKNOWN (lo, tun).
    assert {n: lk.up for n, lk in links.items()} == {
        "lo": True, "br0": False, "q0": False, "p0": False}
    assert links["p0"] == topology.Link("p0", 4, False, "veth", 1, 1400, master=2)


@pytest.mark.parametrize(("name", "seq", "rtype", "dst", "oif", "gateway", "prefsrc"), [
    ("route_get_onlink", 2, 1, "192.0.2.20", 2, None, "192.0.2.1"),
    ("route_get_gateway", 3, 1, "198.51.100.7", 2, "192.0.2.9", "192.0.2.1"),
    ("route_get_local", 4, 2, "192.0.2.1", 1, None, "192.0.2.1"),
    ("route_get_gateway6", 5, 1, "2001:db8:4::1", 2, "2001:db8:3::9", "2001:db8:3::1"),
    ("route_get_oif", 7, 1, "192.0.2.20", 1, None, "192.0.2.1"),
])
def test_route_get(name: str, seq: int, rtype: int, dst: str, oif: int,
                   gateway: str | None, prefsrc: str) -> None:
    (m,) = msgs(name)
    # A route get answer is one message, neither multipart nor followed by NLMSG_DONE.
    assert m.type == rtnl.RTM_NEWROUTE and m.seq == seq and not m.flags & rtnl.NLM_F_MULTI
    r = rtnl.parse_route(m)
    assert r == rtnl.RouteMsg(family=socket.AF_INET6 if ":" in dst else socket.AF_INET,
                              type=rtype, table=254, dst=ip(dst), oif=oif,
                              gateway=ip(gateway) if gateway else None, prefsrc=ip(prefsrc))


def test_route_get_unreachable_is_an_error_echoing_the_request() -> None:
    (m,) = msgs("route_get_unreachable6")
    assert m.type == rtnl.NLMSG_ERROR and m.seq == 6
    assert rtnl.error_code(m) == errno.ENETUNREACH
    # The kernel echoes the request it refused: the layout it read is the one built.
    sent = rtnl.route_get_request(6, ip("2001:db8:99::1"))
    assert m.payload[4:] == sent


def test_neighbour_dumps() -> None:
    ms4 = msgs("neigh_dump4")
    assert ms4[-1].type == rtnl.NLMSG_DONE
    got4 = [rtnl.parse_neigh(m) for m in ms4 if m.type == rtnl.RTM_NEWNEIGH]
    assert [(n.family, n.ifindex, topology.NUD_STATES[n.state], str(n.dst), n.lladdr)
            for n in got4] == [
        (socket.AF_INET, 2, "STALE", "192.0.2.21", "02:00:00:00:00:15"),
        (socket.AF_INET, 2, "PERMANENT", "192.0.2.20", "02:00:00:00:00:14"),
        (socket.AF_INET, 2, "NOARP", "224.0.0.22", "01:00:5e:00:00:16"),
    ]
    got6 = [rtnl.parse_neigh(m) for m in msgs("neigh_dump6") if m.type == rtnl.RTM_NEWNEIGH]
    assert (got6[0].family, got6[0].dst, topology.NUD_STATES[got6[0].state]) == (
        socket.AF_INET6, ip("2001:db8:3::20"), "REACHABLE")


# -- built by hand ------------------------------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nlmsg(kind: int, payload: bytes, flags: int = 0, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def test_attrs_mask_flags_and_skip_padding() -> None:
    buf = nla(3, b"eth0\0") + nla(0x8000 | 18, nla(1, b"vlan\0")) + nla(4, struct.pack("=I", 9000))
    a = rtnl.attrs(buf, 0, len(buf))
    assert rtnl.cstr(a[3]) == "eth0" and rtnl.u32(a[4]) == 9000
    assert rtnl.cstr(rtnl.attrs(a[18], 0, len(a[18]))[1]) == "vlan"


def test_attrs_stop_at_a_broken_length() -> None:
    good = nla(3, b"ok\0")
    too_long = struct.pack("=HH", 64, 4) + b"\0" * 4  # claims more than is there
    assert rtnl.attrs(good + too_long, 0, len(good) + 8) == {3: b"ok\0"}
    zero = struct.pack("=HH", 0, 4)  # a zero length would loop forever
    assert rtnl.attrs(good + zero + good, 0, len(good) * 2 + 4) == {3: b"ok\0"}


def test_messages_drop_a_truncated_tail() -> None:
    one = nlmsg(rtnl.NLMSG_DONE, b"\0" * 4)
    assert [m.type for m in rtnl.messages(one + one[:10])] == [rtnl.NLMSG_DONE]
    assert [m.type for m in rtnl.messages(one + one)] == [rtnl.NLMSG_DONE] * 2


def test_route_via_an_ipv6_next_hop() -> None:
    # RFC 5549: an IPv4 route whose gateway is an IPv6 address (struct rtvia).
    rt = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 3, 0, 1, 0)
    via = struct.pack("=H", socket.AF_INET6) + ip("fe80::1").packed
    m = next(rtnl.messages(nlmsg(rtnl.RTM_NEWROUTE, rt + nla(rtnl.RTA_VIA, via)
                                 + nla(rtnl.RTA_OIF, struct.pack("=I", 3)))))
    r = rtnl.parse_route(m)
    assert (r.gateway, r.oif, r.dst) == (ip("fe80::1"), 3, None)


def test_link_with_an_unknown_operstate_and_no_attributes() -> None:
    ifi = struct.pack("=BxHiII", 0, 1, 7, IFF_UP, 0)
    m = next(rtnl.messages(nlmsg(rtnl.RTM_NEWLINK, ifi + nla(rtnl.IFLA_OPERSTATE, b"\x09"))))
    lk = rtnl.parse_link(m)
    assert (lk.index, lk.name, lk.operstate, lk.mtu, lk.master, lk.kind) == (7, "", "9", 0, None, None)


def test_address_message() -> None:
    # ifaddrmsg: family, prefixlen, flags, scope, index; then IFA_LOCAL (2) and IFA_ADDRESS (1).
    ifa = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 5)
    body = ifa + nla(2, ip("2001:db8:1::1").packed) + nla(rtnl.IFA_ADDRESS, ip("2001:db8:1::9").packed)
    a = rtnl.parse_addr(next(rtnl.messages(nlmsg(rtnl.RTM_NEWADDR, body))))
    assert (a.family, a.prefixlen, a.index, a.address) == (socket.AF_INET6, 64, 5, ip("2001:db8:1::9"))
    bare = rtnl.parse_addr(next(rtnl.messages(nlmsg(rtnl.RTM_NEWADDR, ifa))))
    assert bare.address is None
    with pytest.raises(rtnl.ParseError):
        rtnl.parse_addr(next(rtnl.messages(nlmsg(rtnl.RTM_NEWADDR, ifa[:4]))))


def test_address_attributes_of_an_odd_length() -> None:
    assert rtnl.ip_address(b"\x01\x02\x03") is None and rtnl.address(b"\x01\x02\x03") == "?"
    assert rtnl.address(None) == "?" and rtnl.address(ip("192.0.2.1").packed) == "192.0.2.1"
    assert rtnl.u32(b"\x01\x00") is None and rtnl.cstr(None) == "" and rtnl.cstr(b"ab\0cd") == "ab"


@pytest.mark.parametrize("parse", [rtnl.parse_link, rtnl.parse_route, rtnl.parse_neigh])
def test_short_messages_are_refused(parse: object) -> None:
    m = next(rtnl.messages(nlmsg(rtnl.RTM_NEWLINK, b"\0" * 8)))
    with pytest.raises(rtnl.ParseError):
        parse(m)  # type: ignore[operator]


def test_requests_layout() -> None:
    # ip route get 192.0.2.7 oif 3: rtmsg with dst_len 32, RTA_DST, RTA_OIF; no NLM_F_DUMP.
    req = rtnl.route_get_request(5, ip("192.0.2.7"), 3)
    assert req == (struct.pack("=IHHII", 16 + 12 + 8 + 8, 26, 1, 5, 0)
                   + struct.pack("=BBBBBBBBI", 2, 32, 0, 0, 0, 0, 0, 0, 0)
                   + struct.pack("=HH4s", 8, 1, bytes([192, 0, 2, 7]))
                   + struct.pack("=HHI", 8, 4, 3))
    dump = rtnl.neigh_dump_request(9, socket.AF_INET6, 4)
    assert dump == (struct.pack("=IHHII", 16 + 12 + 8, 30, 0x301, 9, 0)
                    + struct.pack("=BBHiHBB", 10, 0, 0, 0, 0, 0, 0)
                    + struct.pack("=HHI", 8, 8, 4))
