"""Complete the TCP/UDP checksum of a frame the ring marks TP_STATUS_CSUMNOTREADY.

Locally generated packets, and packets from hosts behind veth or virtio with
checksum offload (CHECKSUM_PARTIAL), carry only the pseudo-header sum in their
checksum field: the NIC would have finished it. A copy sent as it is fails
an IDS's checksum check (Suricata's default `checksum-checks: auto` drops it
from stream handling), so the forwarder writes the real checksum into the
frame, in place in the ring, before the frame is sent.

tpacket3_hdr has no csum_start/csum_offset, and PACKET_VNET_HDR (which has
them) makes the kernel drop from the ring every frame whose GSO type the
virtio header cannot describe, so the headers are parsed here: Ethernet with
any number of 802.1Q/802.1ad tags, IPv4 (not fragments), IPv6 with the
hop-by-hop, routing and destination options headers skipped (fragments, and
jumbograms, left alone), then TCP or UDP. Anything else stays as it is.

The sum: over 16-bit words that start at an even offset of the segment,
int.from_bytes(data) % 0xFFFF is the ones' complement sum (2**16 = 1 mod
0xFFFF), in C inside int.from_bytes, far faster than summing words in Python.

Standard library only (struct): the capture process imports this.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    from typing import Union

    Buffer = Union[bytearray, memoryview, mmap.mmap]

TP_STATUS_CSUMNOTREADY = 1 << 3
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
TCP, UDP = 6, 17
# The checksum's offset in each L4 header, and the header's minimum length.
_CHECK_AT = {TCP: (16, 20), UDP: (6, 8)}
# IPv6 extension headers skipped on the way to TCP/UDP: hop-by-hop, routing,
# destination options (all "(len + 1) * 8" long; a routing header only with no
# segments left). A fragment header (44) or anything else ends the walk: not
# completed.
_IPV6_SKIP = frozenset({0, 43, 60})
_U16 = struct.Struct("!H")
# IPv4: version/IHL, total length, flags/fragment offset, protocol, addresses.
_IPV4 = struct.Struct("!BxH2xHxB2x8s")


def complete_l3(buf: Buffer, at: int, end: int) -> bool:
    """Complete the TCP/UDP checksum of the IP packet at buf[at:end], in place.
    True when the checksum was written; False for anything left as it is
    (not TCP or UDP, a fragment, or a segment not wholly within `end`)."""
    if end - at < 20:
        return False
    vihl, total_len, frag, proto, addrs = _IPV4.unpack_from(buf, at)
    version = vihl >> 4
    if version == 4:
        ihl = (vihl & 0x0F) * 4
        # Not a fragment (MF or an offset), and wholly captured.
        if ihl < 20 or total_len < ihl or at + total_len > end or frag & 0x3FFF:
            return False
        l4 = at + ihl
        l4_end = at + total_len
        pseudo = int.from_bytes(addrs, "big")
    elif version == 6:
        if end - at < 40:
            return False
        payload = _U16.unpack_from(buf, at + 4)[0]
        l4_end = at + 40 + payload
        if not payload or l4_end > end:
            return False  # a jumbogram (BIG TCP) or cut short
        proto = buf[at + 6]
        l4 = at + 40
        while proto in _IPV6_SKIP:
            if l4 + 8 > l4_end:
                return False
            if proto == 43 and buf[l4 + 3]:
                # Segments left: the pseudo-header's address is the final
                # destination, somewhere in the routing header. Rare: left alone.
                return False
            proto, hlen = buf[l4], (buf[l4 + 1] + 1) * 8
            l4 += hlen
        pseudo = int.from_bytes(buf[at + 8:at + 40], "big")
    else:
        return False
    where = _CHECK_AT.get(proto)
    if where is None:
        return False
    seg_len = l4_end - l4
    if seg_len < where[1]:
        return False
    check_at = l4 + where[0]
    # The ones' complement sum of pseudo-header and segment, mod 0xFFFF (an
    # odd length padded with a zero byte: the number shifted by 8 bits). The
    # field still holds the partial sum: it is taken out of the total again
    # (it sits at an even offset, so its weight is 1 mod 0xFFFF).
    n = int.from_bytes(buf[l4:l4_end], "big")
    if seg_len & 1:
        n <<= 8
    total = (n + pseudo + proto + seg_len - _U16.unpack_from(buf, check_at)[0]) % 0xFFFF
    # total 0 is a folded sum of 0xFFFF (the pseudo-header is never all zero),
    # whose complement is 0; UDP sends a computed 0 as 0xFFFF (0: no checksum).
    check = 0xFFFF - total if total else 0
    _U16.pack_into(buf, check_at, check if check or proto == TCP else 0xFFFF)
    return True


def complete_ethernet(buf: Buffer, at: int, end: int) -> bool:
    """complete_l3 for the Ethernet frame at buf[at:end], through any VLAN tags
    left in the frame (a tag the kernel took off is not in the frame)."""
    p = at + 12
    if end - p < 2:
        return False
    ethertype = _U16.unpack_from(buf, p)[0]
    while ethertype in VLAN_TPIDS:
        p += 4
        if end - p < 2:
            return False
        ethertype = _U16.unpack_from(buf, p)[0]
    if ethertype != ETH_P_IP and ethertype != ETH_P_IPV6:
        return False
    return complete_l3(buf, p + 2, end)
