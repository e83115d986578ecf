"""`mirrord trace` without a kernel: the NFT_MSG_TRACE parser, grouping, rendering.

Trace messages are built here byte by byte from the layout in
include/uapi/linux/netfilter/nf_tables.h and net/netfilter/nf_tables_trace.c
(nlmsghdr in host order; nfgenmsg; attributes big endian except NFTA_TRACE_ID,
which the kernel writes with nla_put_u32 in host order), not with the parser's
own helpers.
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from mirrord.match import Match, PortRange
from mirrord.netlink import nftrace
from mirrord.netlink.nftrace import Overrun, TraceParseError, parse_datagram, parse_trace
from mirrord.observe.trace.events import Tracker
from mirrord.observe.trace.headers import copy_key, decode_headers, nat_key
from mirrord.observe.trace.render import packet_json, packet_text
from mirrord.observe.trace.rulebook import MirrorHit, RuleBook, RuleInfo, mirror_hit, rules_from_text
from mirrord.observe.trace.selection import Selection, TraceError, match_from_options
from mirrord.observe.trace.table import (
    create_commands,
    owner_alive,
    ssh_exclusions,
    ssh_flow,
    stale_owner,
    trace_rules,
)

# -- building messages as the kernel does ------------------------------------------
FAMILY_INET, FAMILY_IP, FAMILY_IP6 = 1, 2, 10
T_POLICY, T_RETURN, T_RULE = 1, 2, 3
NLMSG_OVERRUN = 4
MSG_TRACE = (10 << 8) | 17
MSG_NEWGEN = (10 << 8) | 15


def nla(atype: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    flags = 0x8000 if nested else 0
    return struct.pack("=HH", length, atype | flags) + payload + b"\0" * (-length % 4)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def verdict(code: int, chain: Optional[str] = None) -> bytes:
    body = nla(1, struct.pack(">i", code))
    if chain:
        body += nla(2, chain.encode() + b"\0")
    return nla(5, body, nested=True)


def trace_msg(
    trace_id: int, ttype: int, table: str, chain: str, family: int = FAMILY_IP,
    handle: Optional[int] = None, verdict_attr: bytes = b"", policy: Optional[int] = None,
    iif: Optional[int] = None, oif: Optional[int] = None, network: Optional[bytes] = None,
    transport: Optional[bytes] = None, nfproto: int = 2, mark: Optional[int] = None,
    extra: bytes = b"",
) -> bytes:
    # Attribute order as nft_trace_notify emits them.
    attrs = nla(15, be32(nfproto)) + nla(4, be32(ttype))
    attrs += nla(6, struct.pack("=I", trace_id))  # nla_put_u32: host order
    attrs += nla(2, chain.encode() + b"\0") + nla(1, table.encode() + b"\0")
    if handle is not None:
        attrs += nla(3, struct.pack(">Q", handle))
    attrs += verdict_attr
    if policy is not None:
        attrs += nla(16, be32(policy))
    if mark is not None:
        attrs += nla(14, be32(mark))
    if iif is not None:
        attrs += nla(10, be32(iif)) + nla(11, struct.pack(">H", 1))
    if oif is not None:
        attrs += nla(12, be32(oif)) + nla(13, struct.pack(">H", 1))
    if network is not None:
        attrs += nla(8, network)
    if transport is not None:
        attrs += nla(9, transport)
    attrs += extra
    payload = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(payload), MSG_TRACE, 0, 0, 0) + payload


def kernel_id(trace_id: int) -> int:
    """The id as libnftnl (and so `nft monitor trace`) shows it: ntohl of the host u32."""
    return int.from_bytes(struct.pack("=I", trace_id), "big")


def ipv4_icmp(src: str, dst: str, ttl: int, ip_id: int, seq: int, df: bool = True,
              csum: int = 0x1234) -> tuple[bytes, bytes]:
    net = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 84, ip_id, 0x4000 if df else 0, ttl, 1, csum,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    th = struct.pack(">BBHHH", 8, 0, 0xABCD, 0x28A5, seq) + b"\0" * 12
    return net, th


# -- the parser --------------------------------------------------------------------
def test_rule_event_attributes() -> None:
    net, th = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0x1D35, 1)
    raw = trace_msg(0x12345678, T_RULE, "mirrord", "in_br-lan", handle=11,
                    verdict_attr=verdict(-1), iif=4, network=net, transport=th, mark=0x10)
    (e,) = parse_datagram(raw)
    assert e.family_name == "ip"
    assert e.trace_id == kernel_id(0x12345678)
    assert (e.type_name, e.table, e.chain, e.rule_handle) == ("rule", "mirrord", "in_br-lan", 11)
    assert e.verdict is not None and e.verdict.name == "continue"
    assert (e.iif, e.iiftype, e.oif, e.nfproto, e.mark) == (4, 1, None, 2, 0x10)
    assert e.network_header == net and e.transport_header == th
    assert e.has_packet


def test_verdicts_and_policy() -> None:
    raw = b"".join([
        trace_msg(1, T_RULE, "fw4", "prerouting", handle=3, verdict_attr=verdict(-3, "pre_lan")),
        trace_msg(1, T_RULE, "fw4", "forward", handle=4, verdict_attr=verdict(-4, "fwd_wan")),
        trace_msg(1, T_RULE, "fw4", "input", handle=5, verdict_attr=verdict(0)),
        trace_msg(1, T_RULE, "fw4", "input", handle=6, verdict_attr=verdict((7 << 16) | 3)),
        trace_msg(1, T_RETURN, "fw4", "pre_lan", verdict_attr=verdict(-1)),
        trace_msg(1, T_POLICY, "fw4", "input", policy=0),
        trace_msg(1, T_POLICY, "fw4", "output", policy=1),
    ])
    events = parse_datagram(raw)
    assert [e.verdict.name if e.verdict else e.policy_name for e in events] == [
        "jump pre_lan", "goto fwd_wan", "drop", "queue num 7", "continue", "drop", "accept"]
    assert [e.type_name for e in events] == ["rule"] * 4 + ["return", "policy", "policy"]
    assert events[4].rule_handle is None


def test_conntrack_and_unknown_attributes() -> None:
    extra = (nla(21, be32(8)) + nla(19, b"\x00") + nla(18, be32(77)) + nla(20, be32(0x188))
             + nla(30, b"future"))
    (e,) = parse_datagram(trace_msg(9, T_POLICY, "t", "c", policy=1, extra=extra))
    assert (e.ct_state, e.ct_direction, e.ct_id, e.ct_status) == (8, 0, 77, 0x188)
    assert e.unknown == (30,)


def test_non_trace_messages_are_skipped_and_overrun_is_reported() -> None:
    newgen = struct.pack("=IHHII", 16 + 4 + 8, MSG_NEWGEN, 0, 0, 0) + struct.pack(
        "=BBH", 0, 0, 0) + nla(1, be32(5))
    raw = newgen + trace_msg(5, T_POLICY, "t", "c", policy=1)
    assert [e.trace_id for e in parse_datagram(raw)] == [kernel_id(5)]
    with pytest.raises(Overrun):
        parse_datagram(struct.pack("=IHHII", 16, NLMSG_OVERRUN, 0, 0, 0))


def test_malformed_messages_are_refused() -> None:
    good = trace_msg(5, T_POLICY, "t", "c", policy=1)
    with pytest.raises(TraceParseError):
        parse_datagram(good[:-4])  # the message says it is longer than what arrived
    payload = struct.pack("=BBH", 2, 0, 0) + nla(4, be32(1))  # no NFTA_TRACE_ID
    with pytest.raises(TraceParseError):
        parse_trace(payload)
    bad_len = struct.pack("=BBH", 2, 0, 0) + struct.pack("=HH", 40, 6) + b"\0" * 4
    with pytest.raises(TraceParseError):
        parse_trace(bad_len)
    with pytest.raises(TraceParseError):
        parse_trace(struct.pack("=BBH", 2, 0, 0) + nla(6, b"\0" * 4) + nla(4, b"\0\0"))


def test_table_events() -> None:
    name = nla(1, b"mirrord_trace\0")
    assert nftrace.parse_table_event(0, struct.pack("=BBH", 1, 0, 0) + name) == (
        "new", "inet", "mirrord_trace")
    assert nftrace.parse_table_event(2, struct.pack("=BBH", 10, 0, 0) + nla(1, b"mirrord\0")) \
        == ("del", "ip6", "mirrord")


# -- rules as nft prints them ---------------------------------------------------------
LISTING = """table ip mirrord { # handle 1
\tcounter lan-icmp.in { # handle 3
\t}

\tchain prerouting { # handle 1
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tiifname vmap { "br-lan" : jump in_br-lan } # handle 10
\t}

\tchain "in_br-lan" { # handle 2
\t\tcomment "per interface"
\t\tip saddr { 192.0.2.0/25, 192.0.2.128/26, 198.51.100.0/24,
\t\t\t     203.0.113.0/24 } counter name "lan-icmp.in" dup to 203.0.113.10 """ \
    """comment "mirrord lan-icmp in" # handle 11
\t\tjump foo # handle 12
\t}
}
"""


def test_rules_from_text() -> None:
    rules = rules_from_text(LISTING)
    assert rules == {
        ("prerouting", 10): 'iifname vmap { "br-lan" : jump in_br-lan }',
        ("in_br-lan", 11): 'ip saddr { 192.0.2.0/25, 192.0.2.128/26, 198.51.100.0/24, '
                           '203.0.113.0/24 } counter name "lan-icmp.in" dup to 203.0.113.10 '
                           'comment "mirrord lan-icmp in"',
        ("in_br-lan", 12): "jump foo",
    }


def test_mirror_hit_from_rule_json() -> None:
    rule = {"family": "ip", "table": "mirrord", "chain": "in_br-lan", "handle": 5,
            "comment": "mirrord lan-dns in",
            "expr": [{"counter": "lan-dns.in"}, {"dup": {"addr": "192.0.2.50", "dev": "col"}}]}
    hit = mirror_hit(rule)
    assert hit == MirrorHit("lan-dns", "in", "192.0.2.50", "col")
    assert hit.text() == "mirror lan-dns in: copied to 192.0.2.50 via col"
    assert mirror_hit({**rule, "comment": "someone else's"}) is None
    no_dev = mirror_hit({**rule, "expr": [{"dup": {"addr": "2001:db8:3::10"}}]})
    assert no_dev is not None and no_dev.text() == "mirror lan-dns in: copied to 2001:db8:3::10"


# -- headers ------------------------------------------------------------------------
def _kernel_copy(pkt: bytes, l4_offset: int) -> tuple[bytes, bytes]:
    """What nf_trace_fill_pkt_info copies: up to 40 bytes of network, 20 of transport."""
    return pkt[:min(l4_offset, 40)], pkt[l4_offset:l4_offset + 20]


def test_decode_ipv4_protocols() -> None:
    from scapy.layers.inet import ICMP, IP, TCP, UDP

    p = bytes(IP(src="192.0.2.10", dst="198.51.100.10", ttl=61) / UDP(sport=40000, dport=53)
              / (b"x" * 30))
    h = decode_headers(*_kernel_copy(p, 20))
    assert h is not None
    assert h.text() == "192.0.2.10:40000 > 198.51.100.10:53 UDP len=58 ttl=61"
    p = bytes(IP(src="192.0.2.10", dst="198.51.100.10") / TCP(sport=1234, dport=443, flags="S",
                                                             seq=1000))
    h = decode_headers(*_kernel_copy(p, 20))
    assert h is not None and h.info == "[S] seq=1000" and (h.sport, h.dport) == (1234, 443)
    p = bytes(IP(src="192.0.2.10", dst="198.51.100.10") / ICMP(type=8, id=7, seq=3) / b"abcd")
    h = decode_headers(*_kernel_copy(p, 20))
    assert h is not None
    assert h.endpoints() == "192.0.2.10 > 198.51.100.10"
    assert h.protocol == "icmp" and h.info == "echo-request id=7 seq=3"


def test_decode_ipv4_with_options_longer_than_the_copy() -> None:
    from scapy.layers.inet import IP, UDP, IPOption_NOP

    p = bytes(IP(src="192.0.2.1", dst="192.0.2.2", options=[IPOption_NOP()] * 24)
              / UDP(sport=5, dport=6))
    net, th = _kernel_copy(p, 44)
    assert len(net) == 40
    h = decode_headers(net, th)
    assert h is not None and (h.src, h.dst, h.sport, h.dport) == ("192.0.2.1", "192.0.2.2", 5, 6)


def test_decode_ipv6() -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrHopByHop

    p = bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:2::10", hlim=63)
              / UDP(sport=40000, dport=53) / b"q")
    h = decode_headers(*_kernel_copy(p, 40))
    assert h is not None
    assert h.text() == "[2001:db8:1::10]:40000 > [2001:db8:2::10]:53 UDP len=49 hlim=63"
    p = bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:2::10") / ICMPv6EchoRequest(id=9, seq=2))
    h = decode_headers(*_kernel_copy(p, 40))
    assert h is not None and h.protocol == "icmpv6" and h.info == "echo-request id=9 seq=2"
    p = bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:2::10") / IPv6ExtHdrHopByHop()
              / UDP(sport=1, dport=2))
    h = decode_headers(*_kernel_copy(p, 48))
    # Only 40 bytes of network header are copied: what follows an extension
    # header is out of sight, and no port is guessed.
    assert h is not None and (h.protocol, h.sport, h.dport) == ("hop-by-hop-ext", None, None)


def test_decode_agrees_with_scapys_dissection() -> None:
    """The decoder is plain struct code (routers have no scapy); scapy is the reference."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP, icmptypes
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6, icmp6types

    v4 = IP(src="192.0.2.10", dst="198.51.100.10", ttl=9)
    v6 = IPv6(src="2001:db8:1::10", dst="2001:db8:2::10", hlim=9)
    for flags in ("S", "SA", "PA", "FA", "R", "FPAUECN"):
        for ip, off in ((v4, 20), (v6, 40)):
            pkt = ip / TCP(sport=1, dport=2, flags=flags, seq=77, ack=88)
            h = decode_headers(*_kernel_copy(bytes(pkt), off))
            tcp = pkt[TCP]
            want = f"[{tcp.flags}] seq=77" + (" ack=88" if tcp.flags.A else "")
            assert h is not None and h.info == want and (h.sport, h.dport) == (1, 2)
    for t in (*sorted(icmptypes), 77):
        pkt = v4 / ICMP(type=t, id=5, seq=6)
        h = decode_headers(*_kernel_copy(bytes(pkt), 20))
        want = pkt[ICMP].sprintf("%ICMP.type%") + (" id=5 seq=6" if t in (0, 8) else "")
        assert h is not None and h.info == want, t
    for pkt6 in (v6 / ICMPv6EchoReply(id=5, seq=6), v6 / ICMPv6ND_NS(tgt="2001:db8::1"),
                 v6 / ICMPv6PacketTooBig()):
        raw6 = bytes(pkt6)
        h = decode_headers(*_kernel_copy(raw6, 40))
        name = icmp6types[raw6[40]].lower().replace(" ", "-")
        assert h is not None and h.info == name + (" id=5 seq=6" if raw6[40] == 129 else "")
    frag = bytes(IP(src="192.0.2.1", dst="192.0.2.2", frag=3) / UDP(sport=1, dport=2))
    h = decode_headers(*_kernel_copy(frag, 20))
    assert h is not None and h.info == "fragment offset=24" and h.sport is None
    p = bytes(v4 / UDP(sport=1, dport=2))
    h = decode_headers(*_kernel_copy(p, 20))
    assert h is not None and (h.src, h.dst, h.protocol, h.sport, h.dport, h.length, h.ttl) == (
        "192.0.2.10", "198.51.100.10", "udp", 1, 2, 28, 9)


