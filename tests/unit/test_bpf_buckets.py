"""A group member's TZSP filter (issue 13): the frame's symmetric flow hash
picks its bucket, and exactly one member takes it.

Run here with a classic BPF interpreter (tests/unit/cbpf.py), in every leg;
tests/kernel/test_bpf.py runs the same programs on real packet sockets.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.match import Match, PortRange
from mirrord.plan.groups import BUCKETS, assign
from mirrord.tzsp import bpf, bpf_asm
from mirrord.tzsp.bpf import compile_filter
from tests.unit.cbpf import run

MEMBERS = ("192.0.2.50", "192.0.2.51", "192.0.2.52")
COLLECTOR = ipaddress.ip_address("203.0.113.130")


def l3_v4(src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return hdr + payload


def l3_v6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def ports(sport: int, dport: int) -> bytes:
    return struct.pack("!HH", sport, dport) + b"\0" * 16


def eth(l3: bytes, vlan: Optional[int] = None) -> bytes:
    ethertype = 0x86DD if l3[0] >> 4 == 6 else 0x0800
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return b"\x02" * 6 + b"\x04" * 6 + tag + struct.pack("!H", ethertype) + l3


def udp(src: str, dst: str, sport: int, dport: int, proto: int = 17) -> bytes:
    if ":" in src:
        return eth(l3_v6(src, dst, proto, ports(sport, dport)))
    return eth(l3_v4(src, dst, proto, ports(sport, dport)))


def programs(match: Optional[Match] = None, link: bpf.Link = "ethernet",
             live: tuple[str, ...] = MEMBERS) -> dict[str, list[bpf.Insn]]:
    held = assign(MEMBERS, live)
    return {m: compile_filter(match or Match(), (COLLECTOR,), link=link, buckets=b)
            for m, b in held.items()}


def takers(progs: dict[str, list[bpf.Insn]], frame: bytes, **kw: int) -> list[str]:
    return [m for m, p in progs.items() if run(p, frame, **kw)]


def flow_bucket(src: str, dst: str, sport: Optional[int], dport: Optional[int]) -> int:
    """The hash the program computes, written out (the spec of _Buckets)."""
    words = [int.from_bytes(ipaddress.ip_address(a).packed[i:i + 4], "big")
             for a in (src, dst) for i in range(0, len(ipaddress.ip_address(a).packed), 4)]
    h = 0
    for w in words:
        h ^= w
    if sport is not None and dport is not None:
        h ^= sport ^ dport
    h ^= h >> 16
    return ((h * bpf.GOLDEN) & 0xFFFFFFFF) >> bpf.BUCKET_SHIFT


def test_buckets_agree_with_the_plan() -> None:
    assert bpf.BUCKETS == BUCKETS == 1 << (32 - bpf.BUCKET_SHIFT)


def test_every_frame_to_exactly_one_member_and_both_directions_alike() -> None:
    progs = programs()
    held = assign(MEMBERS, MEMBERS)
    rng = random.Random(7)
    seen = {m: 0 for m in MEMBERS}
    for i in range(600):
        proto = (6, 17, 132)[i % 3]
        v6 = i % 4 == 0
        a = f"2001:db8:1::{rng.randrange(1, 65535):x}" if v6 else f"192.0.2.{rng.randrange(1, 254)}"
        b = f"2001:db8:2::{rng.randrange(1, 65535):x}" if v6 else f"198.51.100.{rng.randrange(1, 254)}"
        sp, dp = rng.randrange(1024, 65535), rng.choice((53, 80, 443, rng.randrange(1, 65535)))
        there, back = udp(a, b, sp, dp, proto), udp(b, a, dp, sp, proto)
        who = takers(progs, there)
        assert len(who) == 1, (a, b, sp, dp, who)
        assert takers(progs, back) == who
        assert flow_bucket(a, b, sp, dp) in held[who[0]]
        seen[who[0]] += 1
    # 64 buckets over 3 members, 600 random flows: each near its share.
    for m, n in seen.items():
        share = 600 * len(held[m]) / BUCKETS
        assert 0.7 * share <= n <= 1.3 * share, (m, n, share)


def test_fragments_and_other_headers_hash_by_addresses_alone() -> None:
    progs = programs()
    a, b = "192.0.2.10", "198.51.100.20"
    first = eth(l3_v4(a, b, 17, ports(4000, 53), frag=0x2000))  # MF
    later = eth(l3_v4(b, a, 17, b"\0" * 24, frag=185))  # an offset, the reply's
    whole = eth(l3_v4(a, b, 1, b"\x08\0" + b"\0" * 30))  # ICMP: no ports
    by_addr = takers(progs, first)
    assert len(by_addr) == 1
    assert takers(progs, later) == takers(progs, whole) == by_addr
    held = assign(MEMBERS, MEMBERS)
    assert flow_bucket(a, b, None, None) in held[by_addr[0]]
    # IPv6: a fragment header (44) or ICMPv6 (58) before the ports: addresses only.
    a6, b6 = "2001:db8:1::10", "2001:db8:2::20"
    frag6 = eth(l3_v6(a6, b6, 44, bytes([17, 0, 0, 1, 0, 0, 0, 9]) + ports(1, 2)))
    icmp6 = eth(l3_v6(b6, a6, 58, b"\x80\0" + b"\0" * 30))
    assert takers(progs, frag6) == takers(progs, icmp6)
    assert flow_bucket(a6, b6, None, None) in held[takers(progs, frag6)[0]]


def test_non_ip_frames_go_to_the_member_of_bucket_0() -> None:
    held = assign(MEMBERS, MEMBERS)
    arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + b"\0" * 28
    owner = next(m for m, b in held.items() if 0 in b)
    assert takers(programs(), arp) == [owner]
    # A match on IP traffic takes no ARP at all, in any member.
    assert takers(programs(Match(family="ipv4")), arp) == []


def test_tags_and_raw_links_do_not_move_a_flow() -> None:
    eth_progs, raw_progs = programs(), programs(link="raw")
    for i in range(100):
        a, b = f"192.0.2.{i + 1}", f"198.51.100.{200 - i}"
        l3 = l3_v4(a, b, 6, ports(30000 + i, 443))
        who = takers(eth_progs, eth(l3))
        assert takers(eth_progs, eth(l3, vlan=10)) == who
        assert takers(raw_progs, l3, protocol=0x0800) == who


def test_the_match_still_decides_first() -> None:
    progs = programs(Match(protocols=(17,), dports=(PortRange(53, 53),)))
    for i in range(50):
        a, b = f"192.0.2.{i + 1}", "198.51.100.53"
        assert len(takers(progs, udp(a, b, 5000 + i, 53))) == 1
        assert takers(progs, udp(a, b, 5000 + i, 54)) == []
        assert takers(progs, udp(a, str(COLLECTOR), 5000 + i, 53)) == []  # never a collector


def test_a_dead_member_takes_nothing_and_only_its_flows_move() -> None:
    everyone, without_b = programs(), programs(live=("192.0.2.50", "192.0.2.52"))
    assert compile_filter(Match(), buckets=()) == [(bpf_asm.RET, 0, 0, 0)]
    rng = random.Random(3)
    for _ in range(300):
        a, b = f"192.0.2.{rng.randrange(1, 254)}", f"198.51.100.{rng.randrange(1, 254)}"
        frame = udp(a, b, rng.randrange(1, 65535), rng.randrange(1, 65535))
        before, after = takers(everyone, frame), takers(without_b, frame)
        assert len(after) == 1 and after != ["192.0.2.51"]
        if before != ["192.0.2.51"]:
            assert after == before


def test_a_member_holding_every_bucket_gets_the_plain_filter() -> None:
    assert compile_filter(Match(), buckets=range(BUCKETS)) == compile_filter(Match())


@settings(max_examples=300, deadline=None)
@given(a=st.integers(0, 2**32 - 1), b=st.integers(0, 2**32 - 1), sp=st.integers(0, 65535),
       dp=st.integers(0, 65535), proto=st.sampled_from((6, 17, 33, 132, 136)),
       v6=st.booleans(), tail=st.binary(max_size=8))
def test_hash_is_the_written_one_and_symmetric(a: int, b: int, sp: int, dp: int, proto: int,
                                                v6: bool, tail: bytes) -> None:
    if v6:
        sa = str(ipaddress.IPv6Address((0x20010DB8 << 96) | a))
        sb = str(ipaddress.IPv6Address((0x20010DB8 << 96) | (b << 64)))
    else:
        sa, sb = str(ipaddress.IPv4Address(a)), str(ipaddress.IPv4Address(b))
    want = flow_bucket(sa, sb, sp, dp)
    assert flow_bucket(sb, sa, dp, sp) == want
    one = compile_filter(Match(), buckets=(want,))
    for frame in (udp(sa, sb, sp, dp, proto), udp(sb, sa, dp, sp, proto)):
        assert run(one, frame + tail) > 0
    others = compile_filter(Match(), buckets=[x for x in range(BUCKETS) if x != want])
    assert run(others, udp(sa, sb, sp, dp, proto)) == 0


@pytest.mark.parametrize("directions", [("in",), ("out",), ("in", "out")])
def test_directions_still_hold(directions: tuple[str, ...]) -> None:
    prog = compile_filter(Match(), directions=directions, buckets=range(0, BUCKETS, 2))
    frames = [udp("192.0.2.1", "198.51.100.1", s, 80) for s in range(1000, 1040)]
    for pkttype, way in ((0, "in"), (4, "out")):
        got = [run(prog, f, pkttype=pkttype) > 0 for f in frames]
        assert any(got) == (way in directions)
