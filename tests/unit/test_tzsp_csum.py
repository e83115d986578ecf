"""Checksum completion of partial-checksum frames (mirrord.tzsp.csum) against scapy.

scapy builds each packet with its correct checksum; the test overwrites the
field with junk (what the kernel leaves is the pseudo-header sum, but the
completion must not depend on it), completes it, and compares bytes.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# Every test here builds its packets with scapy, at collection already: in the
# leg that leaves scapy out (the OpenWrt-like one) the module is skipped as
# tests/conftest.py skips single tests; anywhere else a missing scapy fails.
if "scapy" in os.environ.get("MIRRORD_TEST_ABSENT", "").split(","):
    pytest.skip("needs scapy, which this leg leaves out (MIRRORD_TEST_ABSENT)",
                allow_module_level=True)

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from mirrord.tzsp.csum import complete_ethernet, complete_l3

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def l4_check_offset(frame: bytes, pkt: Any) -> int:
    layer = pkt[TCP] if TCP in pkt else pkt[UDP]
    start = len(frame) - len(bytes(layer))
    return start + (16 if isinstance(layer, TCP) else 6)


def spoiled(pkt: Any, junk: int = 0x1234) -> tuple[bytes, bytearray, int]:
    good = bytes(pkt)
    at = l4_check_offset(good, pkt)
    bad = bytearray(good)
    struct.pack_into("!H", bad, at, junk)
    return good, bad, at


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(min_size=0, max_size=1600), udp=st.booleans(), v6=st.booleans(),
       junk=st.integers(0, 0xFFFF))
def test_completed_checksum_equals_scapys(payload: bytes, udp: bool, v6: bool,
                                          junk: int) -> None:
    ip = IPv6(src="2001:db8::1", dst="2001:db8:2::7") if v6 else IP(src="192.0.2.10",
                                                                    dst="198.51.100.10")
    l4 = UDP(sport=40000, dport=53) if udp else TCP(sport=40000, dport=80, flags="PA", seq=7)
    pkt = ETH / ip / l4 / Raw(payload)
    good, bad, _ = spoiled(pkt, junk)
    assert complete_ethernet(bad, 0, len(bad))
    assert bytes(bad) == good


@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("v6", [False, True])
def test_sum_of_0xffff_corner(udp: bool, v6: bool) -> None:
    """A segment whose sum is 0xFFFF: TCP carries 0, UDP carries 0xFFFF (0 means none)."""
    ip = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="192.0.2.1", dst="192.0.2.2")
    l4 = UDP(sport=1, dport=2) if udp else TCP(sport=1, dport=2, flags="A")
    base = ETH / ip / l4 / Raw(b"\x00\x00abcd")
    c0 = (base[UDP] if udp else base[TCP]).__class__(bytes(base[UDP] if udp else base[TCP])).chksum
    # The first payload word set to the checksum of the packet with that word 0
    # makes the whole sum 0xFFFF.
    pkt = ETH / ip / l4 / Raw(struct.pack("!H", c0) + b"abcd")
    good, bad, at = spoiled(pkt)
    assert struct.unpack_from("!H", good, at)[0] == (0xFFFF if udp else 0)
    assert complete_ethernet(bad, 0, len(bad))
    assert bytes(bad) == good


def test_ipv6_extension_headers_are_walked() -> None:
    for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                IPv6ExtHdrRouting(addresses=["2001:db8::9"], segleft=0),
                IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()):
        pkt = ETH / IPv6(src="2001:db8::1", dst="2001:db8::2") / ext / UDP(sport=5, dport=6) / (
            b"x" * 33)
        good, bad, _ = spoiled(pkt)
        assert complete_ethernet(bad, 0, len(bad)), ext.summary()
        assert bytes(bad) == good


def test_vlan_tags_in_the_frame_are_skipped() -> None:
    for tags in (Dot1Q(vlan=5), Dot1AD(vlan=7) / Dot1Q(vlan=5)):
        pkt = ETH / tags / IP(src="192.0.2.1", dst="192.0.2.2") / TCP() / (b"y" * 101)
        good, bad, _ = spoiled(pkt)
        assert complete_ethernet(bad, 0, len(bad))
        assert bytes(bad) == good


def test_raw_ip_and_an_offset_into_a_larger_buffer() -> None:
    pkt = IP(src="192.0.2.1", dst="192.0.2.2", options=b"\x01\x01\x01\x00") / UDP() / (b"z" * 9)
    good, bad, _ = spoiled(pkt)
    buf = bytearray(b"\xee" * 48) + bad + bytearray(b"\xee" * 20)
    assert complete_l3(buf, 48, 48 + len(bad))
    assert bytes(buf[48:48 + len(good)]) == good
    assert buf[:48] == b"\xee" * 48 and buf[-20:] == b"\xee" * 20


def test_ethernet_padding_is_not_summed() -> None:
    """A short frame padded to 60 bytes: only the IP total length counts."""
    pkt = ETH / IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / b"a"
    good, bad, _ = spoiled(pkt)
    padded = bad + bytearray(b"\x55" * (60 - len(bad)))
    assert complete_ethernet(padded, 0, len(padded))
    assert bytes(padded[:len(good)]) == good


@pytest.mark.parametrize("pkt", [
    # cut short: the segment does not end within the captured bytes
    ETH / IP(src="192.0.2.1", dst="192.0.2.2") / TCP() / (b"q" * 200),
    # a fragment (more fragments set)
    ETH / IP(src="192.0.2.1", dst="192.0.2.2", flags="MF") / UDP() / (b"q" * 64),
    ETH / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(m=1) / UDP() / (
        b"q" * 64),
    # a routing header with segments left: the pseudo-header holds another address
    ETH / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrRouting(
        addresses=["2001:db8::9"]) / UDP() / (b"q" * 64),
])
def test_left_alone(pkt: Any) -> None:
    frame = bytearray(bytes(pkt))
    before = bytes(frame)
    end = len(frame) - 1 if TCP in pkt else len(frame)
    assert not complete_ethernet(frame, 0, end)
    assert bytes(frame) == before


def test_not_tcp_or_udp_left_alone() -> None:
    for pkt in (ETH / IP(src="192.0.2.1", dst="192.0.2.2", proto=132) / (b"s" * 40),
                ETH / IPv6(src="2001:db8::1", dst="2001:db8::2", nh=58) / (b"s" * 40),
                Ether(type=0x0806) / (b"a" * 40)):
        frame = bytearray(bytes(pkt))
        before = bytes(frame)
        assert not complete_ethernet(frame, 0, len(frame))
        assert bytes(frame) == before