def test_decode_does_not_import_scapy() -> None:
    code = ("import sys\nfrom mirrord.observe.trace.headers import decode_headers\n"
            "decode_headers(bytes.fromhex('450000540001000040010000c000020ac6336410'), bytes(8))\n"
            "print('scapy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "False", out.stderr


def test_copy_and_nat_keys() -> None:
    orig, th = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0x1D35, 1, df=False, csum=1)
    clone, _ = ipv4_icmp("192.0.2.10", "198.51.100.10", 63, 0x1D35, 1, df=True, csum=2)
    other, _ = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0x1D36, 1)
    assert copy_key(orig, th) == copy_key(clone, th)
    assert copy_key(orig, th) != copy_key(other, th)
    natted, _ = ipv4_icmp("203.0.113.7", "198.51.100.10", 63, 0x1D35, 1)
    assert nat_key(orig) == nat_key(natted) and nat_key(orig) != nat_key(other)
    zero, _ = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0, 1)
    assert nat_key(zero) is None


# -- grouping -------------------------------------------------------------------------
class FakeBook(RuleBook):
    """Rule lookups answered from a listing and rule JSON given by the test."""

    def __init__(self, rules: dict[tuple[str, str, str, int], RuleInfo]) -> None:
        super().__init__(None)
        self.rules = rules
        self.lookups: list[tuple[str, str, str, int]] = []

    def lookup(self, family: str, table: str, chain: str, handle: int) -> RuleInfo:
        self.lookups.append((family, table, chain, handle))
        return self.rules.get((family, table, chain, handle), RuleInfo(None))


