"""The classic BPF compiler, checked against the kernel.

Each kernel test attaches the compiled program to a packet socket in a fresh
namespace, sends crafted frames (scapy) into and out of the interface, and
compares what the filtered socket saw with what an unfiltered one saw.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from mirrord.match import Match, PortRange
from mirrord.tzsp.job import match_to_dict
from tests.harness.capture import marker
from tests.harness.lab import have_root_netns, veth_namespace
from tests.harness.tzsp import bpf_probe

A, B = "02:00:00:00:00:aa", "02:00:00:00:00:bb"
COLLECTOR, COLLECTOR6 = "203.0.113.130", "2001:db8:3::10"


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


# -- against the kernel ---------------------------------------------------------------

needs_root = pytest.mark.skipif(have_root_netns() is not None,
                                reason=str(have_root_netns()))


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    if have_root_netns() is not None:
        pytest.skip(str(have_root_netns()))
    with veth_namespace(tun=True) as name:
        yield name


Case = tuple[str, str, Any, bool]  # name, "in"/"out", scapy packet (no payload), expected


def run_cases(ns: str, match: Match, cases: Sequence[Case], *, exclude: Sequence[str] = (),
              directions: Sequence[str] = ("in", "out"), dev: str = "vb",
              snaplen: int = 65535) -> dict[str, Any]:
    from scapy.all import Raw, raw

    spec: dict[str, Any] = {"match": match_to_dict(match), "exclude": list(exclude),
                            "directions": list(directions), "dev": dev, "snaplen": snaplen,
                            "in": [], "out": []}
    names = {}
    for i, (name, way, pkt, _want) in enumerate(cases):
        names[i] = name
        spec[way].append(raw(pkt / Raw(marker(i) + b"." * 40)).hex())
    result = bpf_probe(ns, spec)
    # Every frame must have reached the interface, or the test proves nothing.
    assert [names[i] for i in result["control"]] == [names[i] for i in sorted(names)]
    got = {names[i] for i in result["filtered"]}
    want = {name for name, _way, _pkt, ok in cases if ok}
    assert got == want, (f"passed but should not: {sorted(got - want)}; "
                         f"dropped but should pass: {sorted(want - got)}")
    return result


def eth() -> Any:
    from scapy.all import Ether

    return Ether(src=A, dst=B)


def v4(src: str = "192.0.2.10", dst: str = "198.51.100.10", **kw: Any) -> Any:
    from scapy.all import IP

    return eth() / IP(src=src, dst=dst, **kw)


def v6(src: str = "2001:db8:1::10", dst: str = "2001:db8:2::10", **kw: Any) -> Any:
    from scapy.all import IPv6

    return eth() / IPv6(src=src, dst=dst, **kw)


@needs_root
@pytest.mark.integration
def test_protocol_and_dport(ns: str) -> None:
    from scapy.all import ICMP, TCP, UDP, ICMPv6EchoRequest

    run_cases(ns, Match(protocols=(17,), dports=(PortRange(53, 53),)), [
        ("udp53", "in", v4() / UDP(sport=4000, dport=53), True),
        ("udp53-out", "out", v4() / UDP(sport=4000, dport=53), True),
        ("udp54", "in", v4() / UDP(sport=53, dport=54), False),
        ("tcp53", "in", v4() / TCP(sport=4000, dport=53), False),
        ("icmp", "in", v4() / ICMP(), False),
        ("udp53-v6", "in", v6() / UDP(sport=4000, dport=53), True),
        ("tcp53-v6", "in", v6() / TCP(sport=4000, dport=53), False),
        ("icmp6", "in", v6() / ICMPv6EchoRequest(), False),
    ])


@needs_root
@pytest.mark.integration
def test_port_either_end_and_ranges(ns: str) -> None:
    from scapy.all import SCTP, TCP, UDP

    run_cases(ns, Match(protocols=(6, 17), ports=(PortRange(53, 53),)), [
        ("sport53", "in", v4() / UDP(sport=53, dport=40000), True),
        ("dport53", "in", v4() / UDP(sport=40000, dport=53), True),
        ("both53", "in", v4() / TCP(sport=53, dport=53), True),
        ("neither", "in", v4() / UDP(sport=52, dport=54), False),
        ("v6-sport53", "out", v6() / TCP(sport=53, dport=1), True),
    ])
    run_cases(ns, Match(sports=(PortRange(1000, 2000), PortRange(8080, 8080)),
                        dports=(PortRange(80, 80),)), [
        ("999", "in", v4() / TCP(sport=999, dport=80), False),
        ("1000", "in", v4() / TCP(sport=1000, dport=80), True),
        ("2000", "in", v4() / UDP(sport=2000, dport=80), True),
        ("2001", "in", v4() / TCP(sport=2001, dport=80), False),
        ("8080", "in", v4() / TCP(sport=8080, dport=80), True),
        ("8080-dport81", "in", v4() / TCP(sport=8080, dport=81), False),
        ("sctp-not-in-default-protocols", "in", v4() / SCTP(sport=1500, dport=80), False),
    ])
    run_cases(ns, Match(protocols=(132,), dports=(PortRange(80, 80),)), [
        ("sctp", "in", v4() / SCTP(sport=1500, dport=80), True),
        ("udp", "in", v4() / UDP(sport=1500, dport=80), False),
    ])


@needs_root
@pytest.mark.integration
def test_ipv4_options_move_the_ports(ns: str) -> None:
    from scapy.all import UDP, IPOption_NOP

    run_cases(ns, Match(dports=(PortRange(53, 53),)), [
        ("options-53", "in", v4(options=[IPOption_NOP()] * 8) / UDP(dport=53), True),
        ("options-54", "in", v4(options=[IPOption_NOP()] * 8) / UDP(dport=54), False),
    ])


@needs_root
@pytest.mark.integration
def test_fragments(ns: str) -> None:
    from scapy.all import UDP, Raw

    # A non-first fragment whose data happen to look like port 53.
    fake_ports = Raw(b"\x00\x35\x00\x35\x00\x10\x00\x00")
    cases: list[Case] = [
        ("first-fragment", "in", v4(flags="MF") / UDP(sport=1, dport=53), True),
        ("later-fragment", "in", v4(proto=17, frag=185) / fake_ports, False),
    ]
    run_cases(ns, Match(protocols=(17,), dports=(PortRange(53, 53),)), cases)
    # Without ports, every fragment of the protocol is copied.
    run_cases(ns, Match(protocols=(17,)), [(n, w, p, True) for n, w, p, _ in cases])


@needs_root
@pytest.mark.integration
def test_ipv6_extension_header_hides_ports(ns: str) -> None:
    from scapy.all import UDP, IPv6ExtHdrHopByHop

    run_cases(ns, Match(dports=(PortRange(53, 53),)), [
        ("plain", "in", v6() / UDP(dport=53), True),
        ("hop-by-hop", "in", v6() / IPv6ExtHdrHopByHop() / UDP(dport=53), False),
    ])


@needs_root
@pytest.mark.integration
def test_addresses_and_prefixes(ns: str) -> None:
    from scapy.all import UDP

    m = Match(sources=(net("192.0.2.0/25"), net("203.0.113.7/32")),
              destinations=(net("198.51.100.0/24"),))
    run_cases(ns, m, [
        ("in-25", "in", v4("192.0.2.100", "198.51.100.9") / UDP(), True),
        ("outside-25", "in", v4("192.0.2.200", "198.51.100.9") / UDP(), False),
        ("host", "out", v4("203.0.113.7", "198.51.100.9") / UDP(), True),
        ("host+1", "in", v4("203.0.113.8", "198.51.100.9") / UDP(), False),
        ("bad-dst", "in", v4("192.0.2.100", "198.51.101.9") / UDP(), False),
        # The lists name only IPv4: no IPv6 packet can match.
        ("v6", "in", v6() / UDP(), False),
    ])
    m6 = Match(sources=(net("2001:db8:1::/48"), net("2001:db8:8000::/33")))
    run_cases(ns, m6, [
        ("48-in", "in", v6("2001:db8:1:ffff::1") / UDP(), True),
        ("48-out", "in", v6("2001:db8:2::1") / UDP(), False),
        ("33-in", "in", v6("2001:db8:ffff::1") / UDP(), True),
        ("33-out", "in", v6("2001:db8:7fff::1") / UDP(), False),
        ("v4", "in", v4() / UDP(), False),
    ])


@needs_root
@pytest.mark.integration
def test_many_networks_need_far_jumps(ns: str) -> None:
    from scapy.all import UDP

    nets = (*(net(f"198.51.100.{i}/32") for i in range(0, 250, 2)), net("192.0.2.0/24"))
    result = run_cases(ns, Match(destinations=nets), [
        ("first", "in", v4(dst="198.51.100.0") / UDP(), True),
        ("last", "in", v4(dst="192.0.2.77") / UDP(), True),
        ("odd", "in", v4(dst="198.51.100.3") / UDP(), False),
    ])
    assert result["program_len"] > 256


@needs_root
@pytest.mark.integration
def test_collector_is_never_captured(ns: str) -> None:
    from scapy.all import ARP, ICMP, UDP

    run_cases(ns, Match(), [
        ("to-collector", "out", v4(dst=COLLECTOR) / UDP(dport=37008), False),
        ("from-collector", "in", v4(src=COLLECTOR) / ICMP(type=3, code=3), False),
        ("to-collector6", "out", v6(dst=COLLECTOR6) / UDP(dport=37008), False),
        ("from-collector6", "in", v6(src=COLLECTOR6) / UDP(), False),
        ("near-collector", "in", v4(dst="203.0.113.131") / UDP(), True),
        ("near-collector6", "in", v6(dst="2001:db8:3::11") / UDP(), True),
        ("other", "in", v4() / UDP(), True),
        ("arp", "in", eth() / ARP(psrc="192.0.2.10", pdst="192.0.2.1"), True),
    ], exclude=(COLLECTOR, COLLECTOR6))


# A second TZSP collector: another worker's datagrams go there.
OTHER, OTHER6 = "198.51.100.140", "2001:db8:4::20"


@needs_root
@pytest.mark.integration
@pytest.mark.parametrize("match", [Match(), Match(protocols=(17,))])
def test_every_collector_is_never_captured_fragments_included(ns: str, match: Match) -> None:
    """Another worker's datagrams, whole or fragmented, are never input to this one.

    A later fragment has no UDP header (no port to test), but the addresses
    are in every fragment: the exclusion is by address, before the match.
    """
    from scapy.all import ICMP, UDP, IPv6ExtHdrFragment

    udp = match.protocols == (17,)
    run_cases(ns, match, [
        ("to-own", "out", v4(dst=COLLECTOR) / UDP(dport=37008), False),
        ("to-other", "out", v4(dst=OTHER) / UDP(dport=37009), False),
        ("first-fragment-to-other", "out",
         v4(dst=OTHER, flags="MF") / UDP(dport=37009, len=3000), False),
        ("later-fragment-to-other", "out", v4(dst=OTHER, frag=185, proto=17), False),
        ("icmp-error-from-other", "in", v4(src=OTHER) / ICMP(type=3, code=3), False),
        ("to-other6", "out", v6(dst=OTHER6) / UDP(dport=37009), False),
        ("later-fragment-to-other6", "out",
         v6(dst=OTHER6) / IPv6ExtHdrFragment(offset=185, nh=17), False),
        # Positive controls: the same shapes elsewhere pass.
        ("to-elsewhere", "out", v4() / UDP(dport=37009), True),
        ("later-fragment-elsewhere", "out", v4(frag=185, proto=17), True),
        ("icmp-elsewhere", "in", v4() / ICMP(type=3, code=3), not udp),
        ("to-elsewhere6", "out", v6() / UDP(dport=37009), True),
        ("later-fragment-elsewhere6", "out", v6() / IPv6ExtHdrFragment(offset=185, nh=17),
         not udp),
    ], exclude=(COLLECTOR, OTHER, COLLECTOR6, OTHER6))


@needs_root
@pytest.mark.integration
def test_non_ip_only_for_all_traffic(ns: str) -> None:
    from scapy.all import ARP, UDP

    arp = eth() / ARP(psrc="192.0.2.10", pdst="192.0.2.1")
    run_cases(ns, Match(family="ipv4"), [
        ("arp", "in", arp, False),
        ("v4", "in", v4() / UDP(), True),
        ("v6", "in", v6() / UDP(), False),
    ])
    run_cases(ns, Match(family="ipv6"), [
        ("v4", "in", v4() / UDP(), False),
        ("v6", "out", v6() / UDP(), True),
    ])


@needs_root
@pytest.mark.integration
def test_vlan_tags_in_frame_and_stripped(ns: str) -> None:
    from scapy.all import IP, UDP, Dot1AD, Dot1Q, Ether

    def tagged(*tags: Any) -> Any:
        pkt = Ether(src=A, dst=B)
        for t in tags:
            pkt = pkt / t
        return pkt / IP(src="192.0.2.10", dst="198.51.100.10")

    m = Match(protocols=(17,), dports=(PortRange(53, 53),))
    run_cases(ns, m, [
        # Received: the kernel moves the tag to metadata before the filter runs.
        ("in-8021q", "in", tagged(Dot1Q(vlan=42)) / UDP(dport=53), True),
        ("in-8021q-54", "in", tagged(Dot1Q(vlan=42)) / UDP(dport=54), False),
        # Sent raw: the tag stays in the frame, L3 moves by 4 bytes.
        ("out-8021q", "out", tagged(Dot1Q(vlan=42)) / UDP(dport=53), True),
        ("out-8021q-54", "out", tagged(Dot1Q(vlan=42)) / UDP(dport=54), False),
        ("out-qinq", "out", tagged(Dot1AD(vlan=7), Dot1Q(vlan=42)) / UDP(dport=53), True),
        ("out-qinq-54", "out", tagged(Dot1AD(vlan=7), Dot1Q(vlan=42)) / UDP(dport=54), False),
        ("in-qinq", "in", tagged(Dot1AD(vlan=7), Dot1Q(vlan=42)) / UDP(dport=53), True),
    ])


@needs_root
@pytest.mark.integration
def test_direction(ns: str) -> None:
    from scapy.all import UDP

    cases: list[Case] = [
        ("in", "in", v4() / UDP(), True),
        ("out", "out", v4() / UDP(), False),
    ]
    run_cases(ns, Match(), cases, directions=("in",))
    run_cases(ns, Match(), [(n, w, p, not ok) for n, w, p, ok in cases], directions=("out",))
    run_cases(ns, Match(), [(n, w, p, True) for n, w, p, _ in cases], directions=("in", "out"))


@needs_root
@pytest.mark.integration
def test_snaplen_cuts_in_kernel(ns: str) -> None:
    from scapy.all import UDP, Raw

    result = run_cases(ns, Match(), [
        ("big", "in", v4() / UDP() / Raw(b""), True),
    ], snaplen=60)
    assert result["lengths"] == {"0": 60}


@needs_root
@pytest.mark.integration
def test_raw_ip_device(ns: str) -> None:
    from scapy.all import IP, TCP, UDP, IPv6

    m = Match(protocols=(17,), dports=(PortRange(53, 53),))
    run_cases(ns, m, [
        ("in-53", "in", IP(src="192.0.2.10", dst="198.51.100.10") / UDP(dport=53), True),
        ("in-tcp", "in", IP(src="192.0.2.10", dst="198.51.100.10") / TCP(dport=53), False),
        ("out-53", "out", IP(src="192.0.2.10", dst="198.51.100.10") / UDP(dport=53), True),
        ("out-v6-53", "out", IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(dport=53), True),
        ("to-collector", "out", IP(src="192.0.2.10", dst=COLLECTOR) / UDP(dport=53), False),
    ], dev="t0", exclude=(COLLECTOR,))


@needs_root
@pytest.mark.integration
def test_group_members_split_flows_in_the_kernel(ns: str) -> None:
    """Issue 13: three members' filters on one interface. Every frame, either
    way, at exactly one member; a flow's two directions, and a datagram's
    fragments, at the same one; ARP at bucket 0's member."""
    from scapy.all import ARP, TCP, UDP, Ether, Raw, raw

    from mirrord.plan.groups import assign

    members = ("192.0.2.50", "192.0.2.51", "192.0.2.52")
    held = assign(members, set(members))
    frames: list[tuple[str, str, Any]] = []  # flow, way, packet
    for i in range(64):
        a, b = f"192.0.2.{10 + i}", f"198.51.100.{100 + i % 7}"
        frames += [(f"udp{i}", "in", v4(a, b) / UDP(sport=40000 + i, dport=53)),
                   (f"udp{i}", "out", v4(b, a) / UDP(sport=53, dport=40000 + i))]
    for i in range(16):
        a, b = f"2001:db8:1::{i + 1:x}", "2001:db8:2::443"
        frames += [(f"tcp{i}", "out", v6(a, b) / TCP(sport=50000 + i, dport=443)),
                   (f"tcp{i}", "in", v6(b, a) / TCP(sport=443, dport=50000 + i, flags="SA"))]
    frames += [("frag", "in", v4(flags="MF") / UDP(sport=7, dport=9)),
               ("frag", "in", v4(proto=17, frag=185) / Raw(b"x" * 8)),
               ("frag", "out", v4("198.51.100.10", "192.0.2.10", proto=17, frag=370)
                / Raw(b"y" * 8))]
    frames.append(("arp", "in", Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="192.0.2.1")))
    spec: dict[str, Any] = {"match": match_to_dict(Match()), "exclude": [COLLECTOR],
                            "directions": ["in", "out"], "dev": "vb", "snaplen": 65535,
                            "in": [], "out": [], "partitions": [list(held[m]) for m in members]}
    for i, (_flow, way, pkt) in enumerate(frames):
        spec[way].append(raw(pkt / Raw(marker(i) + b"." * 40)).hex())
    result = bpf_probe(ns, spec)
    assert result["control"] == list(range(len(frames)))  # every frame reached the interface
    at: dict[int, list[int]] = {}
    for k, seen in enumerate(result["partitions"]):
        for m in seen:
            at.setdefault(m, []).append(k)
    assert {m: len(ks) for m, ks in at.items()} == {i: 1 for i in range(len(frames))}
    by_flow: dict[str, set[int]] = {}
    for i, (flow, _way, _pkt) in enumerate(frames):
        by_flow.setdefault(flow, set()).update(at[i])
    assert all(len(ks) == 1 for ks in by_flow.values()), by_flow
    assert by_flow["arp"] == {next(k for k, m in enumerate(members) if 0 in held[m])}
    # 80 flows over 64 buckets: every member has some.
    assert {k for ks in by_flow.values() for k in ks} == {0, 1, 2}
