"""links.py's messages: the attribute bytes it sends for each tunnel kind, and the parse back.

The expected bytes are written out by hand from include/uapi/linux/if_link.h and
the kernel's validators (vxlan_policy, erspan_validate): attribute headers and
u32 ids in host order, IFLA_VXLAN_PORT, GRE keys and flags big-endian.
"""

from __future__ import annotations

import ipaddress
import sys

import pytest

from mirrord.netlink import links
from mirrord.netlink.links import LinkError, Tunnel

V4 = ipaddress.ip_address("192.0.2.10")
V6 = ipaddress.ip_address("2001:db8::10")
V4_BYTES = bytes([192, 0, 2, 10])
V6_BYTES = bytes([0x20, 0x01, 0x0D, 0xB8] + [0] * 11 + [0x10])


def h16(x: int) -> bytes:
    return x.to_bytes(2, sys.byteorder)


def h32(x: int) -> bytes:
    return x.to_bytes(4, sys.byteorder)


def split(buf: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each attribute, checking lengths and the 4-byte padding."""
    out = []
    pos = 0
    while pos < len(buf):
        length = int.from_bytes(buf[pos:pos + 2], sys.byteorder)
        kind = int.from_bytes(buf[pos + 2:pos + 4], sys.byteorder)
        assert length >= 4 and pos + length <= len(buf)
        out.append((kind, buf[pos + 4:pos + length]))
        padded = (length + 3) // 4 * 4
        assert buf[pos + length:pos + padded] == b"\0" * (padded - length)
        pos += padded
    assert pos == len(buf)
    return out


def test_vxlan_v4_attributes() -> None:
    got = split(links.info_data(Tunnel("mvx-ids", "vxlan", V4, vni=0x123456, port=4789)))
    assert sorted(got) == sorted([
        (1, h32(0x123456)),  # IFLA_VXLAN_ID, host order
        (2, V4_BYTES),  # IFLA_VXLAN_GROUP: the unicast remote
        (15, b"\x12\xb5"),  # IFLA_VXLAN_PORT 4789, big-endian
        (7, b"\x00"),  # IFLA_VXLAN_LEARNING off
        (5, b"\x40"),  # IFLA_VXLAN_TTL 64
        (29, b"\x00"),  # IFLA_VXLAN_DF unset
    ])


def test_vxlan_v6_attributes_use_group6_and_send_the_port() -> None:
    got = dict(split(links.info_data(Tunnel("mvx6", "vxlan", V6, vni=7, port=8472 + 1))))
    assert got[16] == V6_BYTES  # IFLA_VXLAN_GROUP6
    assert 2 not in got
    assert got[15] == b"\x21\x19"  # 8473 big-endian
    assert got[1] == h32(7)


def test_gretap_attributes() -> None:
    got = split(links.info_data(Tunnel("mgt", "gretap", V4)))
    assert sorted(got) == sorted([
        (7, V4_BYTES),  # IFLA_GRE_REMOTE
        (8, b"\x40"),  # IFLA_GRE_TTL 64
        (10, b"\x00"),  # IFLA_GRE_PMTUDISC off: outer DF clear
    ])


def test_erspan_attributes_keys_and_flags_big_endian() -> None:
    got = split(links.info_data(Tunnel("mes", "erspan", V4, session=677)))
    assert sorted(got) == sorted([
        (7, V4_BYTES),
        (8, b"\x40"),
        (10, b"\x00"),
        (2, b"\x30\x00"),  # IFLA_GRE_IFLAGS = GRE_SEQ | GRE_KEY, be16
        (3, b"\x30\x00"),  # IFLA_GRE_OFLAGS
        (4, b"\x00\x00\x02\xa5"),  # IFLA_GRE_IKEY = session 677, be32
        (5, b"\x00\x00\x02\xa5"),  # IFLA_GRE_OKEY
        (22, b"\x01"),  # IFLA_GRE_ERSPAN_VER 1 (type II)
        (21, h32(0)),  # IFLA_GRE_ERSPAN_INDEX
    ])


def test_ip6erspan_remote_is_16_bytes_without_pmtudisc() -> None:
    t = Tunnel("mes6", "erspan", V6, session=1023)
    got = dict(split(links.info_data(t)))
    assert got[7] == V6_BYTES
    assert got[5] == b"\x00\x00\x03\xff"
    assert 10 not in got  # IPv4-only knob; ip6gre has no DF to clear
    assert t.kernel_kind == "ip6erspan"
    assert Tunnel("g6", "gretap", V6).kernel_kind == "ip6gretap"


def test_new_link_message_layout() -> None:
    body = links.new_link_body(Tunnel("mvx-ids", "vxlan", V4, vni=5))
    assert body[:16] == bytes(16)  # ifinfomsg: AF_UNSPEC, index 0, flags 0 (down until set up)
    attrs = dict(split(body[16:]))
    assert attrs[3] == b"mvx-ids\0"  # IFLA_IFNAME
    assert attrs[4] == h32(65535)  # IFLA_MTU: whole frames fit
    info = dict(split(attrs[0x8000 | 18]))  # IFLA_LINKINFO, nested
    assert info[1] == b"vxlan\0"
    assert dict(split(info[0x8000 | 2]))[1] == h32(5)
    assert 4 not in dict(split(links.new_link_body(Tunnel("x", "vxlan", V4), mtu=None)[16:]))


def test_setup_message_marks_the_owner_and_turns_off_ipv6_addresses() -> None:
    body = links.setup_body(9, "mirrord ids")
    assert body[4:8] == h32(9)  # ifi_index
    attrs = dict(split(body[16:]))
    assert attrs[20] == b"mirrord ids"  # IFLA_IFALIAS
    af = dict(split(attrs[0x8000 | 26]))  # IFLA_AF_SPEC
    assert dict(split(af[0x8000 | 10])) == {8: b"\x01"}  # AF_INET6: ADDR_GEN_MODE_NONE


def linkinfo(kind: str, data: list[tuple[int, bytes]]) -> bytes:
    def a(t: int, p: bytes) -> bytes:
        return h16(4 + len(p)) + h16(t) + p + b"\0" * (-len(p) % 4)
    return a(1, kind.encode() + b"\0") + a(2, b"".join(a(t, p) for t, p in data))


def test_parse_vxlan_back() -> None:
    info = linkinfo("vxlan", [(1, h32(4242)), (2, V4_BYTES), (15, b"\x12\xb6"), (7, b"\0")])
    assert links.parse_tunnel("mvx-ids", "mirrord ids", info) == Tunnel(
        "mvx-ids", "vxlan", V4, vni=4242, port=4790, owner="ids")
    info6 = linkinfo("vxlan", [(1, h32(1)), (16, V6_BYTES), (15, b"\x12\xb5")])
    assert links.parse_tunnel("v", "mirrord", info6) == Tunnel("v", "vxlan", V6, vni=1)


def test_parse_gre_kinds_back() -> None:
    assert links.parse_tunnel("g", "mirrord c", linkinfo("gretap", [(7, V4_BYTES), (8, b"\x40")])) \
        == Tunnel("g", "gretap", V4, owner="c")
    es = linkinfo("ip6erspan", [(7, V6_BYTES), (5, b"\x00\x00\x02\xa5"), (4, b"\x00\x00\x02\xa5")])
    assert links.parse_tunnel("e", "mirrord", es) == Tunnel("e", "erspan", V6, session=677)


def test_parse_other_links_is_none() -> None:
    assert links.parse_tunnel("v", "mirrord", linkinfo("veth", [])) is None
    assert links.parse_tunnel("v", "mirrord", linkinfo("vxlan", [(1, h32(1))])) is None  # no remote


def test_canonical_resets_fields_the_kind_ignores() -> None:
    t = Tunnel("g", "gretap", V4, vni=9, port=1, session=3, owner="c")
    assert links.canonical(t) == Tunnel("g", "gretap", V4, owner="c")
    e = Tunnel("e", "erspan", V4, vni=9, session=3)
    assert links.canonical(e) == Tunnel("e", "erspan", V4, session=3)


@pytest.mark.parametrize(("t", "text"), [
    (Tunnel("a-very-long-name", "vxlan", V4), "bad tunnel device name"),
    (Tunnel("a b", "vxlan", V4), "bad tunnel device name"),
    (Tunnel("v", "vxlan", V4, vni=1 << 24), "vxlan id 16777216 is out of range"),
    (Tunnel("v", "vxlan", V4, port=0), "vxlan port 0 is out of range"),
    (Tunnel("e", "erspan", V4, session=1024), "erspan session 1024 is out of range 0..1023"),
    (Tunnel("g", "gretap", ipaddress.ip_address("0.0.0.0")), "not a unicast address"),
])
def test_check_refuses_what_the_kernel_would(t: Tunnel, text: str) -> None:
    with pytest.raises(LinkError, match=text):
        links.check(t)


def test_only_mirrords_exact_mark_on_a_tunnel_is_mine() -> None:
    """A VLAN or veth someone labelled "mirrord-ids port" is never deleted."""
    import ipaddress

    from mirrord.netlink.links import Link, Tunnel

    t = Tunnel("mvx-ids", "vxlan", ipaddress.ip_address("192.0.2.10"), owner="ids")
    assert Link(5, "mvx-ids", 0, "mirrord ids", t).mine
    assert Link(5, "mvx-ids", 0, "mirrord", t).mine
    assert not Link(5, "mvx-ids", 0, "mirrord-ids port", t).mine
    assert not Link(5, "lan1.5", 0, "mirrord ids", None).mine