DUP_IN = RuleInfo("... dup to 203.0.113.10", MirrorHit("lan-icmp", "in", "203.0.113.10"))
DUP_OUT = RuleInfo("... dup to 203.0.113.10", MirrorHit("lan-icmp", "out", "203.0.113.10"))
VMAP = RuleInfo('iifname vmap { "br-lan" : jump in_br-lan }')


def recorded_ping() -> bytes:
    """A forwarded echo request and its reply, mirrored both ways, in the order
    Linux 6.18 sent them (recorded in the lab, rebuilt here): the request's clone
    shows up between the jump and the dup rule, and the request reaches
    postrouting under a new trace id."""
    req, rth = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0xA41B, 1)
    req63, _ = ipv4_icmp("192.0.2.10", "198.51.100.10", 63, 0xA41B, 1)
    rep, pth = ipv4_icmp("198.51.100.10", "192.0.2.10", 64, 0x6F25, 1, df=False)
    rep63, _ = ipv4_icmp("198.51.100.10", "192.0.2.10", 63, 0x6F25, 1, df=False)
    rep63c, _ = ipv4_icmp("198.51.100.10", "192.0.2.10", 63, 0x6F25, 1, df=True)
    a, clone_a, a2, b, clone_b = 0x9974A3B8, 0x88B27FEB, 0x26C5BC8A, 0x67EB6D22, 0x22DEDD3A
    m = trace_msg
    own = {"family": FAMILY_INET, "table": "mirrord_trace"}
    return b"".join([
        m(a, T_RULE, chain="pre", handle=3, verdict_attr=verdict(-1), iif=4, network=req,
          transport=rth, **own),
        m(a, T_RULE, chain="pre", verdict_attr=verdict(-1), **own),
        m(a, T_POLICY, chain="pre", policy=1, **own),
        m(a, T_RULE, "mirrord", "prerouting", handle=10, verdict_attr=verdict(-3, "in_br-lan"),
          iif=4, network=req, transport=rth),
        m(clone_a, T_RULE, chain="out", handle=4, verdict_attr=verdict(-1), oif=5,
          network=req63, transport=rth, **own),
        m(clone_a, T_POLICY, chain="out", policy=1, **own),
        m(clone_a, T_RULE, "mirrord", "postrouting", verdict_attr=verdict(-1), iif=5, oif=5,
          network=req63, transport=rth),
        m(clone_a, T_POLICY, "mirrord", "postrouting", policy=1),
        m(a, T_RULE, "mirrord", "in_br-lan", handle=11, verdict_attr=verdict(-1)),
        m(a, T_RULE, "mirrord", "in_br-lan", verdict_attr=verdict(-1)),
        m(a, T_POLICY, "mirrord", "prerouting", policy=1),
        m(a2, T_RULE, "mirrord", "postrouting", verdict_attr=verdict(-1), iif=4, oif=3,
          network=req63, transport=rth),
        m(a2, T_POLICY, "mirrord", "postrouting", policy=1),
        m(b, T_RULE, chain="pre", handle=3, verdict_attr=verdict(-1), iif=3, network=rep,
          transport=pth, **own),
        m(b, T_POLICY, chain="pre", policy=1, **own),
        m(b, T_POLICY, "mirrord", "prerouting", policy=1, iif=3, network=rep, transport=pth),
        m(b, T_RULE, "mirrord", "postrouting", handle=8, verdict_attr=verdict(-3, "out_br-lan"),
          iif=3, oif=4, network=rep63, transport=pth),
        m(clone_b, T_RULE, chain="out", handle=4, verdict_attr=verdict(-1), oif=5,
          network=rep63c, transport=pth, **own),
        m(clone_b, T_POLICY, chain="out", policy=1, **own),
        m(clone_b, T_POLICY, "mirrord", "postrouting", policy=1, iif=5, oif=5, network=rep63c,
          transport=pth),
        m(b, T_RULE, "mirrord", "out_br-lan", handle=12, verdict_attr=verdict(-1)),
        m(b, T_POLICY, "mirrord", "postrouting", policy=1),
    ])


