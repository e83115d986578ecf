"""Packet headers as a trace event carries them: decoded for the output, keyed for grouping.

The kernel copies the network and transport headers of a traced packet into
its events. `decode_headers` reads addresses, protocol, ports and ICMP/TCP
details from them with plain struct parsing (a router's image has no scapy);
`copy_key` and `nat_key` say which events belong to one packet, its clones,
and its NATed self.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Optional

from ...match import PROTOCOL_NAMES


@dataclass
class Headers:
    version: int
    src: str
    dst: str
    protocol: str
    length: Optional[int] = None
    ttl: Optional[int] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    info: str = ""

    def endpoints(self) -> str:
        def ep(addr: str, port: Optional[int]) -> str:
            if port is None:
                return addr
            return f"[{addr}]:{port}" if self.version == 6 else f"{addr}:{port}"

        return f"{ep(self.src, self.sport)} > {ep(self.dst, self.dport)}"

    def text(self) -> str:
        parts = [self.endpoints(), self.protocol.upper()]
        if self.info:
            parts.append(self.info)
        if self.length is not None:
            parts.append(f"len={self.length}")
        if self.ttl is not None:
            parts.append(f"{'ttl' if self.version == 4 else 'hlim'}={self.ttl}")
        return " ".join(parts)

    def flow(self) -> tuple[str, str, Optional[int], Optional[int]]:
        return (self.src, self.dst, self.sport, self.dport)

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "src": self.src, "dst": self.dst,
                "protocol": self.protocol, "sport": self.sport, "dport": self.dport,
                "length": self.length, "ttl": self.ttl, "info": self.info}


UPPER_LAYER = frozenset({1, 6, 17, 58, 132, 136})


def decode_headers(network: bytes, transport: Optional[bytes]) -> Optional[Headers]:
    """The packet's addresses, protocol, ports and ICMP/TCP details, from the trace's copies.

    Plain struct parsing: a router's image has no scapy, and the output must not
    depend on whether it is installed (tests check it against scapy's dissection).
    """
    if not network:
        return None
    version = network[0] >> 4
    th = transport or b""
    if version == 4 and len(network) >= 20:
        proto = network[9]
        h = Headers(4, str(ipaddress.IPv4Address(network[12:16])),
                    str(ipaddress.IPv4Address(network[16:20])),
                    PROTOCOL_NAMES.get(proto, str(proto)),
                    length=struct.unpack(">H", network[2:4])[0], ttl=network[8])
        flags_frag = struct.unpack(">H", network[6:8])[0]
        if flags_frag & 0x2000 or flags_frag & 0x1FFF:
            # Only the first fragment carries the transport header.
            h.info = f"fragment offset={(flags_frag & 0x1FFF) * 8}"
            return h
    elif version == 6 and len(network) >= 40:
        proto = network[6]
        h = Headers(6, str(ipaddress.IPv6Address(network[8:24])),
                    str(ipaddress.IPv6Address(network[24:40])), _v6_protocol(proto),
                    length=struct.unpack(">H", network[4:6])[0] + 40, ttl=network[7])
        if proto not in UPPER_LAYER:
            return h  # behind an extension header: the transport header is out of sight
    else:
        return None
    if proto == 6 and len(th) >= 14:
        h.sport, h.dport, seq, ack = struct.unpack(">HHII", th[:12])
        flags = ((th[12] & 1) << 8) | th[13]
        h.info = f"[{_tcp_flags(flags)}] seq={seq}" + (f" ack={ack}" if flags & 0x10 else "")
    elif (proto in (17, 136) and len(th) >= 8) or (proto == 132 and len(th) >= 4):
        h.sport, h.dport = struct.unpack(">HH", th[:4])
    elif proto == 1 and len(th) >= 4:
        h.info = ICMP_TYPES.get(th[0], str(th[0]))
        if th[0] in (0, 8) and len(th) >= 8:
            ident, seq16 = struct.unpack(">HH", th[4:8])
            h.info += f" id={ident} seq={seq16}"
    elif proto == 58 and len(th) >= 4:
        h.info = ICMPV6_TYPES.get(th[0], f"type {th[0]}")
        if th[0] in (128, 129) and len(th) >= 8:
            ident, seq16 = struct.unpack(">HH", th[4:8])
            h.info += f" id={ident} seq={seq16}"
    return h


TCP_FLAG_LETTERS = "FSRPAUECN"  # bit 0 upwards, as tcpdump/scapy print them


def _tcp_flags(bits: int) -> str:
    return "".join(c for i, c in enumerate(TCP_FLAG_LETTERS) if bits >> i & 1)


# The names scapy and Wireshark users know (scapy's icmptypes / icmp6types).
ICMP_TYPES = {
    0: "echo-reply", 3: "dest-unreach", 4: "source-quench", 5: "redirect", 8: "echo-request",
    9: "router-advertisement", 10: "router-solicitation", 11: "time-exceeded",
    12: "parameter-problem", 13: "timestamp-request", 14: "timestamp-reply",
    15: "information-request", 16: "information-response", 17: "address-mask-request",
    18: "address-mask-reply", 30: "traceroute", 31: "datagram-conversion-error",
    32: "mobile-host-redirect", 33: "ipv6-where-are-you", 34: "ipv6-i-am-here",
    35: "mobile-registration-request", 36: "mobile-registration-reply",
    37: "domain-name-request", 38: "domain-name-reply", 39: "skip", 40: "photuris",
}
ICMPV6_TYPES = {
    1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded",
    4: "parameter-problem", 128: "echo-request", 129: "echo-reply", 130: "mld-query",
    131: "mld-report", 132: "mld-done", 133: "router-solicitation", 134: "router-advertisement",
    135: "neighbor-solicitation", 136: "neighbor-advertisement", 137: "redirect-message",
    143: "mld-report-version-2",
}


# The kernel copies at most 40 bytes of network header, so behind an IPv6
# extension header the transport protocol is out of sight.
IPV6_EXTENSIONS = {0: "hop-by-hop", 43: "routing", 44: "fragment", 60: "dest-opts"}


def _v6_protocol(nh: int) -> str:
    if nh in IPV6_EXTENSIONS:
        return f"{IPV6_EXTENSIONS[nh]}-ext"
    return PROTOCOL_NAMES.get(nh, str(nh))


def copy_key(network: Optional[bytes], transport: Optional[bytes]) -> Optional[bytes]:
    """The packet's identity as far as a kernel clone or a forwarding step keeps it.

    Leaves out the TTL/hop limit (decremented), the IPv4 checksum and the DF bit
    (nf_dup sets it on clones).
    """
    if not network:
        return None
    if network[0] >> 4 == 4 and len(network) >= 20:
        return (network[0:6] + bytes([network[6] & ~0x40 & 0xFF]) + network[7:8]
                + network[9:10] + network[12:] + (transport or b""))
    if network[0] >> 4 == 6 and len(network) >= 40:
        return network[0:7] + network[8:] + (transport or b"")
    return None


def nat_key(network: Optional[bytes]) -> Optional[bytes]:
    """What NAT leaves alone in an IPv4 packet: total length, id, fragment, protocol.

    None when the id is 0 (some stacks send every DF packet with id 0), so
    that two different packets are never taken for one.
    """
    if not network or network[0] >> 4 != 4 or len(network) < 20:
        return None
    if network[4:6] == b"\0\0":
        return None
    return network[2:6] + bytes([network[6] & ~0x40 & 0xFF]) + network[7:8] + network[9:10]