def book() -> FakeBook:
    return FakeBook({("ip", "mirrord", "prerouting", 10): VMAP,
                     ("ip", "mirrord", "in_br-lan", 11): DUP_IN,
                     ("ip", "mirrord", "out_br-lan", 12): DUP_OUT})


def test_tracker_groups_a_mirrored_ping() -> None:
    rules = book()
    tracker = Tracker(rules)
    for i, e in enumerate(parse_datagram(recorded_ping())):
        tracker.add(e, now=100.0 + i * 1e-5, wall=0.0)
    assert tracker.ready(100.01) == []  # still inside the hold time
    packets = tracker.ready(101.0)
    assert len(packets) == 2
    req, rep = packets
    assert [m.direction for m in req.mirrors] == ["in"]
    assert [m.direction for m in rep.mirrors] == ["out"]
    assert req.trace_ids == [kernel_id(0x9974A3B8), kernel_id(0x26C5BC8A)]
    assert (req.iif, req.oif, rep.iif, rep.oif) == (4, 3, 3, 4)
    assert req.headers is not None and req.headers.info == "echo-request id=10405 seq=1"
    dup_steps = [s for s in req.steps if s.rule is DUP_IN]
    assert len(dup_steps) == 1 and dup_steps[0].copy is not None
    assert dup_steps[0].copy.oif == 5 and dup_steps[0].copy.trace_ids == [kernel_id(0x88B27FEB)]
    out_copy = next(s for s in rep.steps if s.rule is DUP_OUT).copy
    assert out_copy is not None and out_copy.trace_ids == [kernel_id(0x22DEDD3A)]
    # The end-of-rules event without a handle is not a step, and the trace
    # table's own rules are never looked up.
    assert all(t != "mirrord_trace" for _, t, _, _ in rules.lookups)
    assert [(s.event.chain, s.event.type_name) for s in req.visible_steps()] == [
        ("prerouting", "rule"), ("in_br-lan", "rule"), ("prerouting", "policy"),
        ("postrouting", "policy")]


def test_text_and_json_rendering() -> None:
    tracker = Tracker(book())
    for e in parse_datagram(recorded_ping()):
        tracker.add(e, now=5.0, wall=0.0)
    req, rep = tracker.ready(10.0)
    req.number, rep.number = 1, 2
    names = {3: "wan", 4: "br-lan", 5: "col"}
    text = packet_text(req, names).splitlines()
    assert text[0].endswith("IN=br-lan OUT=wan 192.0.2.10 > 198.51.100.10 ICMP echo-request "
                            "id=10405 seq=1 len=84 ttl=64  => mirrored by lan-icmp (in)")
    assert text[1:] == [
        '  ip mirrord prerouting rule #10: iifname vmap { "br-lan" : jump in_br-lan } '
        "(jump in_br-lan)",
        "  ip mirrord in_br-lan rule #11 (continue) [mirror lan-icmp in: copied to 203.0.113.10]",
        "    copy out col: 192.0.2.10 > 198.51.100.10 ICMP echo-request id=10405 seq=1 len=84 "
        "ttl=63",
        "      ip mirrord postrouting policy accept",
        "  ip mirrord prerouting policy accept",
        "  ip mirrord postrouting policy accept",
    ]
    j = packet_json(rep, names)
    assert (j["packet"], j["in"], j["out"]) == (2, "wan", "br-lan")
    assert j["mirrored"] == [{"mirror": "lan-icmp", "direction": "out", "to": "203.0.113.10",
                              "device": None}]
    dup = next(e for e in j["events"] if e.get("handle") == 12)
    assert dup["copy"]["out"] == "col" and dup["verdict"] == "continue"


def test_reused_trace_id_with_other_headers_is_another_packet() -> None:
    p1, th1 = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0x0101, 1)
    p2, th2 = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0x0102, 2)
    raw = (trace_msg(7, T_POLICY, "filter", "input", policy=1, iif=4, network=p1, transport=th1)
           + trace_msg(7, T_POLICY, "filter", "input", policy=1, iif=4, network=p2,
                       transport=th2))
    tracker = Tracker(book())
    for e in parse_datagram(raw):
        tracker.add(e, now=1.0, wall=0.0)
    packets = tracker.ready(2.0)
    assert [p.headers.info for p in packets if p.headers] == [
        "echo-request id=10405 seq=1", "echo-request id=10405 seq=2"]


def test_same_trace_id_after_a_gap_is_another_packet() -> None:
    p1, th1 = ipv4_icmp("192.0.2.10", "198.51.100.10", 64, 0x0101, 1)
    (e,) = parse_datagram(trace_msg(7, T_POLICY, "f", "input", policy=1, iif=4, network=p1,
                                    transport=th1))
    (bare,) = parse_datagram(trace_msg(7, T_POLICY, "f", "other", policy=1))
    tracker = Tracker(book(), hold=0.2, gap=0.5)
    tracker.add(e, now=1.0, wall=0.0)
    tracker.add(bare, now=1.1, wall=0.0)
    tracker.add(e, now=3.0, wall=0.0)
    packets = tracker.ready(10.0)
    assert [len(p.events) for p in packets] == [2, 1]


# -- the marking rules ----------------------------------------------------------------
def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(protocol=[], port=[], sport=[], dport=[], source=[],
                                   destination=[], interface=[], direction="both",
                                   family="any", mirror=None, config=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_match_from_options() -> None:
    m = match_from_options(_args(protocol=["udp"], dport=["53,853", "1000-2000"],
                                 source=["192.0.2.0/24"]))
    assert m.protocols == (17,)
    assert m.dports == (PortRange(53, 53), PortRange(853, 853), PortRange(1000, 2000))
    assert m.versions() == (4,)
    for bad in (dict(port=["70000"]), dict(protocol=["icmp"], port=["53"]),
                dict(protocol=["bogus"]), dict(source=["2001:db8::/32"], family="ipv4"),
                dict(destination=["not-an-address"])):
        with pytest.raises(TraceError):
            match_from_options(_args(**bad))


def _spec_match(match_yaml: str) -> Match:
    from mirrord.spec import parse

    spec = parse("collectors:\n  c: {address: 192.0.2.9}\nmirrors:\n  - name: m\n"
                 f"    interfaces: eth0\n    collector: c\n    match: {match_yaml}\n")
    return spec.mirrors[0].match


# Each case was read by trace's own parser until the options went through the
# spec's: it traced 192.0.2.0/24, dropped icmpv6 from an ipv4 match without a
# word, read an Arabic-Indic digit as port 3, traced all traffic for an empty
# --port, and stopped with a traceback on a digit int() does not read.
SPEC_RULES = [
    (dict(source=["192.0.2.1/24"]), "{source: 192.0.2.1/24}",
     "source: '192.0.2.1/24' has host bits set; did you mean 192.0.2.0/24?"),
    (dict(family="ipv4", protocol=["tcp,icmpv6"]), "{family: ipv4, protocol: [tcp, icmpv6]}",
     "protocol icmpv6 does not exist in family ipv4"),
    (dict(port=["\u0663"]), "{port: \u0663}",
     "port: '\u0663' is not a port or a range like 1000-2000"),
    (dict(port=[""]), "{port: []}", "port must name at least one port"),
    (dict(protocol=["\u00b2"]), "{protocol: \u00b2}",
     "unknown protocol '\u00b2'; use one of ah, esp, gre, icmp, icmpv6, igmp, sctp, tcp, udp, "
     "udplite, or a number"),
]


@pytest.mark.parametrize(("options", "match_yaml", "problem"), SPEC_RULES,
                         ids=["host-bits", "icmpv6-in-ipv4", "non-ascii-port", "empty-port",
                              "superscript-protocol"])
def test_match_options_are_read_by_the_spec_rules(options: dict[str, object], match_yaml: str,
                                                  problem: str) -> None:
    from mirrord.spec import SpecError

    with pytest.raises(TraceError) as got:
        match_from_options(_args(**options))
    assert str(got.value) == f"match: {problem}"
    # A spec's match says the same of the same values.
    with pytest.raises(SpecError) as spec_got:
        _spec_match(match_yaml)
    assert [p.split(": ", 1)[1] for p in spec_got.value.problems] == [f"mirror 'm': {problem}"]


def test_match_options_and_spec_read_alike() -> None:
    assert match_from_options(_args(protocol=["udp,6"], dport=["53,853", "1000-2000"],
                                    source=["192.0.2.0/24", "2001:db8::/32"])) == _spec_match(
        "{protocol: [udp, 6], dport: [53, 853, 1000-2000], source: [192.0.2.0/24, 2001:db8::/32]}")


def test_trace_rules_per_direction() -> None:
    sel = Selection(Match(family="ipv4", protocols=(1,)), (("br-lan", "in"), ("wan", "out")))
    rules = trace_rules(sel)
    assert [c for c, _ in rules] == ["pre", "pre", "out"]
    for _, exprs in rules:
        assert exprs[0] == {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                                      "right": "ipv4"}}
        assert exprs[-1] == {"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}
    assert {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br-lan"}} \
        in rules[0][1]
    assert {"match": {"op": "==", "left": {"fib": {"result": "oifname", "flags": ["daddr"]}},
                      "right": "wan"}} in rules[1][1]
    assert {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "wan"}} \
        in rules[2][1]


def test_trace_rules_without_interfaces_cover_both_families_and_hooks() -> None:
    rules = trace_rules(Selection(Match(ports=(PortRange(53, 53),))))
    fams = [e[0]["match"]["right"] for _, e in rules]
    # port = dport 53, or sport 53 and not dport 53: two alternatives per family and hook
    assert sorted(set(fams)) == ["ipv4", "ipv6"] and len(rules) == 2 * 2 * 2


def test_create_commands_is_one_exclusive_transaction() -> None:
    cmds = create_commands(Selection(Match(protocols=(1,))), "mirrord trace pid=1 start=2")
    assert cmds[0] == {"create": {"table": {"family": "inet", "name": "mirrord_trace"}}}
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert [(c["name"], c["hook"], c["prio"]) for c in chains] == [
        ("pre", "prerouting", -300), ("out", "output", -300), ("post", "postrouting", 1000)]
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    assert rules and all(r["comment"] == "mirrord trace pid=1 start=2" for r in rules)
    assert all(r["expr"][-1] == {"mangle": {"key": {"meta": {"key": "nftrace"}}, "value": 1}}
               for r in rules)


def test_own_ssh_session_is_left_out() -> None:
    flow = ssh_flow({"SSH_CONNECTION": "::ffff:192.0.2.10 51234 192.0.2.1 22"})
    assert flow == ("192.0.2.10", 51234, "192.0.2.1", 22)
    assert ssh_flow({}) is None and ssh_flow({"SSH_CONNECTION": "a b c d"}) is None
    cmds = create_commands(Selection(Match()), "c", flow)
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    # The exclusions come first in their chains, so the session never gets marked.
    first_pre = next(r for r in rules if r["chain"] == "pre")
    first_out = next(r for r in rules if r["chain"] == "out")
    for rule, (saddr, sport, daddr, dport) in (
        (first_pre, ("192.0.2.10", 51234, "192.0.2.1", 22)),
        (first_out, ("192.0.2.1", 22, "192.0.2.10", 51234)),
    ):
        rights = [e["match"]["right"] for e in rule["expr"] if "match" in e]
        assert rights == [saddr, daddr, "tcp", sport, dport]
        assert rule["expr"][-1] == {"return": None}
    v6 = ssh_flow({"SSH_CONNECTION": "2001:db8:1::10 5000 2001:db8:1::1 22"})
    assert v6 is not None
    (pre, _), _ = ssh_exclusions(v6)
    assert pre == "pre"


def test_stale_owner_detection() -> None:
    objs = [{"table": {"family": "inet", "name": "mirrord_trace"}},
            {"rule": {"chain": "pre", "comment": "mirrord trace pid=4242 start=99"}}]
    assert stale_owner(objs) == (4242, 99)
    assert stale_owner(objs[:1]) is None
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = nftrace.process_start_time(p.pid)
        assert start is not None
        assert owner_alive((p.pid, start))
        assert not owner_alive((p.pid, start + 1))  # the pid was reused
    finally:
        p.kill()
        p.wait()
    assert not owner_alive((p.pid, start))
    import os

    me = nftrace.own_identity()
    assert me[0] == os.getpid() and not owner_alive(me)
